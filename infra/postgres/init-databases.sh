#!/bin/sh
# First-start initialisation of the team Postgres (infra/compose.yaml mounts this file into
# /docker-entrypoint-initdb.d/). The postgres image runs it once, when the data volume is empty;
# later password changes are done with ALTER ROLE, not by editing .env alone. Keep the file
# executable: the image then runs it as its own process instead of sourcing it.
#
# One role per service, each owning its databases:
#   mlflow  -> mlflow (tracking and model registry), mlflow_auth (basic-auth users)
#   prefect -> prefect (Prefect server)
# Passwords come from the environment (MLFLOW_DB_PASSWORD, PREFECT_DB_PASSWORD); psql's :'var'
# quoting keeps them out of the SQL text and the shell.
set -eu

: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
: "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v prefect_pw="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
SQL

# Prefect's migrations create the pg_trgm extension; do it here as the superuser so the
# prefect role needs no extra privilege.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname prefect \
    -c 'CREATE EXTENSION IF NOT EXISTS pg_trgm;'
