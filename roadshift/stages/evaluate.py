"""Evaluate on the fixed target test split, next to the source-only and scratch baselines.

The source-only model on the same split is what a team would ship without
transfer learning; its gap to the source test score is the domain gap, and the
fine-tuned model's lead over it is the transfer gain. The scratch model (same
architecture, target train split only) shows whether the source helped at all.
The fine-tuned model is also scored on the source test split: its drop from the
source-only model's score there is what fine-tuning forgot of the source.

Scores start from class probabilities, so besides accuracy and macro-F1 the stage
reports bootstrap intervals (is a gain bigger than test-split noise?), calibration
(can the confidences be thresholded?) and the confusion counts. Numbers go to
``metrics/`` and ``plots/`` for DVC; figures and a Markdown report for people go to
``reports/evaluation/`` (``roadshift.evaluate.report``).
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from roadshift.config import Params
from roadshift.data.dataset import split_frame
from roadshift.data.manifest import read_manifest
from roadshift.evaluate import report as eval_report
from roadshift.evaluate.metrics import (
    ClassificationReport,
    Evaluation,
    classification_report,
    evaluate_probabilities,
    worst_mistakes,
)
from roadshift.evaluate.report import ReportInputs
from roadshift.jsonio import write_json, write_metrics
from roadshift.layout import Layout
from roadshift.stages.outcome import StageOutcome
from roadshift.stages.scratch import scratch_enabled
from roadshift.train.loop import configure_runtime, predict_logits
from roadshift.train.models import load_model_dir
from roadshift.train.recipe import eval_loader


@dataclass(frozen=True)
class TestPredictions:
    """A model's class probabilities on a manifest's test split, rows in manifest order."""

    probabilities: np.ndarray
    targets: np.ndarray
    class_names: tuple[str, ...]
    paths: tuple[str, ...]  # the manifest's ``path`` column: relative to the project root


def predict_test_split(
    model_dir: Path, manifest_path: Path, root: Path, params: Params, device
) -> TestPredictions:
    model, spec = load_model_dir(model_dir, device)
    manifest = read_manifest(manifest_path)
    loader = eval_loader(manifest, "test", root, spec, params.evaluate.batch_size, params.base.seed)
    if loader is None:
        raise ValueError(f"{manifest_path}: no images in the test split to evaluate on")
    logits, targets = predict_logits(model, loader, device)
    return TestPredictions(
        probabilities=torch.softmax(logits.double(), dim=1).numpy(),
        targets=targets.numpy(),
        class_names=tuple(spec.class_names),
        paths=tuple(split_frame(manifest, "test")["path"]),
    )


def evaluate_model_dir(
    model_dir: Path, manifest_path: Path, root: Path, params: Params, device
) -> ClassificationReport:
    """Hard-prediction metrics only (the benchmarks' entry point)."""
    predictions = predict_test_split(model_dir, manifest_path, root, params, device)
    return classification_report(
        predictions.targets, predictions.probabilities.argmax(axis=1), predictions.class_names
    )


def score(predictions: TestPredictions, params: Params) -> Evaluation:
    return evaluate_probabilities(
        predictions.probabilities,
        predictions.targets,
        predictions.class_names,
        params.evaluate,
        params.base.seed,
    )


def _headline(evaluation: Evaluation, prefix: str) -> dict[str, float]:
    return {**evaluation.headline(prefix), f"{prefix}_ece": evaluation.calibration.ece}


def evaluation_metrics(
    finetuned: Evaluation,
    source_only: Evaluation,
    source_home: Evaluation,
    scratch: Evaluation | None,
    *,
    finetuned_source: Evaluation,
) -> dict[str, float]:
    """``metrics/evaluate.json``: the registry gates read ``target_macro_f1`` and the run's
    baselines (source-only and scratch target macro-F1, source test accuracy before and after
    fine-tuning), the flow's summary the accuracy/macro-F1/gap/gain keys; intervals and ECE
    sit beside them. ``source_home`` and ``finetuned_source`` are the source-only and the
    fine-tuned model on the source test split."""
    metrics = {
        **_headline(finetuned, "target"),
        **_headline(source_only, "source_only_target"),
        **source_home.headline("source_only_source"),
        **finetuned_source.headline("finetuned_source"),
        "domain_gap_accuracy": source_home.report.accuracy - source_only.report.accuracy,
        "source_accuracy_drop": source_home.report.accuracy - finetuned_source.report.accuracy,
        "transfer_gain_macro_f1": finetuned.report.macro_f1 - source_only.report.macro_f1,
        "target_min_class_recall": float(
            np.min([row["recall"] for row in finetuned.report.per_class.values()])
        ),
    }
    if scratch is not None:
        metrics.update(_headline(scratch, "scratch_target"))
        metrics["transfer_gain_over_scratch_macro_f1"] = (
            finetuned.report.macro_f1 - scratch.report.macro_f1
        )
    return metrics


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)
    return path


def write_confusion_csv(path: Path, report: ClassificationReport) -> Path:
    """One (actual, predicted) row per image: the input DVC's ``confusion`` template expects."""
    return _write_csv(path, ["actual", "predicted"], report.confusion_pairs)


def write_per_class_csv(path: Path, report: ClassificationReport) -> Path:
    rows = [
        [
            name,
            round(r["precision"], 6),
            round(r["recall"], 6),
            round(r["f1"], 6),
            int(r["support"]),
        ]
        for name, r in report.per_class.items()
    ]
    return _write_csv(path, ["class", "precision", "recall", "f1", "support"], rows)


def write_calibration_csv(path: Path, evaluation: Evaluation) -> Path:
    """Non-empty bins only: an empty bin has no accuracy, and a NaN would break DVC's plot."""
    rows = [
        [
            round(b.lower, 6),
            round(b.upper, 6),
            b.count,
            round(b.confidence, 6),
            round(b.accuracy, 6),
        ]
        for b in evaluation.calibration.bins
        if b.count
    ]
    return _write_csv(path, ["bin_lower", "bin_upper", "count", "confidence", "accuracy"], rows)


def write_human_report(
    report_dir: Path,
    metrics: dict[str, float],
    models: dict[str, Evaluation],
    target: TestPredictions,
    root: Path,
    worst_count: int,
) -> list[Path]:
    """The PNGs and ``report.md``; the folder is rebuilt so no figure from an older run
    (e.g. worst mistakes, since switched off) survives next to the new report."""
    shutil.rmtree(report_dir, ignore_errors=True)
    finetuned, source_only = models["fine-tuned"], models["source-only"]
    figures = [
        eval_report.plot_confusion_matrix(
            finetuned.confusion,
            report_dir / eval_report.CONFUSION_PNG,
            "Fine-tuned model, target test split",
        ),
        eval_report.plot_per_class(
            finetuned,
            source_only,
            report_dir / eval_report.PER_CLASS_PNG,
            "Per class, target test split",
        ),
        eval_report.plot_reliability(
            finetuned.calibration,
            report_dir / eval_report.RELIABILITY_PNG,
            "Fine-tuned model calibration",
        ),
    ]
    rows = worst_mistakes(finetuned, worst_count)
    if worst_count > 0:
        image_paths = [root / p for p in target.paths]
        figures.append(
            eval_report.plot_worst_mistakes(
                finetuned, image_paths, rows, report_dir / eval_report.WORST_MISTAKES_PNG
            )
        )
    names = finetuned.confusion.class_names
    mistakes = [
        (
            target.paths[r],
            names[int(finetuned.targets[r])],
            names[int(finetuned.predictions[r])],
            float(finetuned.confidences[r]),
        )
        for r in rows
    ]
    inputs = ReportInputs(
        metrics=metrics,
        models=models,
        finetuned="fine-tuned",
        baseline="source-only",
        mistakes=mistakes,
        figures=[f.name for f in figures],
    )
    report = eval_report.write_report(inputs, report_dir / eval_report.REPORT_MD)
    return [*figures, report]


def run_evaluate(params: Params, root: Path) -> StageOutcome:
    device = configure_runtime(params.base)
    layout = Layout(root)
    target_manifest = layout.validated_manifest("target")
    source_manifest = layout.validated_manifest("source")

    def predict(model: str, manifest: Path) -> TestPredictions:
        return predict_test_split(layout.model_dir(model), manifest, root, params, device)

    target = predict("target", target_manifest)
    models = {
        "fine-tuned": score(target, params),
        "source-only": score(predict("source", target_manifest), params),
    }
    source_home = score(predict("source", source_manifest), params)
    finetuned_source = score(predict("target", source_manifest), params)
    if params.evaluate.scratch_baseline and scratch_enabled(layout.model_dir("scratch")):
        models["scratch"] = score(predict("scratch", target_manifest), params)
    finetuned = models["fine-tuned"]
    metrics = evaluation_metrics(
        finetuned,
        models["source-only"],
        source_home,
        models.get("scratch"),
        finetuned_source=finetuned_source,
    )
    artifacts = [
        write_metrics(layout.metrics("evaluate"), metrics),
        write_json(layout.metrics_dir / "evaluate_per_class.json", finetuned.report.per_class),
        write_confusion_csv(layout.plots_dir / "confusion_target.csv", finetuned.report),
        write_per_class_csv(layout.plots_dir / "per_class_target.csv", finetuned.report),
        write_calibration_csv(layout.plots_dir / "calibration_target.csv", finetuned),
    ]
    artifacts += write_human_report(
        root / eval_report.REPORT_DIR,
        metrics,
        models,
        target,
        root,
        params.evaluate.worst_mistakes,
    )
    return StageOutcome(metrics, artifacts)
