"""The ``training-pipeline`` flow: version data, run the DVC stages, register the model.

The flow adds what DVC lacks (retries, the Prefect UI's logs and artifacts, the
MLflow parent run that ties the stages together, registry promotion) and leaves
"what must re-run" to DVC. With no PREFECT_API_URL it runs on Prefect's local
temporary server.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from roadshift.config import Params, load_params, params_to_dict
from roadshift.layout import Layout
from roadshift.lineage import lineage_tags
from tasks.dvc import StageRun, push_to_remote, version_data
from tasks.registry import register
from tasks.stages import IN_ORDER

PARENT_RUN_ENV = "ROADSHIFT_PARENT_RUN_ID"


@dataclass
class PipelineResult:
    data_versions: dict[str, str]
    stages: list[StageRun]
    metrics: dict[str, float]
    model_version: str
    aliases: list[str]
    promotion: str
    mlflow_run_id: str
    notes: list[str] = field(default_factory=list)


@contextmanager
def _parent_run_env(run_id: str):
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


def _comparison_table(metrics: dict[str, float]) -> str:
    rows = [
        ("accuracy", "target_accuracy", "source_only_target_accuracy"),
        ("macro-F1", "target_macro_f1", "source_only_target_macro_f1"),
    ]
    lines = [
        "| target test split | fine-tuned | source-only |",
        "|---|---|---|",
    ]
    for label, tuned, baseline in rows:
        lines.append(
            f"| {label} | {metrics.get(tuned, float('nan')):.3f} "
            f"| {metrics.get(baseline, float('nan')):.3f} |"
        )
    return "\n".join(lines)


def _summary_markdown(result: PipelineResult) -> str:
    stages = "\n".join(
        f"- {run.stage}: {run.status} ({run.seconds:.1f} s)" for run in result.stages
    )
    versions = ", ".join(f"{d}={v}" for d, v in result.data_versions.items())
    gap = result.metrics.get("domain_gap_accuracy", float("nan"))
    return (
        f"## roadshift training pipeline\n\n{_comparison_table(result.metrics)}\n\n"
        f"Domain gap (source-only model, source test minus target test accuracy): {gap:.3f}\n\n"
        f"Stages:\n{stages}\n\nData versions: {versions}\n\n"
        f"Registered model version {result.model_version} (aliases: "
        f"{', '.join(result.aliases) or 'none'}); {result.promotion}\n"
    )


def _print_summary(result: PipelineResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Target test split (Indian roads)")
    table.add_column("metric")
    table.add_column("fine-tuned", justify="right")
    table.add_column("source-only", justify="right")
    for label, tuned, baseline in (
        ("accuracy", "target_accuracy", "source_only_target_accuracy"),
        ("macro-F1", "target_macro_f1", "source_only_target_macro_f1"),
    ):
        table.add_row(label, f"{result.metrics[tuned]:.3f}", f"{result.metrics[baseline]:.3f}")
    console.print(table)
    for run in result.stages:
        console.print(f"  {run.stage:<9} {run.status} ({run.seconds:.1f} s)")
    console.print(
        f"Model version {result.model_version}: aliases {result.aliases}; {result.promotion}"
    )


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(root: str = ".") -> PipelineResult:
    import mlflow

    from roadshift.tracking import configure_tracking, flatten_params

    logger = get_run_logger()
    root_path = Path(root).resolve()
    params: Params = load_params(root_path / "params.yaml")
    data_versions = version_data(root_path, params)
    logger.info("data versions: %s", data_versions)

    configure_tracking(params, root_path)
    prefect_tags = {"prefect.flow_run_id": str(flow_run.get_id() or "")}
    tags = {**lineage_tags(params, root_path, prefect_tags), "roadshift.stage": "pipeline"}
    with mlflow.start_run(run_name="training-pipeline", tags=tags) as parent:
        mlflow.log_params(flatten_params(params))
        mlflow.log_dict(params_to_dict(params), "resolved_params.json")
        with _parent_run_env(parent.info.run_id):
            stage_runs = [stage_task(root_path, name) for name, stage_task in IN_ORDER]
        metrics = json.loads(Layout(root_path).metrics("evaluate").read_text())
        mlflow.log_metrics(metrics)
        registration, _ = register(root_path, params, parent.info.run_id, prefect_tags)
    push_to_remote(root_path)

    result = PipelineResult(
        data_versions=data_versions,
        stages=stage_runs,
        metrics=metrics,
        model_version=str(registration.version),
        aliases=sorted(registration.aliases),
        promotion=registration.reason,
        mlflow_run_id=parent.info.run_id,
    )
    create_markdown_artifact(
        _summary_markdown(result), key="training-summary", description="roadshift pipeline run"
    )
    _print_summary(result)
    return result
