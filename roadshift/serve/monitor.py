"""Shift report of one production batch: measured on the champion, written three ways.

``roadshift predict --keep-unlabelled`` (or ``--shift``) calls this after predicting: the
batch is compared with the target data the champion was trained and tested on
(``roadshift.transfer.shift``), and the figures go to the console, to a JSON report under
``reports/shift/`` and to an MLflow run tagged with the model version (its metrics also linked
to the version's logged model). The scheduled-retraining flow finds the shifted batches since
the champion through those tags (``shifted_batches``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from roadshift.config import Params
from roadshift.errors import RoadshiftError
from roadshift.layout import Layout
from roadshift.serve.features import LoadedModel, features_of
from roadshift.transfer.shift import ShiftFigures, ShiftVerdict, shift_figures, shift_verdict

RUN_KIND_TAG = "roadshift.run_kind"
SHIFT_RUN_KIND = "shift-report"
SHIFTED_TAG = "shift.shifted"
BATCH_TAG = "shift.batch"
MODEL_NAME_TAG = "model.name"
MODEL_VERSION_TAG = "model.version"
REPORT_DIR = Path("reports") / "shift"


class ShiftReferenceError(RoadshiftError):
    """No target train/test images to compare a batch with."""


@dataclass(frozen=True)
class ShiftReport:
    batch: str  # the batch's name: its UTC time stamp
    inputs: tuple[str, ...]
    model_name: str
    model_version: str
    figures: ShiftFigures
    verdict: ShiftVerdict
    kept_in_pool: int | None = None
    pool_version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "batch": self.batch,
            "inputs": list(self.inputs),
            "model": {"name": self.model_name, "version": self.model_version},
            "shifted": self.verdict.shifted,
            "reasons": list(self.verdict.reasons),
            "checks": list(self.verdict.checks),
            "figures": asdict(self.figures),
            "kept_in_pool": self.kept_in_pool,
            "pool_version": self.pool_version,
        }


def batch_name(now: datetime | None = None) -> str:
    """The UTC time to the millisecond: sorts in time order, and two batches never share it."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"


def _target_manifest(params: Params, root: Path) -> pd.DataFrame:
    """What the champion was last trained on: the validated manifest, else the prepared one,
    else the target tree as prepare would list it now."""
    from roadshift.data.manifest import build_manifest, read_manifest

    layout = Layout(root)
    for path in (layout.validated_manifest("target"), layout.manifest("target")):
        if path.is_file():
            return read_manifest(path)
    target = params.data.target.path
    return build_manifest(
        target if target.is_absolute() else root / target, "target", params.prepare, root
    )


def reference_paths(params: Params, root: Path, split: str, seed: int) -> list[Path]:
    """Up to ``monitor.reference_sample_size`` target images of ``split`` (seeded sample)."""
    frame = _target_manifest(params, root)
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise ShiftReferenceError(
            f"no target {split} images to compare the batch with (data.target.path "
            f"{params.data.target.path}); run the pipeline first"
        )
    limit = params.monitor.reference_sample_size
    if len(rows) > limit:
        rows = rows.sample(n=limit, random_state=seed).sort_values("path")
    return [Path(p) if Path(p).is_absolute() else root / p for p in rows["path"]]


def measure_batch(
    loaded: LoadedModel,
    paths: Sequence[Path],
    params: Params,
    root: Path,
    name: str,
    inputs: Sequence[str] = (),
) -> ShiftReport:
    """Embed the batch and the reference with the model; figures and verdict."""
    seed = params.base.seed
    batch = features_of(loaded, paths)
    train = features_of(loaded, reference_paths(params, root, "train", seed))
    test = features_of(loaded, reference_paths(params, root, "test", seed))
    if len(batch.confidence) < 2:
        raise ShiftReferenceError(
            f"a shift report needs at least 2 images in the batch, got {len(batch.confidence)}"
        )
    figures = shift_figures(
        batch.embeddings, train.embeddings, batch.confidence, test.confidence, seed
    )
    return ShiftReport(
        batch=name,
        inputs=tuple(inputs),
        model_name=loaded.registered.name,
        model_version=loaded.registered.version,
        figures=figures,
        verdict=shift_verdict(figures, params.monitor),
    )


def format_report(report: ShiftReport) -> str:
    """The console lines."""
    f = report.figures
    head = "SHIFTED" if report.verdict.shifted else "not shifted"
    lines = [
        f"shift of batch {report.batch} ({f.batch_images} images) against "
        f"{report.model_name} v{report.model_version}'s target data: {head}",
        f"  domain distance (proxy A-distance, 0..2) to {f.reference_train_images} target "
        f"train images: {f.domain_distance:.3f}",
        f"  mean confidence: batch {f.batch_mean_confidence:.3f}, target test "
        f"{f.reference_mean_confidence:.3f} (drop {f.confidence_drop:+.3f}); KS "
        f"{f.confidence_ks:.3f}; histogram overlap {f.confidence_overlap:.3f}",
    ]
    lines += [f"  {check}" for check in report.verdict.checks]
    return "\n".join(lines)


def write_report(report: ShiftReport, root: Path) -> Path:
    out = Path(root) / REPORT_DIR / f"{report.batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    tmp.replace(out)
    return out


def log_report(report: ShiftReport, report_path: Path, model_id: str | None = None) -> str:
    """One MLflow run per batch in the current experiment, tagged with the model version;
    metrics also logged against the version's logged model when it has one. The run id."""
    import mlflow

    tags = {
        RUN_KIND_TAG: SHIFT_RUN_KIND,
        BATCH_TAG: report.batch,
        MODEL_NAME_TAG: report.model_name,
        MODEL_VERSION_TAG: report.model_version,
        SHIFTED_TAG: str(report.verdict.shifted).lower(),
    }
    with mlflow.start_run(run_name=f"shift-{report.batch}", tags=tags) as run:
        metrics = {**report.figures.metrics(), "shifted": float(report.verdict.shifted)}
        mlflow.log_metrics(metrics)
        if model_id:
            mlflow.log_metrics({f"shift.{k}": v for k, v in metrics.items()}, model_id=model_id)
        mlflow.log_artifact(str(report_path), artifact_path="shift")
        if report.verdict.reasons:
            mlflow.set_tag("shift.reasons", "; ".join(report.verdict.reasons)[:4000])
        return run.info.run_id


@dataclass(frozen=True)
class ShiftedBatch:
    batch: str
    run_id: str
    images: int
    domain_distance: float
    confidence_drop: float
    reasons: str


def shifted_batches(
    client, experiment_name: str, model_name: str, version: str
) -> list[ShiftedBatch]:
    """The batches flagged shifted against ``model_name`` v``version``, oldest first."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    query = (
        f"tags.`{RUN_KIND_TAG}` = '{SHIFT_RUN_KIND}' AND tags.`{SHIFTED_TAG}` = 'true' "
        f"AND tags.`{MODEL_NAME_TAG}` = '{model_name}' AND tags.`{MODEL_VERSION_TAG}` = '{version}'"
    )
    runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=500)
    found = [
        ShiftedBatch(
            batch=run.data.tags.get(BATCH_TAG, run.info.run_name),
            run_id=run.info.run_id,
            images=int(run.data.metrics.get("batch_images", 0)),
            domain_distance=float(run.data.metrics.get("domain_distance", float("nan"))),
            confidence_drop=float(run.data.metrics.get("confidence_drop", float("nan"))),
            reasons=run.data.tags.get("shift.reasons", ""),
        )
        for run in runs
    ]
    return sorted(found, key=lambda b: b.batch)


def shift_markdown(batches: Sequence[ShiftedBatch], champion_label: str, suggest: str) -> str:
    """The retraining decision artifact's section: what shifted, and the command to run."""
    if not batches:
        return ""
    lines = [f"## Inputs have shifted since {champion_label}: label these", ""]
    lines += [
        f"- batch {b.batch}: {b.images} images, domain distance {b.domain_distance:.2f}, "
        f"confidence drop {b.confidence_drop:+.2f} ({b.reasons or 'past a monitor limit'}; "
        f"MLflow run {b.run_id})"
        for b in batches
    ]
    lines += ["", f"Pick the images most worth labelling: `{suggest}`", ""]
    return "\n".join(lines)


def webhook_payload(report: ShiftReport, report_path: Path, run_id: str) -> dict:
    return {
        "event": "inputs-shifted",
        "model": report.model_name,
        "version": report.model_version,
        "batch": report.batch,
        "images": report.figures.batch_images,
        "domain_distance": round(report.figures.domain_distance, 4),
        "confidence_drop": round(report.figures.confidence_drop, 4),
        "reasons": list(report.verdict.reasons),
        "report": str(report_path),
        "mlflow_run_id": run_id,
    }
