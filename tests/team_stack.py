"""The team stack, started for real on 127.0.0.1: PostgreSQL, an S3 endpoint, MLflow, Prefect.

The same engines infra/docker-compose.yml runs, started from Debian's packages and
PyPI because there is no container engine on the build machines. The one stand-in
is the object store: MinIO is packaged for neither, so the S3 endpoint is moto's
standalone server; DVC, s3fs/boto and MLflow's artifact proxy talk S3 to it exactly
as they would to MinIO.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing_or_fail(reason: str) -> None:
    """Skip on a developer machine without the packages; fail in CI, where .ci/run installs them."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (.ci/run installs it from Debian's packages)")
    pytest.skip(reason)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@dataclass
class Service:
    """One server process in its own session, with its log kept for the failure message."""

    name: str
    command: list[str]
    env: Mapping[str, str]
    log: Path
    health_url: str
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Service:
        handle = self.log.open("ab")
        self.process = subprocess.Popen(
            self.command,
            env=dict(self.env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        handle.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.tail()}")
            if _answers(self.health_url):
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer {self.health_url}:\n{self.tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


class Postgres:
    """A throwaway PostgreSQL cluster; as root it runs as the ``postgres`` system user."""

    def __init__(self, base: Path) -> None:
        bin_dir = _postgres_bin()
        if bin_dir is None:
            missing_or_fail("no PostgreSQL server (pg_ctl) installed")
        self.bin = bin_dir
        self.base = base
        self.port = free_port()
        self.user = "roadshift"
        self.password = secrets.token_urlsafe(16)
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> None:
        command = list(args)
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True)

    def start(self) -> Postgres:
        self.base.mkdir(parents=True, exist_ok=True)
        pwfile = self.base / "pw"
        pwfile.write_text(self.password)
        if self.as_postgres:
            shutil.chown(self.base, "postgres")
            shutil.chown(pwfile, "postgres")
        data = self.base / "data"
        self._run(
            str(self.bin / "initdb"), "-D", str(data), "-U", self.user,
            f"--pwfile={pwfile}", "--auth=scram-sha-256", "--no-sync",
        )  # fmt: skip
        options = f"-h 127.0.0.1 -p {self.port} -k {self.base} -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(data), "-o", options,
            "-l", str(self.base / "postgres.log"), "-w", "-t", "60", "start",
        )  # fmt: skip
        self.data = data
        return self

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if getattr(self, "data", None) is not None:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
            self.data = None


def s3_endpoint(base: Path, env: Mapping[str, str]) -> Service:
    port = free_port()
    return Service(
        "S3 endpoint (moto server)",
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env,
        base / "s3.log",
        f"http://127.0.0.1:{port}/",
    )


def _s3_client(endpoint: str, env: Mapping[str, str]):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def make_buckets(endpoint: str, env: Mapping[str, str], *names: str) -> None:
    client = _s3_client(endpoint, env)
    for name in names:
        client.create_bucket(Bucket=name)


def bucket_keys(endpoint: str, env: Mapping[str, str], bucket: str) -> list[str]:
    pages = _s3_client(endpoint, env).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def mlflow_server(
    base: Path, backend_uri: str, auth_db_uri: str | None, env: Mapping[str, str], port: int
) -> Service:
    """``mlflow server`` on PostgreSQL, proxying artifacts to the S3 bucket; basic auth if asked."""
    command = [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", backend_uri,
        "--serve-artifacts", "--artifacts-destination", "s3://mlflow-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server_env = dict(env)
    if auth_db_uri is not None:
        ini = base / f"mlflow-auth-{port}.ini"
        ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {auth_db_uri}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        command += ["--app-name", "basic-auth"]
        server_env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    return Service(
        f"mlflow server :{port}", command, server_env, base / f"mlflow-{port}.log",
        f"http://127.0.0.1:{port}/health",
    )  # fmt: skip


def prefect_server(base: Path, database_url: str, env: Mapping[str, str]) -> Service:
    port = free_port()
    server_env = {
        **env,
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_HOME": str(base / "prefect-server-home"),
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server_env.pop("PREFECT_API_URL", None)
    return Service(
        f"prefect server :{port}",
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        server_env,
        base / "prefect-server.log",
        f"http://127.0.0.1:{port}/api/health",
    )


def base_directory() -> Path:
    """Under /tmp with traversable permissions: PostgreSQL runs as another user."""
    base = Path(tempfile.mkdtemp(prefix="roadshift-team-", dir="/tmp"))
    base.chmod(0o755)
    return base
