"""``finetune.strategy: auto``: choose the strategy by cross-validation on the target labels.

Rules of thumb ("little data that looks like the source: train only the head") need
thresholds, and thresholds tuned on one pair of domains do not carry over: on a real pair
they chose feature extraction at 10 labels a class, 16 points of target accuracy below
fine-tuning. So ``auto`` measures instead. The target train split is cut into ``k``
stratified folds; for each fold, each candidate strategy (``feature_extraction``,
``fine_tune``) trains from the starting model on the other folds with a shortened schedule
(``auto.epochs_fraction`` of ``finetune.epochs``) and predicts the held-out fold; the
candidate with the higher mean held-out macro-F1 (the registry's metric) is trained on the
whole split. Only the strategies are compared: self-training, when enabled, runs after the
chosen one in either case.

The rules where the measurement cannot decide, each named in the reason:

- a tie goes to ``fine_tune`` (``TIE_WINNER``), and a lead of ``feature_extraction`` no
  larger than the standard error of the paired fold differences is a tie: fine-tuning won
  every full-schedule comparison measured so far (synthetic pair at 10, 25 and 50 labels a
  class, real pair at 10), and on short fold schedules it is the more under-trained, so
  the folds understate it (docs/transfer-learning.md has the figures);
- a class with a single train image cannot be both trained on and held out: its image
  trains in every fold and the class is not scored;
- with fewer than two classes of two or more images nothing can be scored, and ``auto``
  falls back to ``fine_tune`` (``FALLBACK``) without cross-validating.

Every fold is a pure function of the seed: the folds come from a seeded StratifiedKFold
and each fit reseeds per epoch; the global RNGs are restored afterwards, so ``auto``
choosing a strategy trains exactly the model that setting it by hand would.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from roadshift.config import FinetuneSection, Params
from roadshift.data.batch_transforms import EvalBatchTransform, create_batch_transform
from roadshift.data.dataset import ManifestDataset
from roadshift.train.loop import FitOptions, fit, make_loader, predict_logits
from roadshift.train.models import ModelSpec, head_module_name
from roadshift.train.recipe import fit_options
from roadshift.transfer.embeddings import embedding_dataset, fit_head_on_embeddings, view_loaders
from roadshift.transfer.strategies import STRATEGIES, Strategy, plan_finetune

CANDIDATES: tuple[Strategy, ...] = ("feature_extraction", "fine_tune")
TIE_WINNER: Strategy = "fine_tune"
FALLBACK: Strategy = "fine_tune"
MIN_SCORED_CLASSES = 2
TIE_TOLERANCE = 1e-9
NAMES_SHOWN = 5

FoldFitter = Callable[[Strategy, np.ndarray, np.ndarray], np.ndarray]
"""``(strategy, train rows, held-out rows) -> predicted class index of each held-out row``."""


# --- folds and scores ------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldPlan:
    """The cross-validation splits of a train split's labels.

    ``splits`` holds ``(train rows, held-out rows)`` pairs, empty when nothing can be
    scored; ``unscored`` the classes with a single image, which train in every fold.
    """

    splits: tuple[tuple[np.ndarray, np.ndarray], ...]
    scored: tuple[int, ...]
    unscored: tuple[int, ...]

    @property
    def k(self) -> int:
        return len(self.splits)


def stratified_folds(labels: Sequence[int] | np.ndarray, folds: int, seed: int) -> FoldPlan:
    """Stratified k-fold over the classes with two or more images, ``k = min(folds, smallest
    such class)``: every held-out fold then holds every scored class, so its macro-F1 covers
    them all. The single images of the other classes are added to every train part."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    scored, unscored = classes[counts >= 2], classes[counts < 2]
    if len(scored) < MIN_SCORED_CLASSES or folds < 2:
        return FoldPlan((), tuple(int(c) for c in scored), tuple(int(c) for c in unscored))
    k = int(min(folds, counts[counts >= 2].min()))
    rows = np.flatnonzero(np.isin(labels, scored))
    always = np.flatnonzero(np.isin(labels, unscored))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    splits = tuple(
        (np.sort(np.concatenate([rows[train], always])), np.sort(rows[held]))
        for train, held in splitter.split(rows, labels[rows])
    )
    return FoldPlan(splits, tuple(int(c) for c in scored), tuple(int(c) for c in unscored))


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Macro-F1 over the classes present in ``truth``: a held-out fold scores the classes
    it holds; a prediction of another class still counts against the true one's recall."""
    from sklearn.metrics import f1_score

    labels = np.unique(truth)
    return float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0))


@dataclass(frozen=True)
class CandidateScores:
    """One strategy's held-out macro-F1 on each fold."""

    strategy: Strategy
    fold_scores: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_scores))


def cross_validate(
    fit_predict: FoldFitter,
    labels: Sequence[int] | np.ndarray,
    plan: FoldPlan,
    candidates: Sequence[Strategy] = CANDIDATES,
) -> tuple[CandidateScores, ...]:
    """Each candidate's held-out macro-F1 on each fold of ``plan``."""
    labels = np.asarray(labels, dtype=np.int64)
    if plan.k == 0:
        raise ValueError("cross_validate: the fold plan has no folds to score")
    scores = []
    for strategy in candidates:
        fold_scores = []
        for train, held in plan.splits:
            predicted = np.asarray(fit_predict(strategy, train, held))
            fold_scores.append(macro_f1(labels[held], predicted))
        scores.append(CandidateScores(strategy, tuple(fold_scores)))
    return tuple(scores)


# --- the choice ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy ``auto`` picked, why, and the measurements behind it.

    ``scores`` is empty and ``folds`` 0 when no cross-validation was possible (``FALLBACK``).
    """

    strategy: Strategy
    reason: str
    domain_distance: float
    folds: int
    scores: tuple[CandidateScores, ...]

    def metrics(self) -> dict[str, float]:
        """Numbers for metrics/finetune.json and MLflow, every one finite: the distance, k
        (0: no cross-validation), each candidate's mean and fold scores."""
        metrics = {"domain_distance": self.domain_distance, "auto_cv_folds": float(self.folds)}
        for candidate in self.scores:
            metrics[f"auto_cv_{candidate.strategy}_mean"] = candidate.mean
            for fold, score in enumerate(candidate.fold_scores, start=1):
                metrics[f"auto_cv_{candidate.strategy}_fold_{fold}"] = score
        return metrics


def _class_list(indices: Sequence[int], class_names: Sequence[str]) -> str:
    names = [class_names[i] for i in indices]
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def _distance_note(distance: float) -> str:
    return f"proxy A-distance to the source {distance:.2f} (information only, not deciding)"


def fallback_choice(
    plan: FoldPlan, class_names: Sequence[str], domain_distance: float
) -> StrategyChoice:
    """No held-out fold can be scored: ``FALLBACK``, with why, and no scores."""
    reason = (
        f"auto chose {FALLBACK} without cross-validation: only {len(plan.scored)} class(es) "
        f"have 2 or more train images (cross-validation needs {MIN_SCORED_CLASSES} to score a "
        f"held-out fold), so the fallback rule applies: {FALLBACK}, the strategy that won every "
        f"comparison measured so far; {_distance_note(domain_distance)}."
    )
    return StrategyChoice(FALLBACK, reason, float(domain_distance), 0, ())


def _describe(candidate: CandidateScores) -> str:
    folds = ", ".join(f"{score:.3f}" for score in candidate.fold_scores)
    return f"{candidate.strategy} mean {candidate.mean:.3f} (folds {folds})"


def paired_standard_error(a: CandidateScores, b: CandidateScores) -> float:
    """Standard error of the mean of the per-fold differences ``a - b``: how much of the gap
    between two means the choice of folds alone could make. 0 with fewer than two folds."""
    differences = np.subtract(a.fold_scores, b.fold_scores)
    if len(differences) < 2:
        return 0.0
    return float(np.std(differences, ddof=1) / math.sqrt(len(differences)))


def _pick(scores: Sequence[CandidateScores]) -> tuple[Strategy, str]:
    """The strategy and why: the higher mean, unless ``TIE_WINNER`` trails the leader by no
    more than the paired standard error (or ``TIE_TOLERANCE``), which is a tie it wins."""
    leader = max(scores, key=lambda candidate: candidate.mean)
    by_name = {candidate.strategy: candidate for candidate in scores}
    if leader.strategy == TIE_WINNER or TIE_WINNER not in by_name:
        return leader.strategy, "the higher mean wins"
    runner = by_name[TIE_WINNER]
    gap, noise = leader.mean - runner.mean, paired_standard_error(leader, runner)
    if gap <= max(noise, TIE_TOLERANCE):
        return TIE_WINNER, (
            f"{leader.strategy} leads by {gap:.3f}, within the standard error of the paired "
            f"fold differences ({noise:.3f}): a tie, and a tie goes to {TIE_WINNER}, which won "
            "every comparison measured so far"
        )
    return leader.strategy, (
        f"the higher mean wins ({leader.strategy} leads by {gap:.3f}, more than the standard "
        f"error of the paired fold differences, {noise:.3f})"
    )


def choose_from_scores(
    scores: Sequence[CandidateScores],
    plan: FoldPlan,
    class_names: Sequence[str],
    *,
    images: int,
    epochs: int,
    domain_distance: float,
) -> StrategyChoice:
    """The higher mean wins, except that a lead over ``TIE_WINNER`` within the fold-to-fold
    noise is a tie, and ties go to ``TIE_WINNER`` (``_pick``)."""
    if len(scores) < 2:
        raise ValueError("choose_from_scores needs the scores of at least two candidates")
    if len({len(candidate.fold_scores) for candidate in scores}) != 1:
        raise ValueError("choose_from_scores needs every candidate scored on the same folds")
    means = [candidate.mean for candidate in scores]
    if not all(math.isfinite(mean) for mean in means):
        raise ValueError(f"choose_from_scores needs finite scores, got means {means}")
    strategy, why = _pick(scores)
    unscored = ""
    if plan.unscored:
        unscored = (
            f"; class(es) with a single train image ({_class_list(plan.unscored, class_names)}) "
            "train in every fold and are not scored"
        )
    reason = (
        f"auto chose {strategy}: {plan.k}-fold stratified cross-validation on the {images} "
        f"target train images ({epochs} epoch(s) a fold, macro-F1 on the held-out fold): "
        f"{'; '.join(_describe(candidate) for candidate in scores)}: {why}{unscored}; "
        f"{_distance_note(domain_distance)}."
    )
    return StrategyChoice(strategy, reason, float(domain_distance), plan.k, tuple(scores))


# --- candidates trained on a manifest's train split ------------------------------------------


def fold_epochs(section: FinetuneSection) -> int:
    """The shortened schedule: ``auto.epochs_fraction`` of ``epochs``, rounded up, at least 1."""
    return max(1, math.ceil(section.epochs * section.auto.epochs_fraction - 1e-9))


def fold_section(section: FinetuneSection) -> FinetuneSection:
    """``finetune`` with the fold schedule: fewer epochs, progressive unfreezing compressed
    by the same fraction (so as many blocks end up training), no lr finder or checkpoint."""
    unfreeze = section.progressive_unfreeze_epochs
    if unfreeze:
        unfreeze = max(1, round(unfreeze * section.auto.epochs_fraction))
    return section.model_copy(
        update={
            "epochs": fold_epochs(section),
            "progressive_unfreeze_epochs": unfreeze,
            "lr_finder": False,
            "checkpoint": False,
            "early_stopping_patience": None,  # no val split inside a fold to stop on
        }
    )


@dataclass(frozen=True)
class FoldData:
    """What every fold of one train split shares: the starting model (never trained itself:
    each fit trains a copy), the split decoded once, and, for feature extraction on the
    embedding cache, the embeddings of every view of every image (view-major)."""

    model: nn.Module
    spec: ModelSpec
    section: FinetuneSection
    options: FitOptions
    images: ManifestDataset
    train_transform: EvalBatchTransform
    embeddings: TensorDataset | None
    device: torch.device


def fold_data(
    model: nn.Module,
    spec: ModelSpec,
    train_frame: pd.DataFrame,
    root: Path,
    section: FinetuneSection,
    options: FitOptions,
    device: torch.device,
) -> FoldData:
    """Decode the train split once and, with ``embedding_cache``, embed its views once: the
    backbone is frozen under feature extraction, so every fold's head trains on rows of the
    same cache. ``section`` and ``options`` are the fold schedule's (``fold_section``)."""
    clean = create_batch_transform(spec.image_size, spec.mean, spec.std)
    augmented = create_batch_transform(spec.image_size, spec.mean, spec.std, section.augment)
    images = ManifestDataset(train_frame, root, spec.class_names, clean)
    embeddings = None
    if section.embedding_cache:
        loaders = view_loaders(
            train_frame, root, spec, section, options.seed, section.embedding_views
        )
        embeddings = embedding_dataset(model, spec.architecture, loaders, device)
    return FoldData(model, spec, section, options, images, augmented, embeddings, device)


def _fit_predict_on_embeddings(
    data: FoldData, train: np.ndarray, held: np.ndarray, options: FitOptions
) -> np.ndarray:
    if data.embeddings is None:
        raise ValueError("feature extraction on cached embeddings needs FoldData.embeddings")
    features, targets = data.embeddings.tensors
    count = len(data.images)
    views = len(targets) // count
    rows = np.concatenate([view * count + train for view in range(views)])
    model = copy.deepcopy(data.model)
    plan = plan_finetune(model, data.spec.architecture, data.section, "feature_extraction")
    fit_head_on_embeddings(
        model,
        data.spec.architecture,
        plan.param_groups,
        TensorDataset(features[rows], targets[rows]),
        None,
        options,
        batch_size=data.section.batch_size,
        device=data.device,
    )
    head = getattr(model, head_module_name(data.spec.architecture))
    held_set = TensorDataset(features[held], targets[held])  # view 0: the clean images
    loader = make_loader(held_set, data.section.batch_size, shuffle=False, seed=options.seed)
    logits, _ = predict_logits(head, loader, data.device)
    return logits.argmax(dim=1).numpy()


def _fit_predict_full_model(
    data: FoldData, strategy: Strategy, train: np.ndarray, held: np.ndarray, options: FitOptions
) -> np.ndarray:
    model = copy.deepcopy(data.model)
    plan = plan_finetune(model, data.spec.architecture, data.section, strategy)
    batch_size, seed = data.section.batch_size, options.seed
    train_loader = make_loader(
        data.images.subset(train, data.train_transform),
        batch_size,
        shuffle=True,
        seed=seed,
        num_workers=data.section.num_workers,
    )
    fit(
        model,
        plan.param_groups,
        train_loader,
        None,
        options,
        device=data.device,
        prepare_epoch=plan.prepare_epoch,
        checkpoint=None,
    )
    held_loader = make_loader(data.images.subset(held), batch_size, shuffle=False, seed=seed)
    logits, _ = predict_logits(model, held_loader, data.device)
    return logits.argmax(dim=1).numpy()


def fit_predict_fold(
    data: FoldData, strategy: Strategy, train: np.ndarray, held: np.ndarray
) -> np.ndarray:
    """Train ``strategy`` from the starting model on the ``train`` rows with the fold schedule;
    the predicted class of each ``held`` row. Feature extraction uses the embedding cache
    where the stage would; everything else the full-model loop, as the stage does."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    options = replace(data.options, description=f"{data.options.description} {strategy}")
    if strategy == "feature_extraction" and data.embeddings is not None:
        return _fit_predict_on_embeddings(data, train, held, options)
    return _fit_predict_full_model(data, strategy, train, held, options)


def train_labels(train_frame: pd.DataFrame, class_names: Sequence[str]) -> np.ndarray:
    """Class indices of the split's rows, in the model's class order."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(train_frame["label"]) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's classes {list(class_names)}")
    return np.array([index[label] for label in train_frame["label"]], dtype=np.int64)


@contextmanager
def restored_rng(device: torch.device) -> Iterator[None]:
    """Every global RNG the folds touch (torch on the CPU and ``device``, NumPy, random) is
    put back afterwards: the stage's own training must not depend on whether folds ran."""
    devices = [device.index or 0] if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def cross_validated_choice(
    model: nn.Module,
    spec: ModelSpec,
    train_frame: pd.DataFrame,
    root: Path,
    params: Params,
    device: torch.device,
    *,
    domain_distance: float,
) -> StrategyChoice:
    """``strategy: auto``: cross-validate ``CANDIDATES`` on the train split (``train_frame``)
    from ``model``, which is left as it was, with the fold schedule of ``params.finetune``
    (``fold_section``), and choose. ``FALLBACK`` where no fold can be scored."""
    section = params.finetune
    labels = train_labels(train_frame, spec.class_names)
    plan = stratified_folds(labels, section.auto.folds, params.base.seed)
    if plan.k == 0:
        return fallback_choice(plan, spec.class_names, domain_distance)
    short = fold_section(section)
    options = fit_options(short, params, "finetune auto cv")
    with restored_rng(device):
        data = fold_data(model, spec, train_frame, root, short, options, device)
        scores = cross_validate(
            lambda strategy, train, held: fit_predict_fold(data, strategy, train, held),
            labels,
            plan,
        )
    return choose_from_scores(
        scores,
        plan,
        spec.class_names,
        images=len(labels),
        epochs=short.epochs,
        domain_distance=domain_distance,
    )
