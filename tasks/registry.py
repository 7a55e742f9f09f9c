"""Registration as a Prefect task: log the model under the pipeline's MLflow run."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from roadshift.config import Params
from roadshift.stages.register import run_register


@task(name="register", retries=2, retry_delay_seconds=5)
def register(root: Path, params: Params, parent_run_id: str, extra_tags: dict[str, str]):
    import mlflow

    with mlflow.start_run(run_name="register", parent_run_id=parent_run_id, nested=True) as run:
        mlflow.set_tag("roadshift.stage", "register")
        outcome = run_register(params, root, {**extra_tags, "mlflow.parent_run_id": parent_run_id})
        mlflow.set_tags({"registered.version": str(outcome.details["registration"].version)})
        return outcome.details["registration"], run.info.run_id
