# MLflow tracking server + model registry for the roadshift team stack (see docker-compose.yml):
# PostgreSQL backend, artifacts proxied to S3 (MinIO), basic auth. Build context: infra/.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# mlflow[auth] brings Flask-WTF (the basic-auth app's CSRF protection); pinned here as well.
# SQLAlchemy 2.1 maps postgresql:// to psycopg 3 (not psycopg2). Pins match requirements.lock,
# the versions tests/test_team_mode.py runs an mlflow server with against PostgreSQL.
RUN pip install \
      "mlflow[auth]==3.17.2" \
      "Flask-WTF==1.3.0" \
      "SQLAlchemy==2.1.9" \
      "psycopg[binary]==3.3.9" \
      "boto3==1.43.117"

RUN useradd --create-home --uid 1001 mlflow
COPY mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint"]
CMD ["--host", "0.0.0.0", "--port", "5000", "--app-name", "basic-auth"]
