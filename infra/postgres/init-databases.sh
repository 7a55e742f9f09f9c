#!/bin/bash
# Runs once, on the first start of the postgres service (empty data volume), from
# /docker-entrypoint-initdb.d. Creates one role per server and their databases:
#   mlflow  -> databases mlflow (tracking + registry) and mlflow_auth (basic-auth users)
#   prefect -> database prefect
# The passwords come from the container's environment (compose passes them); psql's
# :'var' quoting keeps any character in them safe.
# No `set -u`: the image sources (rather than executes) an init script that lost its exec bit.
set -e
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}" "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v prefect_pw="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE prefect OWNER prefect;
-- Prefect's migrations create pg_trgm (a trusted extension: the database owner may create it)
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
