"""Team mode, for real: the same code against servers instead of the embedded defaults.

A PostgreSQL server, an S3 endpoint, ``mlflow server`` (basic auth, PostgreSQL,
artifacts proxied to S3) and ``prefect server`` (PostgreSQL) are started on
127.0.0.1. The project switches to them by environment only. A Prefect worker picks
the deployment from prefect.yaml, which clones the repository and pulls the data
from the DVC remote; a second clone then reproduces the champion from that remote.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers import PROJECT_ROOT, TINY_PARAMS, commit_everything, git, make_project
from tests.team_stack import (
    Postgres,
    Service,
    base_directory,
    bucket_keys,
    free_port,
    make_buckets,
    mlflow_server,
    prefect_server,
    s3_endpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]

MODEL = "team-road-signs"
ADMIN = "admin"
# the stage and flow code a deployment runs from its clone, beside what make_project copies
DEPLOYMENT_FILES = ("prefect.yaml",)
DEPLOYMENT_DIRS = ("flows", "tasks")


@dataclass
class Team:
    base: Path
    postgres: Postgres
    s3_url: str
    mlflow: Service
    mlflow_url: str
    prefect_api: str
    env: dict[str, str]  # what a team member's shell or a worker has: URLs, credentials

    def run(self, *command: str, cwd: Path, timeout: float = 600, **extra: str):
        return subprocess.run(
            list(command),
            cwd=cwd,
            env={**self.env, **extra},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def check(self, *command: str, cwd: Path, timeout: float = 600, **extra: str) -> str:
        done = self.run(*command, cwd=cwd, timeout=timeout, **extra)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def registry(self, tracking_uri: str | None = None) -> MlflowClient:
        return MlflowClient(
            tracking_uri or self.mlflow_url, registry_uri=tracking_uri or self.mlflow_url
        )


def _client_environment(**team: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "PREFECT_API", "ROADSHIFT_", "AWS_"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(team)
    return env


@pytest.fixture(scope="module")
def team():
    base = base_directory()
    postgres = Postgres(base / "postgres")
    started: list[Service] = []
    try:
        postgres.start()
        s3_keys = {
            "AWS_ACCESS_KEY_ID": "roadshift-" + secrets.token_hex(4),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        s3 = s3_endpoint(base, {**os.environ, **s3_keys}).start()
        started.append(s3)
        s3_url = s3.health_url.rstrip("/")
        make_buckets(s3_url, s3_keys, "mlflow-artifacts", "roadshift-dvc")

        admin_password = secrets.token_urlsafe(18)
        server_env = {
            **os.environ,
            **s3_keys,
            "MLFLOW_S3_ENDPOINT_URL": s3_url,
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
        mlflow_port = free_port()
        mlflow = mlflow_server(
            base,
            postgres.create_database("mlflow"),
            postgres.create_database("mlflow_auth"),
            server_env,
            mlflow_port,
        ).start()
        started.append(mlflow)
        prefect_db = postgres.create_database("prefect")
        prefect = prefect_server(
            base, prefect_db.replace("postgresql://", "postgresql+asyncpg://"), os.environ
        ).start()
        started.append(prefect)
        prefect_api = prefect.health_url.removesuffix("/health")
        env = _client_environment(
            PREFECT_API_URL=prefect_api,
            PREFECT_HOME=str(base / "client-prefect-home"),
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
            MLFLOW_TRACKING_USERNAME=ADMIN,
            MLFLOW_TRACKING_PASSWORD=admin_password,
            AWS_ENDPOINT_URL_S3=s3_url,
            ROADSHIFT_DVC_REMOTE="team",
            **s3_keys,
        )
        yield Team(
            base, postgres, s3_url, mlflow, f"http://127.0.0.1:{mlflow_port}", prefect_api, env
        )
    finally:
        for service in reversed(started):
            service.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def as_team_member(team, monkeypatch):
    """This test process talks to the team's MLflow with the team's credentials."""
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, team.env[key])
    return team


def _team_project(root: Path, model: str, **sections) -> Path:
    params = {
        **TINY_PARAMS,
        "register": {**TINY_PARAMS["register"], "model_name": model},
        **sections,
    }
    project = make_project(root, params)
    for name in DEPLOYMENT_FILES:
        shutil.copyfile(PROJECT_ROOT / name, project / name)
    for name in DEPLOYMENT_DIRS:
        shutil.copytree(
            PROJECT_ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    return commit_everything(project, "deployment code")


def _flow_runs(prefect_api: str) -> list[dict]:
    request = urllib.request.Request(
        f"{prefect_api}/flow_runs/filter",
        data=json.dumps({}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _images(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_worker_runs_the_deployment_on_the_team_stack_and_a_second_clone_reproduces_it(
    as_team_member,
):
    team = as_team_member
    project = _team_project(team.base / "alice", MODEL)
    dvc = str(Path(sys.executable).parent / "dvc")

    # Alice versions the data, commits the pointers and pushes the images to the team remote
    team.check(
        dvc,
        "add",
        *(f"data/raw/{d}" for d in ("source", "target", "target_unlabeled")),
        cwd=project,
    )
    commit_everything(project, "data versions")
    team.check(dvc, "push", "-r", "team", cwd=project)
    data_objects = set(bucket_keys(team.s3_url, team.env, "roadshift-dvc"))
    origin = team.base / "origin.git"
    git(team.base, "clone", "-q", "--bare", str(project), str(origin))
    checkout = {"ROADSHIFT_GIT_URL": str(origin), "ROADSHIFT_GIT_BRANCH": "main"}

    # a Prefect deployment from prefect.yaml; a worker on a bare directory picks it up
    prefect = str(Path(sys.executable).parent / "prefect")
    team.check(
        prefect, "work-pool", "create", "roadshift-process", "--type", "process", cwd=project
    )
    team.check(prefect, "gcl", "create", f"roadshift-registry-{MODEL}", "--limit", "1", cwd=project)
    team.check(prefect, "--no-prompt", "deploy", "--all", cwd=project, **checkout)
    team.check(
        prefect, "deployment", "run", "scheduled-retraining/scheduled-retraining", cwd=project
    )
    worker_dir = team.base / "worker"
    worker_dir.mkdir()
    worker = team.run(
        prefect, "worker", "start", "--pool", "roadshift-process", "--run-once",
        cwd=worker_dir, timeout=900, **checkout,
    )  # fmt: skip
    runs = [run for run in _flow_runs(team.prefect_api) if run["state_type"] != "SCHEDULED"]
    states = {run["name"]: (run["flow_id"], run["state_type"]) for run in runs}
    assert runs and all(run["state_type"] == "COMPLETED" for run in runs), (
        f"flow runs: {states}\nworker:\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
    )
    assert len(runs) == 2  # scheduled-retraining and its training-pipeline subflow

    # the champion is in the team registry, its artifacts in the proxied S3 store
    registry = team.registry()
    champion = registry.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1"
    assert champion.source.startswith(("models:/", "mlflow-artifacts:"))
    stored = bucket_keys(team.s3_url, team.env, "mlflow-artifacts")
    assert any(key.endswith("MLmodel") for key in stored)
    # the run on the worker pushed its models and reports to the same remote
    assert set(bucket_keys(team.s3_url, team.env, "roadshift-dvc")) > data_objects
    with pytest.raises(urllib.error.HTTPError) as refused:  # basic auth is on
        urllib.request.urlopen(f"{team.mlflow_url}/api/2.0/mlflow/registered-models/search")
    assert refused.value.code == 401

    # Bob's fresh clone gets the champion's exact data from the remote and rebuilds it
    bob = team.base / "bob"
    git(team.base, "clone", "-q", str(origin), str(bob))
    pulled = team.check("roadshift", "data", "pull", cwd=bob)
    assert "pulled from team" in pulled
    for domain in ("source", "target"):
        pointer = yaml.safe_load((bob / f"data/raw/{domain}.dvc").read_text())
        assert pointer["outs"][0]["md5"] == champion.tags[f"data.{domain}.version"]
        assert _images(bob / f"data/raw/{domain}") == _images(project / f"data/raw/{domain}")
    reproduced = team.run("roadshift", "reproduce", "--model-version", "1", cwd=bob, timeout=900)
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr
    assert "identical" in reproduced.stdout


def test_the_tracking_server_going_away_stops_the_run_clearly_and_a_rerun_completes(
    as_team_member,
):
    team = as_team_member
    port = free_port()
    tracking_uri = f"http://127.0.0.1:{port}"
    database = team.postgres.create_database("mlflow_outage")

    def start_server() -> Service:
        return mlflow_server(team.base, database, None, team.mlflow.env, port).start()

    server = start_server()
    project = _team_project(
        team.base / "outage", "outage-road-signs", pretrain={"epochs": 12, "batch_size": 16}
    )
    run_env = {**team.env, "MLFLOW_TRACKING_URI": tracking_uri}
    registry = team.registry(tracking_uri)
    pipeline = subprocess.Popen(
        ["roadshift", "run"],
        cwd=project,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and pipeline.poll() is None:
            training = registry.search_runs(
                [registry.get_experiment_by_name("roadshift").experiment_id],
                "tags.`roadshift.stage` = 'pretrain'",
            ) if registry.get_experiment_by_name("roadshift") else []  # fmt: skip
            if training:
                break
            time.sleep(0.25)
        assert pipeline.poll() is None, "the pipeline ended before training started"
        server.stop()  # mid-training: the tracking server goes away
        stopped_at = time.monotonic()
        output, _ = pipeline.communicate(timeout=600)
        gave_up_after_s = time.monotonic() - stopped_at
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    assert pipeline.returncode != 0
    # bounded: a few calls, each retried 3 times over ~7 s, not MLflow's default ~4 minutes
    assert gave_up_after_s < 180, f"gave up only after {gave_up_after_s:.0f} s"
    assert f"MLflow tracking server {tracking_uri} stopped answering" in output
    assert "3 retries" in output

    server = start_server()
    try:
        assert registry.search_model_versions("name = 'outage-road-signs'") == []
        rerun = subprocess.run(
            ["roadshift", "run"], cwd=project, env=run_env, capture_output=True, text=True,
            timeout=900,
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
        versions = registry.search_model_versions("name = 'outage-road-signs'")
        assert [v.version for v in versions] == ["1"]
        assert registry.get_model_version_by_alias("outage-road-signs", "champion").version == "1"
    finally:
        server.stop()
