"""Scoring a registered version on the current target test split, as the gates compare it.

Each version is scored through its own serving path (the registered pyfunc on the raw encoded
files), so the champion and the challenger are judged on the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion

from roadshift.registry.gates import Scores, scores_from_tags, tag_safe
from roadshift.registry.model_metrics import stored_figures
from roadshift.registry.tags import CHAMPION_GATE_METRIC


@dataclass(frozen=True)
class EvaluationSet:
    """A labelled split as the raw encoded files, so a registered model scores on exactly what
    the challenger was scored on, through its own serving path (no training transforms)."""

    images: tuple[bytes, ...]
    labels: tuple[str, ...]
    class_names: tuple[str, ...]
    description: str


def evaluation_set_from_manifest(
    manifest_path: Path, root: Path, split: str = "test"
) -> EvaluationSet:
    """The manifest's ``split`` rows, read as bytes; class names are the manifest's label set,
    the same set the evaluate stage's macro-F1 averages over."""
    from roadshift.data.dataset import split_frame
    from roadshift.data.manifest import class_names, read_manifest

    manifest = read_manifest(manifest_path)
    rows = split_frame(manifest, split)
    if rows.empty:
        raise ValueError(f"{manifest_path}: no images in the {split} split")
    images = tuple((Path(root) / path).read_bytes() for path in rows["path"])
    return EvaluationSet(
        images=images,
        labels=tuple(str(label) for label in rows["label"]),
        class_names=class_names(manifest),
        description=f"the {split} split of {manifest_path.name} ({len(images)} images)",
    )


def score_predictions(
    labels: tuple[str, ...], predicted: list[str], class_names: tuple[str, ...], source: str
) -> Scores:
    """Macro-F1 and per-class recall over ``class_names``, as the evaluate stage computes them
    (a label outside the set is a miss for the true class, never a class of its own)."""
    from sklearn.metrics import f1_score, recall_score

    names = list(class_names)
    macro_f1 = f1_score(labels, predicted, labels=names, average="macro", zero_division=0)
    recalls = recall_score(labels, predicted, labels=names, average=None, zero_division=0)
    recall = {tag_safe(n): float(r) for n, r in zip(names, recalls, strict=True)}
    return Scores(float(macro_f1), recall, source)


def score_model(model_uri: str, evaluation: EvaluationSet) -> Scores:
    """Load a registered pyfunc and score it on the raw images of ``evaluation``."""
    import pandas as pd

    from roadshift.registry.pyfunc import IMAGE_COLUMN
    from roadshift.registry.safe_load import load_checked_model

    # no package-version comparison against the version's requirements (~0.5 s a model,
    # a scan of every installed distribution): it warns, never changes the scores
    model = load_checked_model(model_uri, suppress_warnings=True)
    frame = model.predict(pd.DataFrame({IMAGE_COLUMN: list(evaluation.images)}))
    predicted = [str(label) for label in frame["label"]]
    return score_predictions(
        evaluation.labels, predicted, evaluation.class_names, f"scored on {evaluation.description}"
    )


class VersionScorer:
    """Scores registered versions on one evaluation set, each version once.

    Without an evaluation set, or when a version cannot be loaded, its stored metrics stand in,
    and ``Scores.source`` says so and why. A registration scores the champion before taking
    the lock and again inside it only if the champion changed meanwhile.
    """

    def __init__(
        self,
        name: str,
        evaluation: EvaluationSet | None,
        score: Callable[[str, EvaluationSet], Scores] = score_model,
        macro_f1_hint: float | None = None,
    ) -> None:
        self.name = name
        self.evaluation = evaluation
        self._score = score
        self._hint = macro_f1_hint
        self._cache: dict[str, Scores] = {}

    def __call__(self, version: ModelVersion) -> Scores:
        key = str(version.version)
        if key not in self._cache:
            self._cache[key] = self._scores(version)
        return self._cache[key]

    def _scores(self, version: ModelVersion) -> Scores:
        label = f"v{version.version}"
        if self.evaluation is None:
            stored = scores_from_tags(
                stored_figures(version), f"stored metrics of {label} (no test split given)"
            )
            if self._hint is not None:
                return replace(
                    stored, macro_f1=self._hint, source=f"{CHAMPION_GATE_METRIC} given in metrics"
                )
            return stored
        try:
            return self._score(f"models:/{self.name}/{version.version}", self.evaluation)
        except Exception as error:  # any load/predict failure: fall back, and say so
            message = " ".join(str(error).split())[:300]
            return scores_from_tags(
                stored_figures(version),
                f"stored metrics of {label}: it could not be loaded to score on "
                f"{self.evaluation.description} ({type(error).__name__}: {message})",
            )
