"""The ``training-pipeline`` flow: version data, run the DVC stages, register the model.

The flow adds what DVC lacks (retries, the Prefect UI's logs and artifacts, the
MLflow parent run that ties the stages together, registry promotion) and leaves
"what must re-run" to DVC. With no PREFECT_API_URL it runs on Prefect's local
temporary server.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run

from roadshift.config import BaseSection, Params, load_params, params_to_dict
from roadshift.jsonio import read_json
from roadshift.layout import Layout
from roadshift.lineage import lineage_tags
from roadshift.stage_server import warm_stage_server
from tasks.dvc import StageRun, push_to_remote, version_data
from tasks.reports import (
    ValidationGateError,
    publish_contact_sheet,
    publish_evaluation,
    publish_validation,
    read_validation_summary,
    validation_gate_message,
)
from tasks.stages import STAGE_TASKS

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


# (label, fine-tuned, source-only, scratch) metric keys, all on the target test split
COMPARISON_ROWS = (
    ("accuracy", "target_accuracy", "source_only_target_accuracy", "scratch_target_accuracy"),
    ("macro-F1", "target_macro_f1", "source_only_target_macro_f1", "scratch_target_macro_f1"),
)
COMPARISON_COLUMNS = ("fine-tuned", "source-only", "scratch")


def _cell(metrics: dict[str, float], key: str) -> str:
    return f"{metrics[key]:.3f}" if key in metrics else "—"


def _domain_gap_line(metrics: dict[str, float]) -> str:
    home = metrics.get("source_only_source_accuracy", float("nan"))
    away = metrics.get("source_only_target_accuracy", float("nan"))
    return (
        f"Domain gap: the source-only model scores {home:.3f} accuracy on the source test split "
        f"and {away:.3f} on the target test split (gap {home - away:.3f})"
    )


def _gain_line(metrics: dict[str, float]) -> str:
    gains = [f"over source-only {metrics.get('transfer_gain_macro_f1', float('nan')):+.3f}"]
    if "transfer_gain_over_scratch_macro_f1" in metrics:
        gains.append(f"over scratch {metrics['transfer_gain_over_scratch_macro_f1']:+.3f}")
    return "Transfer gain (macro-F1): " + ", ".join(gains)


def _comparison_table(metrics: dict[str, float]) -> str:
    lines = [
        f"| target test split | {' | '.join(COMPARISON_COLUMNS)} |",
        "|---|---|---|---|",
    ]
    for label, *keys in COMPARISON_ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(metrics, k) for k in keys) + " |")
    return "\n".join(lines)


def _summary_markdown(result: PipelineResult) -> str:
    stages = "\n".join(
        f"- {run.stage}: {run.status} ({run.seconds:.1f} s)" for run in result.stages
    )
    versions = ", ".join(f"{d}={v}" for d, v in result.data_versions.items())
    return (
        f"## roadshift training pipeline\n\n{_comparison_table(result.metrics)}\n\n"
        f"{_domain_gap_line(result.metrics)}\n\n{_gain_line(result.metrics)}\n\n"
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
    for column in COMPARISON_COLUMNS:
        table.add_column(column, justify="right")
    for label, *keys in COMPARISON_ROWS:
        table.add_row(label, *(_cell(result.metrics, k) for k in keys))
    console.print(table)
    console.print(_domain_gap_line(result.metrics))
    console.print(_gain_line(result.metrics))
    for run in result.stages:
        console.print(f"  {run.stage:<9} {run.status} ({run.seconds:.1f} s)")
    console.print(
        f"Model version {result.model_version}: aliases {result.aliases}; {result.promotion}"
    )


# What registration imports (~2 s: torchvision pulls in torch._dynamo, and MLflow's pyfunc)
REGISTRATION_MODULES = ("torchvision.models", "tasks.registry")


def _import_for_registration_meanwhile() -> None:
    """A run that trains registers, and registration loads models in this process. The
    stages run in other processes while this one waits: import what it needs meanwhile,
    in the background, rather than before the first stage or after the last."""

    def import_quietly() -> None:
        for name in REGISTRATION_MODULES:
            with contextlib.suppress(Exception):  # registration imports it again, and reports
                importlib.import_module(name)

    threading.Thread(target=import_quietly, name="import-for-registration", daemon=True).start()


def _side_by_side(base: BaseSection) -> tuple[str, ...]:
    """The stages to train at the same time here; none where the machine does not allow."""
    from roadshift.cores import TRAINED_SIDE_BY_SIDE, side_by_side_refusal

    refusal = side_by_side_refusal(base)
    if refusal is not None:
        names = " and ".join(TRAINED_SIDE_BY_SIDE)
        get_run_logger().info("%s train one after the other: %s", names, refusal)
        return ()
    return TRAINED_SIDE_BY_SIDE


def _steps(base: BaseSection) -> Iterator[tuple[str, ...]]:
    """The stages in order, one per step, but those trained side by side in one step
    (decided on reaching them)."""
    from roadshift.cores import TRAINED_SIDE_BY_SIDE

    pending = list(STAGE_TASKS)
    while pending:
        name = pending.pop(0)
        together = _side_by_side(base) if name in TRAINED_SIDE_BY_SIDE else ()
        pending = [other for other in pending if other not in together]
        yield together or (name,)


def _reproduce(root: Path, names: tuple[str, ...]) -> list[StageRun]:
    """One stage, or several in tasks of their own at once. All are waited for before a
    failure is raised, so one failing never cuts the other's run short."""
    if len(names) == 1:
        return [STAGE_TASKS[names[0]](root, names[0])]
    futures = [STAGE_TASKS[name].submit(root, name) for name in names]
    wait(futures)
    return [future.result() for future in futures]


def _run_stages(
    root: Path, params: Params, mlflow_run_id: str, reports: list[PrefectFuture]
) -> list[StageRun]:
    """Each DVC stage in order (two training stages side by side where the machine
    allows); reports go out as soon as their stage is done, beside the next step (their
    futures are added to ``reports``). The validation report comes first: it gates.

    A failing validation stops here, before any training and before the registry.
    """
    runs: list[StageRun] = []
    with contextlib.chdir(root):  # DVC's working directory, the same for every task thread
        for names in _steps(params.base):
            trained_before = any(run.ran for run in runs)
            try:
                runs.extend(_reproduce(root, names))
            except Exception as error:
                if names != ("validate",):
                    raise
                publish_validation(root, mlflow_run_id)
                message = validation_gate_message(
                    read_validation_summary(root), Layout(root).validation_dir
                )
                raise ValidationGateError(message) from error
            if not trained_before and any(run.ran for run in runs):
                _import_for_registration_meanwhile()
            if names == ("prepare",):
                reports.append(publish_contact_sheet.submit(root, mlflow_run_id))
            elif names == ("validate",):
                publish_validation(root, mlflow_run_id)
            elif names == ("evaluate",):
                reports.append(publish_evaluation.submit(root, mlflow_run_id))
    return runs


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(root: str = ".") -> PipelineResult:
    import mlflow

    from roadshift.tracking import (
        configure_tracking,
        explain_tracking_outage,
        flatten_params,
        resolve_tracking_uri,
    )

    logger = get_run_logger()
    root_path = Path(root).resolve()
    params: Params = load_params(root_path / "params.yaml")
    tracking_uri = resolve_tracking_uri(params.tracking, root_path)
    warm = ExitStack()
    with warm:
        # one process that has imported torch, MLflow and GX forks for each stage command
        warm.enter_context(warm_stage_server(tracking_uri))
        data_versions = version_data(root_path, params)
        logger.info("data versions: %s", data_versions)

        prefect_tags = {"prefect.flow_run_id": str(flow_run.get_id() or "")}
        tags = {**lineage_tags(params, root_path, prefect_tags), "roadshift.stage": "pipeline"}
        with explain_tracking_outage(tracking_uri, "running the training pipeline"):
            configure_tracking(params, root_path)
            with mlflow.start_run(run_name="training-pipeline", tags=tags) as parent:
                mlflow.log_params(flatten_params(params))
                mlflow.log_dict(params_to_dict(params), "resolved_params.json")
                reports: list[PrefectFuture] = []  # published while the next step runs
                try:
                    with _parent_run_env(parent.info.run_id):
                        stage_runs = _run_stages(root_path, params, parent.info.run_id, reports)
                    # a server this flow started stops here, its memory not needed to
                    # register; one `roadshift run` started (before Prefect) stays to the end
                    warm.close()
                    metrics = read_json(Layout(root_path).metrics("evaluate"))
                    mlflow.log_metrics(metrics)
                    from tasks.registry import register

                    registration, _ = register(root_path, params, parent.info.run_id, prefect_tags)
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
    )
    create_markdown_artifact(
        _summary_markdown(result), key="training-summary", description="roadshift pipeline run"
    )
    _print_summary(result)
    return result
