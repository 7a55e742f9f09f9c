#!/usr/bin/env bash
# Entry point of the roadshift-mlflow image: builds the database URIs and MLflow's basic-auth ini
# from the environment at container start (no secret is stored in the image or the repository),
# then runs `mlflow server "$@"`.
#
#   mlflow-entrypoint.sh render-config   write the ini to $MLFLOW_AUTH_CONFIG_PATH and exit
#   mlflow-entrypoint.sh [server args]   write it, then exec `mlflow server [server args]`
#
# Environment:
#   MLFLOW_DB_PASSWORD                         required unless both URIs below are given
#   MLFLOW_DB_HOST/PORT/USER/NAME              default postgres/5432/mlflow/mlflow
#   MLFLOW_AUTH_DB_NAME                        default mlflow_auth
#   MLFLOW_BACKEND_STORE_URI                   overrides the tracking/registry URI built from the above
#   MLFLOW_AUTH_DATABASE_URI                   overrides the basic-auth users' database URI
#   MLFLOW_AUTH_CONFIG_PATH                    where the ini goes (default /tmp/mlflow-auth/basic_auth.ini);
#                                              mlflow reads the same variable
#   MLFLOW_AUTH_DEFAULT_PERMISSION             READ (default), EDIT, MANAGE or NO_PERMISSIONS
#   MLFLOW_AUTH_ADMIN_USERNAME                 default admin; written to the ini
#   MLFLOW_AUTH_ADMIN_PASSWORD                 required to serve; MLflow 3.17 reads it from the
#                                              environment itself, so it is NOT written to the ini
#   MLFLOW_FLASK_SERVER_SECRET_KEY             required to serve (CSRF key of the basic-auth app)
set -euo pipefail

PYTHON="${PYTHON:-python3}"
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"

# Prints the SQLAlchemy URI of database $1 with the user and password URL-escaped.
db_uri() {
  "$PYTHON" - "$1" <<'PY'
import os, sys
from urllib.parse import quote

env = os.environ
password = env.get("MLFLOW_DB_PASSWORD")
if not password:
    sys.exit("mlflow-entrypoint: set MLFLOW_DB_PASSWORD (or MLFLOW_BACKEND_STORE_URI and MLFLOW_AUTH_DATABASE_URI)")
print(
    "postgresql://{}:{}@{}:{}/{}".format(
        quote(env.get("MLFLOW_DB_USER", "mlflow"), safe=""),
        quote(password, safe=""),
        env.get("MLFLOW_DB_HOST", "postgres"),
        env.get("MLFLOW_DB_PORT", "5432"),
        sys.argv[1],
    )
)
PY
}

if [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
  MLFLOW_BACKEND_STORE_URI="$(db_uri "${MLFLOW_DB_NAME:-mlflow}")"
fi
if [[ -z "${MLFLOW_AUTH_DATABASE_URI:-}" ]]; then
  MLFLOW_AUTH_DATABASE_URI="$(db_uri "${MLFLOW_AUTH_DB_NAME:-mlflow_auth}")"
fi
# `mlflow server` reads --backend-store-uri from this variable: the password stays off the command line
export MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI

umask 077
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
"$PYTHON" - <<'PY'
import configparser, os

env = os.environ
config = configparser.ConfigParser()
# MLflow reads the ini with ConfigParser's default interpolation: a literal % (URL-escaped
# password characters) must be written as %%.
config["mlflow"] = {
    "default_permission": env.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ"),
    "database_uri": env["MLFLOW_AUTH_DATABASE_URI"].replace("%", "%%"),
    "admin_username": env["MLFLOW_AUTH_ADMIN_USERNAME"].replace("%", "%%"),
    "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
}
path = env["MLFLOW_AUTH_CONFIG_PATH"]
with open(path, "w", encoding="utf-8") as f:
    f.write("# written by mlflow-entrypoint.sh at container start; not a repository file\n")
    config.write(f)
PY
unset MLFLOW_AUTH_DATABASE_URI

if [[ "${1:-}" == "render-config" ]]; then
  echo "$MLFLOW_AUTH_CONFIG_PATH"
  exit 0
fi

: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (MLflow creates the admin user with it on the first start)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF key of the basic-auth app)}"
exec mlflow server "$@"
