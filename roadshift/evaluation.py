"""Classification metrics on a labelled split, as plain numbers and tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support


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
