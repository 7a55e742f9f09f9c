"""How far a production batch is from the data the champion was made on: figures and verdict.

Two views, both on the champion itself. The proxy A-distance between the batch's embeddings
and the target train images' (``roadshift.transfer.domain``, the measure the pipeline logs
between the domains) says whether the batch *looks* different to the model. The batch's
confidence (top probability) against the target test split's says whether the model *behaves*
differently on it: mean drop, Kolmogorov-Smirnov statistic and histogram overlap. Pure:
arrays in, figures out; serving code embeds the images and writes the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from roadshift.config import MonitorSection
from roadshift.transfer.domain import proxy_a_distance

HISTOGRAM_BINS = 10


@dataclass(frozen=True)
class ShiftFigures:
    batch_images: int
    reference_train_images: int
    reference_test_images: int
    domain_distance: float
    batch_mean_confidence: float
    reference_mean_confidence: float
    confidence_drop: float  # reference mean - batch mean; positive: less sure on the batch
    confidence_ks: float  # two-sample Kolmogorov-Smirnov statistic, 0..1
    confidence_overlap: float  # shared area of the two normalised histograms, 0..1
    batch_confidence_histogram: tuple[float, ...]
    reference_confidence_histogram: tuple[float, ...]

    def metrics(self) -> dict[str, float]:
        """The scalar figures, for MLflow."""
        return {
            key: float(value)
            for key, value in asdict(self).items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }


@dataclass(frozen=True)
class ShiftVerdict:
    shifted: bool
    reasons: tuple[str, ...]  # one per limit passed (empty when not shifted)
    checks: tuple[str, ...]  # one line per limit: figure, limit, pass/fail


def confidence_histogram(confidence: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Share of images per equal-width bin of [0, 1] (sums to 1)."""
    counts, _ = np.histogram(np.clip(confidence, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return counts / max(1, counts.sum())


def shift_figures(
    batch_embeddings: torch.Tensor,
    train_embeddings: torch.Tensor,
    batch_confidence: np.ndarray,
    test_confidence: np.ndarray,
    seed: int,
) -> ShiftFigures:
    """Every figure of one batch against the reference (target train / test split)."""
    from scipy.stats import ks_2samp

    batch_confidence = np.asarray(batch_confidence, dtype=np.float64)
    test_confidence = np.asarray(test_confidence, dtype=np.float64)
    batch_hist = confidence_histogram(batch_confidence)
    test_hist = confidence_histogram(test_confidence)
    return ShiftFigures(
        batch_images=len(batch_confidence),
        reference_train_images=len(train_embeddings),
        reference_test_images=len(test_confidence),
        domain_distance=proxy_a_distance(train_embeddings, batch_embeddings, seed),
        batch_mean_confidence=float(batch_confidence.mean()),
        reference_mean_confidence=float(test_confidence.mean()),
        confidence_drop=float(test_confidence.mean() - batch_confidence.mean()),
        confidence_ks=float(ks_2samp(batch_confidence, test_confidence).statistic),
        confidence_overlap=float(np.minimum(batch_hist, test_hist).sum()),
        batch_confidence_histogram=tuple(float(v) for v in batch_hist),
        reference_confidence_histogram=tuple(float(v) for v in test_hist),
    )


def _check(name: str, value: float, limit: float | None) -> tuple[str, bool]:
    if limit is None:
        return f"{name} {value:.3f} (no limit)", False
    passed = value > limit
    return f"{name} {value:.3f} {'>' if passed else '<='} {limit:g}: " + (
        "SHIFTED" if passed else "ok"
    ), passed


def shift_verdict(figures: ShiftFigures, limits: MonitorSection) -> ShiftVerdict:
    """Shifted when any figure passes its limit in ``monitor``; never for a batch too small to
    tell (``min_batch_size``)."""
    checks = [
        _check("domain distance", figures.domain_distance, limits.max_domain_distance),
        _check("confidence drop", figures.confidence_drop, limits.max_confidence_drop),
        _check("confidence KS", figures.confidence_ks, limits.max_confidence_ks),
    ]
    lines = tuple(line for line, _ in checks)
    if figures.batch_images < limits.min_batch_size:
        note = (
            f"{figures.batch_images} image(s) < monitor.min_batch_size "
            f"{limits.min_batch_size}: too few to flag"
        )
        return ShiftVerdict(False, (), (*lines, note))
    reasons = tuple(line for line, passed in checks if passed)
    return ShiftVerdict(bool(reasons), reasons, lines)
