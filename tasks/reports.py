"""Prefect tasks that put reports where people look: Prefect artifacts and the MLflow parent run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from roadshift.config import DOMAINS
from roadshift.layout import Layout

CONTACT_SHEET = Path("reports") / "contact_sheet.png"
EVALUATION_ARTIFACT_KEY = "evaluation-report"
# where the evaluate stage's report folder goes on the pipeline's parent MLflow run
EVALUATION_MLFLOW_DIR = "evaluation"
_RELATIVE_PNG_LINK = re.compile(r"\]\(([\w.-]+\.png)\)")


class ValidationGateError(RuntimeError):
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

    from roadshift.eval_report import REPORT_DIR, REPORT_MD

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
