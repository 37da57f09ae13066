# syntax=docker/dockerfile:1
#
# MLflow tracking server for the team stack (infra/compose.yaml): the official MLflow image of
# our MLflow major version, plus what it needs here: psycopg2 (Postgres tracking and user
# stores), boto3 (S3-compatible artifact store) and the basic-auth app's extra (Flask-WTF).
# Compose builds it with this folder as the context.
#
# No credentials in this image: mlflow_entrypoint.py builds the database URIs and the auth
# config from environment variables at container start (see that file).

ARG MLFLOW_VERSION=3.17.0
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
ARG MLFLOW_VERSION

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN python -m pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "boto3>=1.34"

COPY mlflow_entrypoint.py /usr/local/bin/mlflow_entrypoint.py

RUN groupadd --gid 10001 mlflow \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin mlflow
USER 10001:10001
WORKDIR /home/mlflow

EXPOSE 5000
ENTRYPOINT ["python", "/usr/local/bin/mlflow_entrypoint.py"]
CMD ["--host", "0.0.0.0", "--port", "5000", "--app-name", "basic-auth"]
