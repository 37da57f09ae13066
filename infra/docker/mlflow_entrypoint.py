"""Entrypoint of the MLflow server image (infra/docker/mlflow.Dockerfile).

Starts ``mlflow server`` with the arguments it is given (compose passes ``--app-name basic-auth``
and the artifact settings), after building from environment variables the two things MLflow
only takes as URIs or files:

* the tracking store, ``MLFLOW_BACKEND_STORE_URI`` (``mlflow server`` reads this variable), a
  Postgres URI made of ``MLFLOW_DB_HOST``, ``MLFLOW_DB_PORT``, ``MLFLOW_DB_USER``,
  ``MLFLOW_DB_PASSWORD`` and ``MLFLOW_DB_NAME``;
* the basic-auth app's config file (``MLFLOW_AUTH_CONFIG_PATH``, an ini file): its user store on
  the same server (database ``MLFLOW_AUTH_DB_NAME``) and the admin account from
  ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD``, and how long a checked
  credential is cached (``MLFLOW_AUTH_CACHE_TTL_SECONDS``, default 60).

The ini file holds the database password, so it is written at every start, readable by this
user only, into a directory that is not persisted (compose mounts a tmpfs there); nothing
secret is baked into the image. Recent MLflow reads the ``MLFLOW_AUTH_ADMIN_*`` variables
itself; they are also written to the ini so that any MLflow 3.x release accepts them. The admin
account is created on the first start only; later changes go through MLflow's
update-password API.
"""

from __future__ import annotations

import configparser
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

REQUIRED = (
    "MLFLOW_DB_HOST",
    "MLFLOW_DB_USER",
    "MLFLOW_DB_PASSWORD",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
DEFAULT_CONFIG_PATH = "/run/mlflow/basic_auth.ini"
MIN_PASSWORD_LENGTH = 12  # MLflow's own rule for user passwords


class SetupError(RuntimeError):
    """A variable is missing or unusable; the message names it."""


def database_uri(env: Mapping[str, str], database: str) -> str:
    """``postgresql://<user>:<password>@<host>:<port>/<database>``, user and password
    URL-quoted."""
    user = quote(env["MLFLOW_DB_USER"], safe="")
    password = quote(env["MLFLOW_DB_PASSWORD"], safe="")
    host = env["MLFLOW_DB_HOST"]
    port = env.get("MLFLOW_DB_PORT") or "5432"
    return f"postgresql://{user}:{password}@{host}:{port}/{database}"


def check(env: Mapping[str, str]) -> None:
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise SetupError(
            "set " + ", ".join(missing) + " (see infra/.env.example); the MLflow server keeps "
            "no default credentials")
    if len(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) < MIN_PASSWORD_LENGTH:
        raise SetupError(
            f"MLFLOW_AUTH_ADMIN_PASSWORD must be at least {MIN_PASSWORD_LENGTH} characters "
            "(e.g. openssl rand -hex 24)")


def auth_config(env: Mapping[str, str]) -> configparser.ConfigParser:
    """The basic-auth app's config (the keys of MLflow's own basic_auth.ini)."""
    values = {
        "default_permission": env.get("MLFLOW_AUTH_DEFAULT_PERMISSION") or "READ",
        "database_uri": database_uri(env, env.get("MLFLOW_AUTH_DB_NAME") or "mlflow_auth"),
        "admin_username": env["MLFLOW_AUTH_ADMIN_USERNAME"],
        "admin_password": env["MLFLOW_AUTH_ADMIN_PASSWORD"],
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        # Without a cache the server checks the password hash (a deliberately slow scrypt) on
        # every request: 0.4 s each on a 2-core host, and logging one model makes dozens.
        # MLflow releases with mlflow/mlflow#22817 (spring 2026) cache a good credential this
        # long (older ones ignore the key); a changed password or a deleted user takes effect
        # within it. 0 turns the cache off (MLflow's own default).
        "auth_cache_ttl_seconds": env.get("MLFLOW_AUTH_CACHE_TTL_SECONDS") or "60",
    }
    # MLflow reads the file with configparser's default interpolation, where '%' starts a
    # reference: a URL-quoted password is full of them. Written escaped ('%%'), read back as '%'.
    cfg = configparser.ConfigParser(interpolation=None)
    cfg["mlflow"] = {k: v.replace("%", "%%") for k, v in values.items()}
    return cfg


def write_private(path: Path, cfg: configparser.ConfigParser) -> None:
    """Write ``cfg`` to ``path``, mode 0600, in a directory only this user can enter."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        cfg.write(f)
    os.chmod(path, 0o600)


def prepare(env: Mapping[str, str]) -> dict[str, str]:
    """Write the auth config; return the environment for ``mlflow server``."""
    check(env)
    path = Path(env.get("MLFLOW_AUTH_CONFIG_PATH") or DEFAULT_CONFIG_PATH)
    write_private(path, auth_config(env))
    return {
        **env,
        "MLFLOW_AUTH_CONFIG_PATH": str(path),
        "MLFLOW_BACKEND_STORE_URI": database_uri(env, env.get("MLFLOW_DB_NAME") or "mlflow"),
    }


def main(argv: list[str]) -> None:
    try:
        child_env = prepare(os.environ)
    except SetupError as e:
        sys.exit(f"mlflow-entrypoint: {e}")
    os.execvpe("mlflow", ["mlflow", "server", *argv], child_env)


if __name__ == "__main__":
    main(sys.argv[1:])
