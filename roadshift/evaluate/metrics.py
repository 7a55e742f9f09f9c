"""Classification metrics on a labelled split, as plain numbers and tables.

Two layers: ``classification_report`` needs only hard predictions (what the benchmarks
and older callers use); ``evaluate_probabilities`` starts from the softmax outputs and adds
what a point score hides: how trustworthy the confidences are (expected calibration error
with its per-bin table), where the errors go (confusion counts) and how much the score
would move on another test split of the same size (percentile bootstrap intervals).
Everything here is numpy/scikit-learn only, so it is cheap to test on synthetic arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from roadshift.config import EvaluateSection

# Bootstrap resamples are drawn in chunks of at most this many (row, resample) cells, so a
# large test split does not need a (resamples x rows) index matrix in memory at once.
_BOOTSTRAP_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class ClassificationReport:
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion_pairs: list[tuple[str, str]]

    def headline(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_accuracy": self.accuracy, f"{prefix}_macro_f1": self.macro_f1}


def classification_report(
    targets: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]
) -> ClassificationReport:
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predictions, labels=labels, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": float(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    pairs = [(class_names[t], class_names[p]) for t, p in zip(targets, predictions, strict=True)]
    return ClassificationReport(
        accuracy=float(accuracy_score(targets, predictions)),
        macro_f1=float(
            f1_score(targets, predictions, labels=labels, average="macro", zero_division=0)
        ),
        per_class=per_class,
        confusion_pairs=pairs,
    )


@dataclass(frozen=True)
class ConfusionMatrix:
    """``counts[i, j]``: test images of class ``class_names[i]`` predicted as ``class_names[j]``."""

    counts: np.ndarray
    class_names: tuple[str, ...]


def confusion_matrix(
    targets: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]
) -> ConfusionMatrix:
    """Counts over every class, including classes absent from this split (a zero row)."""
    k = len(class_names)
    flat = np.asarray(targets, dtype=np.int64) * k + np.asarray(predictions, dtype=np.int64)
    counts = np.bincount(flat, minlength=k * k).reshape(k, k)
    return ConfusionMatrix(counts=counts, class_names=tuple(class_names))


@dataclass(frozen=True)
class CalibrationBin:
    """One equal-width confidence bin ``(lower, upper]``; confidence/accuracy are NaN if empty."""

    lower: float
    upper: float
    count: int
    confidence: float
    accuracy: float


@dataclass(frozen=True)
class Calibration:
    ece: float
    bins: tuple[CalibrationBin, ...]


def calibration(probabilities: np.ndarray, targets: np.ndarray, num_bins: int) -> Calibration:
    """Expected calibration error (Guo et al. 2017) over equal-width bins of the top-1
    confidence: the count-weighted mean gap between a bin's accuracy and its mean confidence.

    Returned with the per-bin table because the single number hides *where* the model is
    over- or under-confident; the reliability diagram is drawn from the table.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == targets).astype(np.float64)
    # bin b holds (b/B, (b+1)/B]; confidence 0 (impossible for a softmax top-1) joins bin 0
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    counts = np.bincount(index, minlength=num_bins)
    confidence_sums = np.bincount(index, weights=confidence, minlength=num_bins)
    correct_sums = np.bincount(index, weights=correct, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = confidence_sums / counts
        mean_accuracy = correct_sums / counts
    total = max(len(targets), 1)
    ece = float(np.sum(np.abs(correct_sums - confidence_sums)) / total)
    bins = tuple(
        CalibrationBin(
            lower=b / num_bins,
            upper=(b + 1) / num_bins,
            count=int(counts[b]),
            confidence=float(mean_confidence[b]),
            accuracy=float(mean_accuracy[b]),
        )
        for b in range(num_bins)
    )
    return Calibration(ece=ece, bins=bins)


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval at ``level`` (e.g. 0.95) from ``samples`` resamples."""

    low: float
    high: float
    level: float
    samples: int


def _resampled_scores(
    targets: np.ndarray, predictions: np.ndarray, num_classes: int, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of each resample (one row of ``rows`` = one resample's indices).

    Per-class counts come from one ``bincount`` over (resample, class) keys, so there is no
    Python loop over resamples. Macro-F1 is the same as scikit-learn's with every class
    labelled and ``zero_division=0``: F1 = 2TP / (support + predicted), 0 when both are 0.
    """
    resamples = rows.shape[0]
    t, p = targets[rows], predictions[rows]
    correct = t == p
    offset = (np.arange(resamples, dtype=np.int64) * num_classes)[:, None]
    size = resamples * num_classes
    support = np.bincount((offset + t).ravel(), minlength=size).reshape(resamples, num_classes)
    predicted = np.bincount((offset + p).ravel(), minlength=size).reshape(resamples, num_classes)
    hits = np.bincount((offset + t)[correct], minlength=size).reshape(resamples, num_classes)
    denominator = support + predicted
    f1 = np.divide(2.0 * hits, denominator, out=np.zeros(hits.shape), where=denominator > 0)
    return correct.mean(axis=1), f1.mean(axis=1)


def bootstrap_intervals(
    targets: np.ndarray,
    predictions: np.ndarray,
    num_classes: int,
    samples: int,
    level: float,
    seed: int,
) -> dict[str, Interval]:
    """Percentile bootstrap intervals for ``accuracy`` and ``macro_f1``: the test split is
    resampled with replacement ``samples`` times (seeded, so a rerun gives the same bytes).

    A few hundred test images make a point score move by several points between splits;
    the interval says whether a "gain" is bigger than that. Empty for ``samples == 0``.
    """
    targets = np.asarray(targets, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    n = len(targets)
    if samples == 0 or n == 0:
        return {}
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // n)
    accuracies, macro_f1s = [], []
    for start in range(0, samples, chunk):
        rows = rng.integers(0, n, size=(min(chunk, samples - start), n))
        accuracy, macro_f1 = _resampled_scores(targets, predictions, num_classes, rows)
        accuracies.append(accuracy)
        macro_f1s.append(macro_f1)
    tail = (1.0 - level) / 2.0
    intervals = {}
    for name, scores in (("accuracy", accuracies), ("macro_f1", macro_f1s)):
        low, high = np.quantile(np.concatenate(scores), [tail, 1.0 - tail])
        intervals[name] = Interval(float(low), float(high), level, samples)
    return intervals


@dataclass(frozen=True)
class Evaluation:
    """Everything the evaluate stage reports about one model on one labelled split."""

    report: ClassificationReport
    confusion: ConfusionMatrix
    calibration: Calibration
    intervals: dict[str, Interval]
    probabilities: np.ndarray
    targets: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def confidences(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    def headline(self, prefix: str) -> dict[str, float]:
        """The report's headline plus the interval bounds (absent when bootstrapping is off)."""
        metrics = self.report.headline(prefix)
        for name, interval in sorted(self.intervals.items()):
            metrics[f"{prefix}_{name}_ci_low"] = interval.low
            metrics[f"{prefix}_{name}_ci_high"] = interval.high
        return metrics


def evaluate_probabilities(
    probabilities: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    cfg: EvaluateSection,
    seed: int,
) -> Evaluation:
    """All metrics from an ``(n, classes)`` array of class probabilities and the true labels."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    predictions = probabilities.argmax(axis=1)
    return Evaluation(
        report=classification_report(targets, predictions, class_names),
        confusion=confusion_matrix(targets, predictions, class_names),
        calibration=calibration(probabilities, targets, cfg.calibration_bins),
        intervals=bootstrap_intervals(
            targets,
            predictions,
            len(class_names),
            cfg.bootstrap_samples,
            cfg.confidence_level,
            seed,
        ),
        probabilities=probabilities,
        targets=targets,
    )


def worst_mistakes(evaluation: Evaluation, limit: int) -> list[int]:
    """Indices of the ``limit`` most confidently wrong rows, most confident first (ties by row,
    so the grid is the same on every run)."""
    wrong = np.flatnonzero(evaluation.predictions != evaluation.targets)
    order = np.lexsort((wrong, -evaluation.confidences[wrong]))
    return [int(i) for i in wrong[order][:limit]]
