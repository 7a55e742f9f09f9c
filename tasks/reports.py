"""Prefect tasks that put reports where people look: Prefect artifacts and the MLflow parent run."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from roadshift.config import DOMAINS
from roadshift.errors import RoadshiftError
from roadshift.layout import Layout
from tasks.dvc import StageRun

CONTACT_SHEET = Path("reports") / "contact_sheet.png"
EVALUATION_ARTIFACT_KEY = "evaluation-report"
# where the evaluate stage's report folder goes on the pipeline's parent MLflow run
EVALUATION_MLFLOW_DIR = "evaluation"
_RELATIVE_PNG_LINK = re.compile(r"\]\(([\w.-]+\.png)\)")


class ValidationGateError(RoadshiftError, RuntimeError):
    """Validation failed: the flow stops before training and leaves the registry alone."""


def _failed_expectations(domain_report: dict) -> list[str]:
    return [
        f"{e.get('expectation')}" + (f" on {e['column']}" if e.get("column") else "")
        for e in domain_report.get("expectations", [])
        if not e.get("success", True)
    ]


def validation_markdown(summary: dict, summary_path: Path) -> str:
    verdict = "passed" if summary.get("success") else "FAILED"
    lines = [
        f"## Data validation {verdict}",
        "",
        "| domain | success | failed expectations |",
        "|---|---|---|",
    ]
    for domain, report in summary.get("domains", {}).items():
        failed = ", ".join(_failed_expectations(report)) or "none"
        lines.append(f"| {domain} | {report.get('success')} | {failed} |")
    cross = summary.get("cross_domain", {})
    if cross:
        lines.append(f"| cross-domain (label set) | {cross.get('success')} | |")
    failures = summary.get("failures", [])
    if failures:
        lines += ["", "Problems:", *[f"- {line}" for line in failures]]
    lines += ["", f"Full report: `{summary_path}`"]
    return "\n".join(lines)


def validation_gate_message(summary: dict | None, report_dir: Path) -> str:
    lines = [
        "data validation failed: no training ran and the model registry was not touched; "
        f"report: {report_dir / 'summary.json'}"
    ]
    lines += [f"  - {line}" for line in (summary or {}).get("failures", [])]
    return "\n".join(lines)


def read_validation_summary(root: Path) -> dict | None:
    path = Layout(root).validation_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


@task(name="publish-validation")
def publish_validation(root: Path, mlflow_run_id: str) -> dict | None:
    """The GE summary as a Prefect artifact; the whole reports folder on the MLflow parent run."""
    from mlflow import MlflowClient

    report_dir = Layout(root).validation_dir
    summary = read_validation_summary(root)
    if summary is None:
        return None
    create_markdown_artifact(
        validation_markdown(summary, report_dir / "summary.json"),
        key="data-validation",
        description="Great Expectations results per domain",
    )
    MlflowClient().log_artifacts(mlflow_run_id, str(report_dir), "validation")
    return summary


@task(name="contact-sheet")
def publish_contact_sheet(root: Path, mlflow_run_id: str) -> Path:
    """A PNG of samples per class and domain from the prepared manifests (any data, any layout)."""
    from mlflow import MlflowClient

    from roadshift.data.contact_sheet import draw_contact_sheet
    from roadshift.data.manifest import read_manifest

    layout = Layout(root)
    manifests = {d: read_manifest(layout.manifest(d), strict=False) for d in DOMAINS}
    sheet = draw_contact_sheet(manifests, root, root / CONTACT_SHEET)
    client = MlflowClient()
    client.log_artifact(mlflow_run_id, str(sheet))
    artifact_uri = client.get_run(mlflow_run_id).info.artifact_uri.rstrip("/")
    create_markdown_artifact(
        f"## Contact sheet\n\n![contact sheet]({sheet.as_uri()})\n\n"
        f"File: `{sheet}`; MLflow: `{artifact_uri}/{sheet.name}` (run {mlflow_run_id})\n",
        key="contact-sheet",
        description="sample images per class and domain",
    )
    return sheet


def evaluation_markdown(report: str, report_dir: Path, artifact_uri: str, run_id: str) -> str:
    """``report.md`` links its figures relative to its own folder, which means nothing in the
    Prefect UI: point them at the files on disk (as the contact sheet does) and say where the
    same files are in MLflow."""
    linked = _RELATIVE_PNG_LINK.sub(
        lambda match: f"]({(report_dir / match.group(1)).as_uri()})", report
    )
    return (
        f"{linked.rstrip()}\n\nFiles: `{report_dir}`; MLflow: "
        f"`{artifact_uri}/{EVALUATION_MLFLOW_DIR}/` (run {run_id})\n"
    )


@task(name="publish-evaluation")
def publish_evaluation(root: Path, mlflow_run_id: str) -> Path | None:
    """The evaluate stage's report as a Prefect artifact; its whole folder (figures and
    report.md) on the MLflow parent run under ``evaluation/``. Also when DVC skipped the
    stage: every pipeline run then carries the report of the model it ends with."""
    from mlflow import MlflowClient

    from roadshift.evaluate.report import REPORT_DIR, REPORT_MD

    report_dir = root / REPORT_DIR
    report = report_dir / REPORT_MD
    if not report.is_file():
        return None
    client = MlflowClient()
    client.log_artifacts(mlflow_run_id, str(report_dir), EVALUATION_MLFLOW_DIR)
    artifact_uri = client.get_run(mlflow_run_id).info.artifact_uri.rstrip("/")
    create_markdown_artifact(
        evaluation_markdown(report.read_text(), report_dir, artifact_uri, mlflow_run_id),
        key=EVALUATION_ARTIFACT_KEY,
        description="target test split: fine-tuned vs baselines, intervals, calibration",
    )
    return report


@dataclass
class PipelineResult:
    """What one pipeline run did, for the summary and for the flows that call it."""

    data_versions: dict[str, str]
    stages: list[StageRun]
    metrics: dict[str, float]
    model_version: str
    aliases: list[str]
    promotion: str
    mlflow_run_id: str
    target_description: str = "target domain"
    flow_run_name: str = ""
    uncommitted_dvc_files: list[str] = field(default_factory=list)


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


def summary_markdown(result: PipelineResult) -> str:
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


def print_summary(result: PipelineResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Target test split ({result.target_description})")
    table.add_column("metric")
    for column in COMPARISON_COLUMNS:
        table.add_column(column, justify="right")
    for label, *keys in COMPARISON_ROWS:
        table.add_row(label, *(_cell(result.metrics, k) for k in keys))
    console.print(table)
    console.print(_domain_gap_line(result.metrics))
    console.print(_gain_line(result.metrics))
    console.print(
        f"Model version {result.model_version}: aliases {result.aliases}; {result.promotion}"
    )
    console.print(
        f"MLflow run {result.mlflow_run_id} (make mlflow-ui); "
        f"Prefect flow run '{result.flow_run_name}' (make prefect-ui)"
    )
    if result.uncommitted_dvc_files:
        console.print(
            "To record this run's data and model versions in git: "
            f"git add {' '.join(result.uncommitted_dvc_files)} && git commit"
        )
