"""Which unlabelled images to label next: uncertain, diverse, spread over the classes.

Pure numpy: the champion's embeddings and probabilities of the pool (and the embeddings of
what is already labelled) in, a ranked choice with a reason per image out.

- Uncertainty: the margin between the top two probabilities (``1 - margin``) or the normalised
  entropy; the model learns most from the images it cannot decide.
- Diversity: greedy k-center on cosine distance, started from the labelled images, so each
  pick is the image farthest from everything labelled or picked so far (a core-set). Pure
  uncertainty picks near-copies of one confusing scene; pure diversity picks outliers.
  The score of a candidate is ``distance x (w x uncertainty + 1 - w)``.
- Class spread: at most ``ceil(n / classes)`` picks per predicted class while other classes
  still have candidates, so one confusing class cannot take the whole budget.
- Never an image already labelled (same bytes) or a near-duplicate of one (embedding cosine
  distance or a perceptual difference hash within the limits): labelling it teaches nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Uncertainty = str  # "margin" | "entropy"


@dataclass(frozen=True)
class Suggestion:
    index: int  # row of the pool arrays
    rank: int  # 1 = chosen first
    label: str  # predicted
    confidence: float
    uncertainty: float
    distance: float  # cosine distance to the nearest labelled or earlier-chosen image
    reason: str


def uncertainty_scores(probabilities: np.ndarray, kind: Uncertainty = "margin") -> np.ndarray:
    """In [0, 1], higher = less sure. margin: ``1 - (p1 - p2)``; entropy: ``H(p) / log C``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape[1] < 2:
        return np.zeros(len(probabilities))
    if kind == "margin":
        top = np.sort(probabilities, axis=1)[:, ::-1]
        return 1.0 - (top[:, 0] - top[:, 1])
    if kind == "entropy":
        clipped = np.clip(probabilities, 1e-12, 1.0)
        return -(clipped * np.log(clipped)).sum(axis=1) / math.log(probabilities.shape[1])
    raise ValueError(f"uncertainty {kind!r}: expected 'margin' or 'entropy'")


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def nearest_cosine_distance(rows: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Per row, the cosine distance to the nearest of ``others`` (2.0 when there are none)."""
    if len(others) == 0:
        return np.full(len(rows), 2.0)
    similarity = _unit_rows(rows) @ _unit_rows(others).T
    return np.clip(1.0 - similarity.max(axis=1), 0.0, 2.0)


def hamming_to_nearest(hashes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Per 64-bit hash, the fewest differing bits to any of ``others`` (65 when none)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    others = np.asarray(others, dtype=np.uint64)
    if len(others) == 0 or len(hashes) == 0:
        return np.full(len(hashes), 65)
    xor = hashes[:, None] ^ others[None, :]
    bits = np.unpackbits(xor.view(np.uint8).reshape(len(hashes), len(others), 8), axis=2)
    return bits.sum(axis=2).min(axis=1)


@dataclass(frozen=True)
class Exclusions:
    mask: np.ndarray  # True: never suggest
    reasons: dict[int, str]


def exclusions(
    pool_embeddings: np.ndarray,
    labelled_embeddings: np.ndarray,
    pool_hashes: np.ndarray,
    labelled_hashes: np.ndarray,
    labelled_copy: np.ndarray,
    max_cosine: float,
    max_hash_bits: int,
) -> Exclusions:
    """The pool images already labelled (``labelled_copy``: same bytes) or near-duplicates of a
    labelled image (cosine distance <= ``max_cosine`` or difference hash within
    ``max_hash_bits`` bits), each with why."""
    cosine = nearest_cosine_distance(pool_embeddings, labelled_embeddings)
    bits = hamming_to_nearest(pool_hashes, labelled_hashes)
    reasons: dict[int, str] = {}
    for i in range(len(cosine)):
        if labelled_copy[i]:
            reasons[i] = "already labelled (same bytes)"
        elif cosine[i] <= max_cosine:
            reasons[i] = f"near-duplicate of a labelled image (cosine distance {cosine[i]:.3f})"
        elif bits[i] <= max_hash_bits:
            reasons[i] = f"near-duplicate of a labelled image (hash {int(bits[i])} bits apart)"
    mask = np.zeros(len(cosine), dtype=bool)
    mask[list(reasons)] = True
    return Exclusions(mask, reasons)


def _quota(n: int, predicted: np.ndarray, candidates: np.ndarray) -> int:
    classes = len(set(predicted[candidates].tolist())) or 1
    return math.ceil(n / classes)


def rank_for_labelling(
    pool_embeddings: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    labelled_embeddings: np.ndarray,
    n: int,
    *,
    uncertainty: Uncertainty = "margin",
    uncertainty_weight: float = 0.5,
    excluded: np.ndarray | None = None,
) -> list[Suggestion]:
    """Up to ``n`` pool rows in the order to label them (see the module docstring)."""
    count = len(pool_embeddings)
    excluded = np.zeros(count, dtype=bool) if excluded is None else np.asarray(excluded, bool)
    candidates = np.flatnonzero(~excluded)
    if n < 1 or len(candidates) == 0:
        return []
    units = _unit_rows(pool_embeddings)
    scores = uncertainty_scores(probabilities, uncertainty)
    predicted = np.asarray(probabilities).argmax(axis=1)
    nearest = nearest_cosine_distance(pool_embeddings, labelled_embeddings)
    nearest = np.where(np.isfinite(nearest), nearest, 2.0)
    weight = uncertainty_weight * scores + (1.0 - uncertainty_weight)
    quota = _quota(n, predicted, candidates)
    open_rows = np.zeros(count, dtype=bool)
    open_rows[candidates] = True
    per_class: dict[int, int] = {}
    order_by_uncertainty = np.argsort(np.argsort(-scores[candidates]))
    uncertainty_rank = dict(zip(candidates.tolist(), order_by_uncertainty.tolist(), strict=True))
    chosen: list[Suggestion] = []
    while len(chosen) < n and open_rows.any():
        under_quota = open_rows & np.array([per_class.get(c, 0) < quota for c in predicted])
        pool = under_quota if under_quota.any() else open_rows
        value = np.where(pool, nearest * weight, -np.inf)
        pick = int(np.argmax(value))
        cls = int(predicted[pick])
        per_class[cls] = per_class.get(cls, 0) + 1
        chosen.append(
            Suggestion(
                index=pick,
                rank=len(chosen) + 1,
                label=str(class_names[cls]),
                confidence=float(np.max(probabilities[pick])),
                uncertainty=float(scores[pick]),
                distance=float(nearest[pick]),
                reason=_reason(
                    uncertainty,
                    float(scores[pick]),
                    uncertainty_rank[pick] + 1,
                    len(candidates),
                    float(nearest[pick]),
                    str(class_names[cls]),
                    per_class[cls],
                    not under_quota.any(),
                ),
            )
        )
        open_rows[pick] = False
        nearest = np.minimum(nearest, np.clip(1.0 - units @ units[pick], 0.0, 2.0))
    return chosen


def _reason(
    kind: str,
    score: float,
    rank: int,
    of: int,
    distance: float,
    label: str,
    nth: int,
    over_quota: bool,
) -> str:
    spread = f"predicted {label}: pick {nth} of this class"
    if over_quota:
        spread += " (other classes had no candidates left)"
    return (
        f"uncertain: {kind} score {score:.2f} ({rank} of {of} most uncertain); "
        f"far from labelled and chosen images: cosine distance {distance:.2f}; {spread}"
    )
