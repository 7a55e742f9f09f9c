"""Static checks of the team setup under infra/ (no Docker engine, no cluster needed).

- ``docker-compose config`` (Debian's 1.29.2, or ``docker compose`` v2) accepts the compose file
  with every required secret set, and refuses it, naming the variable, when one is missing;
- no file under infra/ holds a literal secret;
- every published port binds 127.0.0.1;
- the Kubernetes values/templates parse, take secrets by ``secretKeyRef`` and render with
  Prefect's own templating;
- the MLflow entry point renders a basic-auth ini that ConfigParser (what MLflow uses) reads back.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
K8S = INFRA / "k8s"

# every ${VAR:?...} of the compose file, with a dummy value (a long one where a length is checked)
REQUIRED_ENV = {
    "POSTGRES_PASSWORD": "dummy-postgres",
    "MLFLOW_DB_PASSWORD": "dummy-mlflow-db",
    "PREFECT_DB_PASSWORD": "dummy-prefect-db",
    "MINIO_ROOT_USER": "dummy-minio-admin",
    "MINIO_ROOT_PASSWORD": "dummy-minio-password",
    "AWS_ACCESS_KEY_ID": "dummy-access-key",
    "AWS_SECRET_ACCESS_KEY": "dummy-secret-key",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "dummy-admin-password",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "dummy-flask-key",
    "MLFLOW_TRACKING_PASSWORD": "dummy-admin-password",
    "ROADSHIFT_GIT_URL": "https://git.example.invalid/roadshift.git",
}
SERVICES = {"postgres", "minio", "create-buckets", "mlflow", "prefect-server", "worker"}
SECRET_KEYS = {"mlflow-tracking-password", "aws-access-key-id", "aws-secret-access-key"}


def _compose_yaml() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = _compose_command()
    if command is None:
        message = (
            "neither docker-compose nor `docker compose` is installed; .ci/run installs Debian's "
            "docker-compose (apt-get install docker-compose), which validates "
            "infra/docker-compose.yml without a Docker engine"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return command


def _compose_env(**overrides: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in REQUIRED_ENV and not k.startswith("COMPOSE_") and not k.startswith("DOCKER_")
    }
    # the optional variables too, so a developer's own exports do not change what is checked
    for name in ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "ROADSHIFT_DVC_REMOTE"):
        env.pop(name, None)
    env.update(REQUIRED_ENV)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _config_args(compose: list[str]) -> list[str]:
    return [*compose, "-f", str(COMPOSE_FILE), "config"]


def test_required_env_matches_compose_file():
    code = "\n".join(
        line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    required = set(re.findall(r"\$\{(\w+):\?", code))
    assert required == set(REQUIRED_ENV)


def test_compose_config_valid_with_required_env(compose):
    result = subprocess.run(
        _config_args(compose),
        env=_compose_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == SERVICES

    worker_env = config["services"]["worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker_env["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert worker_env["MLFLOW_TRACKING_PASSWORD"] == REQUIRED_ENV["MLFLOW_TRACKING_PASSWORD"]
    assert worker_env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert worker_env["AWS_ACCESS_KEY_ID"] == REQUIRED_ENV["AWS_ACCESS_KEY_ID"]
    assert worker_env["ROADSHIFT_DVC_REMOTE"] == "team"
    assert worker_env["ROADSHIFT_GIT_URL"] == REQUIRED_ENV["ROADSHIFT_GIT_URL"]
    assert worker_env["ROADSHIFT_GIT_BRANCH"] == "main"

    mlflow = config["services"]["mlflow"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    command = " ".join(mlflow["command"])
    for flag in ("--serve-artifacts", "s3://mlflow-artifacts", "basic-auth", "--allowed-hosts"):
        assert flag in command
    allowed = mlflow["command"][mlflow["command"].index("--allowed-hosts") + 1].split(",")
    assert {"mlflow:*", "localhost:*"} <= set(allowed)

    for name, service in config["services"].items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip')}:"
            assert published.startswith("127.0.0.1:"), f"{name} publishes {port}"


def test_compose_config_names_each_missing_secret(compose):
    # one `config` per missing variable, all at once (each takes about a second)
    runs = {
        name: subprocess.Popen(
            _config_args(compose),
            env=_compose_env(**{name: None}),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in REQUIRED_ENV
    }
    for name, process in runs.items():
        _, stderr = process.communicate(timeout=60)
        assert process.returncode != 0, f"compose accepted the file without {name}"
        assert f"set {name}" in stderr, stderr


# --- no literal secrets -------------------------------------------------------------------------

SECRET_NAME = re.compile(
    r"(?P<name>[A-Za-z_]*(?:password|passwd|secret|token|auth_string|access_key)[A-Za-z_]*)"
    r"[\"']?\s*(?P<sep>[:=])\s*(?P<value>.*)$",
    re.IGNORECASE,
)
# names that hold the *name* of a Kubernetes Secret, not a secret
SECRET_REFERENCE_NAMES = {"existingsecret", "secret_name", "secretkeyref", "apikeysecret"}


def _literal_secrets(text: str) -> list[str]:
    found = []
    for line in text.splitlines():
        # ${VAR}, ${VAR:?msg}, ${VAR:-default} are references, whatever they contain
        line = re.sub(r"\$\{[^}]*\}", "$REF", line)
        for match in SECRET_NAME.finditer(line):
            name, sep, value = match["name"], match["sep"], match["value"].strip()
            if name.lower() in SECRET_REFERENCE_NAMES:
                continue
            if sep == ":" and re.match(r"'\w+'", value):  # psql variable, :'name'
                continue
            value = value.strip("\"'`,; ")
            if not value or "$" in value:  # empty, or from the environment
                continue
            if re.match(r"[A-Za-z_][\w.]*\s*[(\[]", value):  # code: env.get(...), env["..."]
                continue
            if value.startswith(("{", "[", "#")):  # a nested mapping/list or a comment
                continue
            found.append(line.strip())
    return found


def test_secret_scanner_catches_planted_secrets():
    assert _literal_secrets("MLFLOW_TRACKING_PASSWORD: hunter2-secret")
    assert _literal_secrets("export AWS_SECRET_ACCESS_KEY=abc123")
    assert _literal_secrets('admin_password = "p4ss"')
    assert _literal_secrets("database_uri = x\npassword=letmein")
    assert not _literal_secrets("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}")
    assert not _literal_secrets("export MINIO_ROOT_PASSWORD=$(openssl rand -hex 24)")
    assert not _literal_secrets('password = env.get("MLFLOW_DB_PASSWORD")')


def test_no_literal_secrets_under_infra():
    offenders = []
    for path in sorted(INFRA.rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(ROOT)}: {line}" for line in _literal_secrets(text)]
        assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY", text), path
    assert not offenders, "literal secrets:\n" + "\n".join(offenders)


def test_published_ports_bind_localhost():
    for name, service in _compose_yaml()["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_services_and_volumes():
    compose = _compose_yaml()
    assert set(compose["services"]) == SERVICES
    assert compose["services"]["postgres"]["image"] == "postgres:16"
    assert compose["services"]["prefect-server"]["image"] == "prefecthq/prefect:3.8.8-python3.11"
    assert {"pgdata", "minio-data"} <= set(compose["volumes"])
    init = compose["services"]["postgres"]["volumes"]
    assert any(v.endswith(":/docker-entrypoint-initdb.d/10-init-databases.sh:ro") for v in init)
    assert "roadshift-dvc mlflow-artifacts" in str(compose["services"]["create-buckets"])
    for path in ("mlflow-entrypoint.sh", "worker-start.sh", "postgres/init-databases.sh"):
        assert (INFRA / path).stat().st_mode & stat.S_IXUSR, f"{path} must be executable"


def test_dockerfiles_pin_the_stack():
    mlflow = (INFRA / "mlflow.Dockerfile").read_text()
    assert "FROM python:3.11-slim" in mlflow
    assert '"mlflow[auth]==3.17.2"' in mlflow
    worker = (INFRA / "worker.Dockerfile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in worker
    assert "https://download.pytorch.org/whl/cpu" in worker
    assert "requirements.lock" in worker
    # BuildKit's per-Dockerfile ignore file: everything out, then only what the image needs
    ignore = (INFRA / "worker.Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[[line.startswith("#") for line in ignore].index(False)] == "*"
    assert {"!requirements.lock", "!roadshift/", "!flows/", "!tasks/"} <= set(ignore)
    assert not any(line.startswith(("!.venv", "!data", "!mlruns")) for line in ignore)


# --- Kubernetes ---------------------------------------------------------------------------------


def _container_env(template: dict) -> list[dict]:
    manifest = template["job_configuration"]["job_manifest"]
    return manifest["spec"]["template"]["spec"]["containers"][0]["env"]


def _render(template: dict, **values) -> dict:
    templating = pytest.importorskip("prefect.utilities.templating")
    defaults = {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if "default" in spec
    }
    defaults.update(name="run", env={"EXTRA": "1"}, labels={"a": "b"}, **values)
    return templating.apply_values(template["job_configuration"], defaults)


@pytest.mark.parametrize("name", ["base-job-template.json", "base-job-template-gpu.json"])
def test_base_job_templates(name):
    template = json.loads((K8S / name).read_text())
    env = _container_env(template)
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in env
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {
        "MLFLOW_TRACKING_PASSWORD": "mlflow-tracking-password",
        "AWS_ACCESS_KEY_ID": "aws-access-key-id",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key",
    }
    plain = {e["name"] for e in env if "value" in e}
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "ROADSHIFT_DVC_REMOTE"} <= plain
    assert {"ROADSHIFT_GIT_URL", "ROADSHIFT_GIT_BRANCH"} <= plain

    rendered = _render(template, git_url="https://git.example.invalid/r.git")
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "{{" not in json.dumps(rendered), "placeholder left after rendering"
    assert container["image"].startswith("registry.example.com/roadshift-worker:")
    secret_names = {
        e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e
    }
    assert secret_names == {"roadshift-secrets"}
    if name.endswith("-gpu.json"):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert (
            _render(template, gpu_count=4)["job_manifest"]["spec"]["template"]["spec"][
                "containers"
            ][0]["resources"]["limits"]["nvidia.com/gpu"]
            == 4
        )


@pytest.mark.parametrize(
    ("name", "pool"),
    [
        ("prefect-worker-values.yaml", "roadshift-k8s"),
        ("prefect-worker-gpu-values.yaml", "roadshift-gpu"),
    ],
)
def test_helm_values(name, pool):
    values = yaml.safe_load((K8S / name).read_text())
    worker = values["worker"]
    assert worker["config"]["workPool"] == pool
    assert worker["config"]["type"] == "kubernetes"
    assert worker["apiConfig"] == "selfHostedServer"
    assert worker["selfHostedServerApiConfig"]["apiUrl"].endswith("/api")
    auth = worker["selfHostedServerApiConfig"]["basicAuth"]
    assert auth["enabled"] is True and auth["existingSecret"] and "authString" not in auth
    assert worker["image"]["prefectTag"].startswith("3.8.8-")


def test_all_k8s_files_parse_and_torchrun_job_uses_secrets():
    for path in sorted(K8S.iterdir()):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in {".yaml", ".yml"}:
            assert list(yaml.safe_load_all(path.read_text()))
    job = yaml.safe_load((K8S / "torchrun-pretrain-job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert (
        "torchrun --standalone --nproc_per_node=gpu -m roadshift stage pretrain"
        in container["args"][0]
    )
    keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert keys == SECRET_KEYS


# --- the MLflow entry point ---------------------------------------------------------------------


def _entrypoint(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base.update(PYTHON=sys.executable, MLFLOW_AUTH_CONFIG_PATH=str(tmp_path / "auth" / "basic.ini"))
    base.update(env)
    return subprocess.run(
        ["bash", str(INFRA / "mlflow-entrypoint.sh"), *args],
        env=base,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_mlflow_entrypoint_renders_auth_ini(tmp_path):
    password = "p@ss%w/rd:x y'#"
    result = _entrypoint(
        tmp_path,
        "render-config",
        MLFLOW_DB_PASSWORD=password,
        MLFLOW_AUTH_ADMIN_USERNAME="boss",
        MLFLOW_AUTH_ADMIN_PASSWORD="never-written-to-the-ini",
    )
    assert result.returncode == 0, result.stderr
    ini = tmp_path / "auth" / "basic.ini"
    assert result.stdout.strip() == str(ini)
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert "never-written-to-the-ini" not in ini.read_text()

    # read the way mlflow.server.auth.config.read_auth_config does (ConfigParser, interpolation on)
    config = configparser.ConfigParser()
    config.read(ini)
    section = config["mlflow"]
    assert section["default_permission"] == "READ"
    assert section["admin_username"] == "boss"
    assert section["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert "admin_password" not in section  # MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD itself

    from sqlalchemy.engine import make_url

    url = make_url(section["database_uri"])
    assert (url.drivername, url.username, url.host, url.port, url.database) == (
        "postgresql",
        "mlflow",
        "postgres",
        5432,
        "mlflow_auth",
    )
    assert url.password == password


def test_mlflow_entrypoint_takes_explicit_uris(tmp_path):
    result = _entrypoint(
        tmp_path,
        "render-config",
        MLFLOW_BACKEND_STORE_URI="sqlite:///tracking.db",
        MLFLOW_AUTH_DATABASE_URI="sqlite:///auth.db",
    )
    assert result.returncode == 0, result.stderr
    config = configparser.ConfigParser()
    config.read(tmp_path / "auth" / "basic.ini")
    assert config["mlflow"]["database_uri"] == "sqlite:///auth.db"


def test_mlflow_entrypoint_names_missing_secrets(tmp_path):
    no_db = _entrypoint(tmp_path, "render-config")
    assert no_db.returncode != 0 and "MLFLOW_DB_PASSWORD" in no_db.stderr

    no_admin = _entrypoint(tmp_path, "--port", "5000", MLFLOW_DB_PASSWORD="x")
    assert no_admin.returncode != 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in no_admin.stderr

    no_key = _entrypoint(
        tmp_path, "--port", "5000", MLFLOW_DB_PASSWORD="x", MLFLOW_AUTH_ADMIN_PASSWORD="y" * 16
    )
    assert no_key.returncode != 0 and "MLFLOW_FLASK_SERVER_SECRET_KEY" in no_key.stderr
