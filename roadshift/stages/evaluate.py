"""Evaluate on the fixed target test split, next to the source-only and scratch baselines.

The source-only model on the same split is what a team would ship without
transfer learning; its gap to the source test score is the domain gap, and the
fine-tuned model's lead over it is the transfer gain. The scratch model (same
architecture, target train split only) shows whether the source helped at all.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from roadshift.config import Params
from roadshift.data.manifest import read_manifest
from roadshift.evaluation import ClassificationReport, classification_report
from roadshift.jsonio import write_json
from roadshift.layout import Layout
from roadshift.models import load_model_dir
from roadshift.stages.common import StageOutcome, eval_loader
from roadshift.stages.scratch import scratch_enabled
from roadshift.training import configure_runtime, predict_logits


def evaluate_model_dir(
    model_dir: Path, manifest_path: Path, root: Path, params: Params, device
) -> ClassificationReport:
    model, spec = load_model_dir(model_dir, device)
    manifest = read_manifest(manifest_path)
    loader = eval_loader(manifest, "test", root, spec, params.evaluate.batch_size, params.base.seed)
    if loader is None:
        raise ValueError(f"{manifest_path}: no images in the test split to evaluate on")
    logits, targets = predict_logits(model, loader, device)
    return classification_report(targets.numpy(), logits.argmax(dim=1).numpy(), spec.class_names)


def _write_confusion_csv(path: Path, report: ClassificationReport) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows(report.confusion_pairs)
    return path


def run_evaluate(params: Params, root: Path) -> StageOutcome:
    device = configure_runtime(params.base)
    layout = Layout(root)
    target_manifest, source_manifest = (
        layout.validated_manifest("target"),
        layout.validated_manifest("source"),
    )
    finetuned = evaluate_model_dir(
        layout.model_dir("target"), target_manifest, root, params, device
    )
    source_only = evaluate_model_dir(
        layout.model_dir("source"), target_manifest, root, params, device
    )
    source_home = evaluate_model_dir(
        layout.model_dir("source"), source_manifest, root, params, device
    )
    metrics = {
        **finetuned.headline("target"),
        **source_only.headline("source_only_target"),
        **source_home.headline("source_only_source"),
        "domain_gap_accuracy": source_home.accuracy - source_only.accuracy,
        "transfer_gain_macro_f1": finetuned.macro_f1 - source_only.macro_f1,
        "target_min_class_recall": float(
            np.min([row["recall"] for row in finetuned.per_class.values()])
        ),
    }
    if params.evaluate.scratch_baseline and scratch_enabled(layout.model_dir("scratch")):
        scratch = evaluate_model_dir(
            layout.model_dir("scratch"), target_manifest, root, params, device
        )
        metrics.update(scratch.headline("scratch_target"))
        metrics["transfer_gain_over_scratch_macro_f1"] = finetuned.macro_f1 - scratch.macro_f1
    metrics_path = write_json(layout.metrics("evaluate"), metrics)
    per_class_path = write_json(layout.metrics_dir / "evaluate_per_class.json", finetuned.per_class)
    confusion_path = _write_confusion_csv(layout.plots_dir / "confusion_target.csv", finetuned)
    return StageOutcome(metrics, [metrics_path, per_class_path, confusion_path])
