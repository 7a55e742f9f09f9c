"""The ``training-pipeline`` flow: version data, run the DVC stages, register the model.

The flow adds what DVC lacks (retries, the Prefect UI's logs and artifacts, the
MLflow parent run that ties the stages together, registry promotion) and leaves
"what must re-run" to DVC. With no PREFECT_API_URL it runs on Prefect's local
temporary server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run

from roadshift.config import Params, load_params, params_to_dict
from roadshift.data.mlflow_inputs import log_data_inputs, short_versions
from roadshift.jsonio import read_metrics
from roadshift.layout import Layout
from roadshift.registry.lineage import lineage_tags, uncommitted_dvc_files
from roadshift.supervise import owner_tag
from roadshift.tracking import OWNER_TAG, PARENT_RUN_ENV
from tasks.dvc import StageRun, push_to_remote, version_data
from tasks.registry import register
from tasks.reports import (
    PipelineResult,
    ValidationGateError,
    print_summary,
    publish_contact_sheet,
    publish_evaluation,
    publish_validation,
    read_validation_summary,
    summary_markdown,
    validation_gate_message,
)
from tasks.stages import STAGE_TASKS

__all__ = ["PipelineResult", "training_pipeline"]


@contextmanager
def _parent_run_env(run_id: str) -> Iterator[None]:
    """Stage commands run in DVC's subprocesses; they find their parent run through this."""
    previous = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = previous


def _run_stages(root: Path, mlflow_run_id: str, reports: list[PrefectFuture]) -> list[StageRun]:
    """Each DVC stage in order; reports go out beside the next stage (their futures are
    added to ``reports``). A failing validation stops here, before any training and
    before the registry, with the validation report's own message."""
    runs: list[StageRun] = []
    for name, stage_task in STAGE_TASKS.items():
        try:
            runs.append(stage_task(root, name))
            announce(f"{name}: {runs[-1].status} ({runs[-1].seconds:.1f} s)")
        except Exception as error:
            if name != "validate":
                raise
            publish_validation(root, mlflow_run_id)
            message = validation_gate_message(
                read_validation_summary(root), Layout(root).validation_dir
            )
            raise ValidationGateError(message) from error
        if name == "prepare":
            reports.append(publish_contact_sheet.submit(root, mlflow_run_id))
        elif name == "validate":
            publish_validation(root, mlflow_run_id)
        elif name == "evaluate":
            reports.append(publish_evaluation.submit(root, mlflow_run_id))
    return runs


def announce(message: str) -> None:
    """A line for the person at the console and for the flow run's log in the Prefect UI
    (the console shows only Prefect's warnings: roadshift.console)."""
    print(message, flush=True)
    get_run_logger().info(message)


@flow(name="training-pipeline")
def training_pipeline(root: str = ".") -> PipelineResult:
    import mlflow

    from roadshift.tracking import (
        configure_tracking,
        explain_tracking_outage,
        flatten_params,
        resolve_tracking_uri,
    )

    root_path = Path(root).resolve()
    params: Params = load_params(root_path / "params.yaml")
    tracking_uri = resolve_tracking_uri(params.tracking, root_path)
    data_versions = version_data(root_path, params)
    announce(
        "data versions: "
        + ", ".join(f"{name} {version[:8]}" for name, version in data_versions.items())
    )

    prefect_tags = {"prefect.flow_run_id": str(flow_run.get_id() or "")}
    tags = {
        **lineage_tags(params, root_path, prefect_tags),
        "roadshift.stage": "pipeline",
        OWNER_TAG: owner_tag(),
    }
    with explain_tracking_outage(tracking_uri, "running the training pipeline"):
        configure_tracking(params, root_path)
        # The run's name says what it is: its data versions, then the version it registered.
        with mlflow.start_run(
            run_name=f"pipeline {short_versions(data_versions)}", tags=tags
        ) as parent:
            log_data_inputs(params, root_path, "pipeline")
            mlflow.log_params(flatten_params(params))
            mlflow.log_dict(params_to_dict(params), "resolved_params.json")
            reports: list[PrefectFuture] = []
            try:
                with _parent_run_env(parent.info.run_id):
                    stage_runs = _run_stages(root_path, parent.info.run_id, reports)
                metrics = read_metrics(Layout(root_path).metrics("evaluate"))
                mlflow.log_metrics(metrics)
                registration, _ = register(root_path, params, parent.info.run_id, prefect_tags)
                mlflow.MlflowClient().update_run(
                    parent.info.run_id,
                    name=f"pipeline v{registration.version} {short_versions(data_versions)}",
                )
            finally:
                wait(reports)
            for report in reports:
                report.result()  # a report that could not be published fails the run
    push_to_remote(root_path)

    result = PipelineResult(
        data_versions=data_versions,
        stages=stage_runs,
        metrics=metrics,
        model_version=str(registration.version),
        aliases=sorted(registration.aliases),
        promotion=registration.reason,
        mlflow_run_id=parent.info.run_id,
        target_description=params.data.target.description,
        flow_run_name=str(flow_run.get_name() or ""),
        uncommitted_dvc_files=uncommitted_dvc_files(root_path),
    )
    create_markdown_artifact(
        summary_markdown(result), key="training-summary", description="roadshift pipeline run"
    )
    print_summary(result)
    return result
