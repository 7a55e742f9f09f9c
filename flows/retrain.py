"""Scheduled retraining: retrain only when data or params moved past the champion's lineage.

Run on a schedule by ``roadshift serve-schedule`` (a local Prefect server and a
runner in one command) or by a worker of a process work pool through the
deployment in ``prefect.yaml``. Either way the deployment has a concurrency
limit of 1, so two retrainings never overlap. A run that finds nothing new ends
in seconds with a "nothing to retrain" artifact; otherwise it runs the training
pipeline as a subflow (DVC skips the stages whose inputs did not change, so
source pretraining is not repeated for new target data; failed tasks retry on
their own) and the registry's gates decide on promotion.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import Flow, FlowRun, State

from flows.pipeline import PipelineResult, training_pipeline
from roadshift.config import Params, load_params
from roadshift.registry.lineage import params_hash
from roadshift.registry.retraining import RetrainDecision, retrain_decision
from tasks.dvc import version_data
from tasks.notify import notify, notify_quietly

DECISION_ARTIFACT_KEY = "retraining-decision"


@dataclass
class RetrainOutcome:
    retrained: bool
    reason: str
    pipeline: PipelineResult | None = None


@task(name="compare-with-champion")
def compare_with_champion(
    root: Path, params: Params, data_versions: dict[str, str]
) -> RetrainDecision:
    from mlflow import MlflowClient

    from roadshift.registry.aliases import champion_version
    from roadshift.tracking import configure_tracking

    configure_tracking(params, root)
    champion = champion_version(MlflowClient(), params.register.model_name)
    return retrain_decision(
        champion.tags if champion else None,
        f"v{champion.version}" if champion else None,
        data_versions,
        params_hash(params),
    )


SUGGEST_COMMAND = "roadshift label suggest --n 40"


@task(name="shifted-inputs")
def shifted_inputs(root: Path, params: Params) -> str:
    """Markdown listing the production batches flagged shifted against the champion (``roadshift
    predict --shift/--keep-unlabelled``), with the command that picks what to label; empty
    when none or no champion."""
    from mlflow import MlflowClient

    from roadshift.registry.aliases import champion_version
    from roadshift.serve.monitor import shift_markdown, shifted_batches
    from roadshift.tracking import configure_tracking

    configure_tracking(params, root)
    client = MlflowClient()
    name = params.register.model_name
    champion = champion_version(client, name)
    if champion is None:
        return ""
    batches = shifted_batches(client, params.tracking.experiment, name, str(champion.version))
    return shift_markdown(batches, f"v{champion.version}", SUGGEST_COMMAND)


def _notify_failure(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """Prefect on_failure hook: tell the team, if a webhook block is configured."""
    root = Path(flow_run.parameters.get("root", ".")).resolve()
    try:
        block = load_params(root / "params.yaml").retrain.notify_webhook_block
    except Exception:  # a broken params file is the failure being reported; nothing to send to
        return
    payload = {
        "event": "retraining-failed",
        "flow_run": flow_run.name,
        "state": state.name,
        "message": str(state.message or ""),
    }
    notify_quietly(block, payload)


@flow(name="scheduled-retraining", log_prints=True, on_failure=[_notify_failure])
def scheduled_retraining(root: str = ".") -> RetrainOutcome:
    root_path = Path(root).resolve()
    params = load_params(root_path / "params.yaml")
    data_versions = version_data(root_path, params)
    decision = compare_with_champion(root_path, params, data_versions)
    print(decision.reason)
    shifted = shifted_inputs(root_path, params)
    if shifted:
        print(shifted)
    if not decision.retrain:
        create_markdown_artifact(
            f"## Nothing to retrain\n\n{decision.reason}\n\n{shifted}",
            key=DECISION_ARTIFACT_KEY,
            description="scheduled retraining: no new data or params",
        )
        return RetrainOutcome(retrained=False, reason=decision.reason)
    create_markdown_artifact(
        "## Retraining\n\n"
        + "\n".join(f"- {change}" for change in decision.changes)
        + f"\n\n{shifted}",
        key=DECISION_ARTIFACT_KEY,
        description="scheduled retraining: what changed since the champion",
    )
    result = training_pipeline(root=str(root_path))
    if "champion" in result.aliases:
        notify(
            params.retrain.notify_webhook_block,
            {
                "event": "champion",
                "model": params.register.model_name,
                "version": result.model_version,
                "reason": result.promotion,
                "target_macro_f1": result.metrics.get("target_macro_f1"),
            },
        )
    return RetrainOutcome(retrained=True, reason=decision.reason, pipeline=result)


def retraining_deployment(root: Path, params: Params):
    """What `roadshift serve-schedule` serves: params.yaml's cron, one run at a time."""
    from prefect.schedules import Cron

    return scheduled_retraining.to_deployment(
        name=params.retrain.deployment,
        schedules=[Cron(params.retrain.cron, timezone=params.retrain.timezone)],
        concurrency_limit=1,
        parameters={"root": str(root)},
        description="retrain when the data or params moved past the champion's lineage",
        tags=["roadshift"],
    )


@contextmanager
def prefect_api(port: int = 4200) -> Iterator[str]:
    """The Prefect API to serve against: ``PREFECT_API_URL`` if set, else a local server.

    Prefect's temporary server runs no scheduler, so a cron schedule needs a real
    one: started here (SQLite under ``PREFECT_HOME``, bound to 127.0.0.1) for as
    long as the runner serves, and stopped with it.
    """
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    url = f"http://127.0.0.1:{port}/api"
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_health(url, server, timeout_s=180)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_health(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode} before serving")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"prefect server at {url} did not answer within {timeout_s:.0f} s")


def serve_schedule(root: Path, port: int = 4200) -> None:
    """Serve the retraining deployment on its cron until interrupted (Ctrl-C)."""
    from prefect import serve

    params = load_params(root / "params.yaml")
    with prefect_api(port) as url:
        print(
            f"serving {params.retrain.deployment} ({params.retrain.cron} "
            f"{params.retrain.timezone}) on {url}; Ctrl-C stops"
        )
        serve(retraining_deployment(root, params))
