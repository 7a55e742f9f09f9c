"""Target-domain fine-tuning, starting from the source model.

Two strategies: train only the head on frozen features (``feature_extraction``), or let
the backbone adapt too, at smaller, layer-wise decaying learning rates (``fine_tune``).
Which one suits a target is an empirical question (a size-and-distance rule of thumb picked
the worse one by 16 points on a real pair), so ``auto`` cross-validates both on the target
train split and trains the better (``roadshift.transfer.selection``); the proxy A-distance
between source and target embeddings is still measured and logged, for information. How
each strategy trains is planned in ``roadshift.transfer``; this stage wires data, plan and
loop together.

After fine-tuning, ``finetune.self_training`` adapts the model to unlabelled target images
(``roadshift.transfer.self_training``: FixMatch/AdaMatch-style pseudo-labels); with a
target val split, the self-trained weights are kept only if they do better on it. The
unlabelled images are ``run_finetune``'s ``unlabelled_images``; without them, the target
train images stand in, their labels unused by the unlabelled loss.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from roadshift.config import FinetuneSection, Params
from roadshift.data.batch_transforms import create_batch_transform
from roadshift.data.dataset import ManifestDataset, split_frame
from roadshift.data.decoded import decoded_images
from roadshift.data.manifest import class_names, read_manifest, read_unlabeled_manifest
from roadshift.errors import RoadshiftError
from roadshift.jsonio import write_metrics
from roadshift.layout import Layout
from roadshift.stages.outcome import StageOutcome
from roadshift.train.distributed import current_group
from roadshift.train.loop import (
    TrainResult,
    accuracy,
    configure_runtime,
    fit,
    make_loader,
    predict_logits,
)
from roadshift.train.models import ModelSpec, load_model_dir, save_model_dir
from roadshift.train.recipe import (
    EpochCallback,
    eval_loader,
    fit_options,
    stage_checkpointing,
    train_loader,
    tune_learning_rate,
)
from roadshift.transfer.domain import embed, proxy_a_distance
from roadshift.transfer.embeddings import fit_head_with_embedding_cache
from roadshift.transfer.selection import StrategyChoice, cross_validated_choice, restored_rng
from roadshift.transfer.self_training import (
    LabelledImages,
    SelfTrainingResult,
    UInt8Images,
    augmented_views,
    self_train,
)
from roadshift.transfer.strategies import FinetunePlan, plan_finetune, reestimate_batchnorm


class LabelSetMismatchError(RoadshiftError, ValueError):
    """The target classes differ from the ones the source model learned."""


def _check_label_sets(source: tuple[str, ...], target: tuple[str, ...]) -> None:
    if source == target:
        return
    only_source = sorted(set(source) - set(target))
    only_target = sorted(set(target) - set(source))
    raise LabelSetMismatchError(
        "source and target domains must share one label set: "
        f"only in source: {only_source or 'none'}; only in target: {only_target or 'none'}"
    )


# --- strategy -------------------------------------------------------------------------------


def _train_sample_loader(
    manifest: pd.DataFrame, root: Path, spec: ModelSpec, size: int, seed: int, batch_size: int
) -> DataLoader:
    """Up to ``size`` train images drawn at random: manifests are sorted by path, hence by
    class, so the first ``size`` rows would measure a few classes, not the domain."""
    frame = split_frame(manifest, "train")
    if frame.empty:
        raise ValueError("the manifest has no images in the train split to measure")
    sample = frame.sample(n=min(size, len(frame)), random_state=seed).index
    transform = create_batch_transform(spec.image_size, spec.mean, spec.std)
    dataset = ManifestDataset(frame, root, spec.class_names, transform).subset(sample)
    return make_loader(dataset, batch_size, shuffle=False, seed=seed)


def measure_domain_distance(
    model: nn.Module,
    spec: ModelSpec,
    source: pd.DataFrame,
    target: pd.DataFrame,
    root: Path,
    params: Params,
    device: torch.device,
) -> float:
    """The proxy A-distance between samples of both train splits, embedded by the source
    model: how large the shift is. Logged for information; it no longer decides anything."""
    auto, seed = params.finetune.auto, params.base.seed
    batch_size = params.evaluate.batch_size
    embeddings = [
        embed(
            model,
            spec.architecture,
            _train_sample_loader(manifest, root, spec, auto.sample_size, seed, batch_size),
            device,
        )
        for manifest in (source, target)
    ]
    return proxy_a_distance(*embeddings, seed=seed)


def _domain_distance(
    model: nn.Module,
    spec: ModelSpec,
    target: pd.DataFrame,
    root: Path,
    params: Params,
    device: torch.device,
) -> float:
    """``measure_domain_distance`` against the validated source manifest, printed. The global
    RNGs are restored (a DataLoader draws its base seed from torch's), so that ``auto``
    trains exactly what naming its choice in params.yaml trains."""
    source = read_manifest(Layout(root).validated_manifest("source"))
    with restored_rng(device):
        distance = measure_domain_distance(model, spec, source, target, root, params, device)
    print(f"finetune: proxy A-distance source -> target {distance:.2f} (information only)")
    return distance


def _print_choice(choice: StrategyChoice, seconds: float) -> None:
    """Every candidate's fold scores and mean, then the choice with its reason."""
    for candidate in choice.scores:
        folds = ", ".join(f"{score:.3f}" for score in candidate.fold_scores)
        print(
            f"finetune: auto cv {candidate.strategy}: held-out macro-F1 {folds}; "
            f"mean {candidate.mean:.3f}"
        )
    print(f"finetune: {choice.reason}")
    if choice.scores:
        print(f"finetune: auto cross-validation took {seconds:.1f} s")


def choose_strategy(
    model: nn.Module,
    spec: ModelSpec,
    target: pd.DataFrame,
    root: Path,
    params: Params,
    device: torch.device,
    domain_distance: float,
) -> tuple[StrategyChoice, float]:
    """``strategy: auto``: cross-validate the strategies on the target train split from
    ``model`` (left unchanged), print the scores and the choice; the choice and its seconds."""
    started = time.perf_counter()
    choice = cross_validated_choice(
        model,
        spec,
        split_frame(target, "train"),
        root,
        params,
        device,
        domain_distance=domain_distance,
    )
    seconds = time.perf_counter() - started
    _print_choice(choice, seconds)
    return choice, seconds


# --- training -------------------------------------------------------------------------------


def _fit_full_model(
    model: nn.Module,
    spec: ModelSpec,
    plan: FinetunePlan,
    manifest: pd.DataFrame,
    val: DataLoader | None,
    root: Path,
    params: Params,
    device: torch.device,
    on_epoch_end: EpochCallback | None,
) -> tuple[TrainResult, dict[str, float], list[Path]]:
    """Images through the whole model every epoch, ``plan.prepare_epoch`` deciding what trains."""
    section, layout = params.finetune, Layout(root)
    train = train_loader(manifest, root, spec, section, params)
    lr_choice = tune_learning_rate(
        "finetune",
        section,
        model,
        plan.param_groups,
        train,
        device,
        root,
        prepare=lambda m: plan.prepare_epoch(m, section.epochs),
    )
    result = fit(
        model,
        lr_choice.param_groups,
        train,
        val,
        fit_options(section, params, "finetune"),
        device=device,
        on_epoch_end=on_epoch_end,
        prepare_epoch=plan.prepare_epoch,
        checkpoint=stage_checkpointing(
            "finetune",
            params,
            root,
            layout.model_dir("source") / "weights.safetensors",
            layout.validated_manifest("target"),
        ),
    )
    return result, lr_choice.metrics, lr_choice.artifacts


def _fit_head_on_cache(
    model: nn.Module,
    spec: ModelSpec,
    plan: FinetunePlan,
    manifest: pd.DataFrame,
    root: Path,
    params: Params,
    device: torch.device,
    on_epoch_end: EpochCallback | None,
) -> TrainResult:
    """Feature extraction on embeddings computed once (``roadshift.transfer.embeddings``)."""
    section = params.finetune
    return fit_head_with_embedding_cache(
        model,
        spec,
        manifest,
        root,
        section,
        plan.param_groups,
        fit_options(section, params, "finetune head"),
        device=device,
        on_epoch_end=on_epoch_end,
    )


def _adapt_batchnorm(
    model: nn.Module,
    spec: ModelSpec,
    manifest: pd.DataFrame,
    root: Path,
    params: Params,
    device: torch.device,
) -> None:
    """``batchnorm: reestimate``: target statistics from the whole train split (AdaBN)."""
    loader = eval_loader(
        manifest, "train", root, spec, params.evaluate.batch_size, params.base.seed
    )
    if loader is None:
        raise ValueError("the manifest has no images in the train split")
    seen = reestimate_batchnorm(model, loader, device)
    print(f"finetune: BatchNorm statistics re-estimated on {seen} target train images")


# --- self-training on unlabelled target images ----------------------------------------------


def self_training_enabled(section: FinetuneSection, strategy: str, *, has_unlabelled: bool) -> bool:
    """``self_training.enabled``; ``auto``: with unlabelled target images beyond the train
    split, when the backbone trains (``fine_tune``: feature extraction promises an untouched
    backbone). A target val split, where there is one, guards the result (the best epoch is
    kept, the fine-tuned model included); without one the last epoch is kept, and the
    register stage's baseline gates still stand between it and production.

    Without unlabelled images, auto stays off: on the synthetic data, self-training on the
    96 target train images alone gained 1-2 points of target test accuracy (within the
    test split's noise) for about three times the stage's training time; 400 unlabelled
    images more gained 5 points (docs/transfer-learning.md). ``enabled: true`` runs it
    on the train images all the same.
    """
    setting = section.self_training.enabled
    if setting != "auto":
        return bool(setting)
    return strategy == "fine_tune" and has_unlabelled


def _self_train(
    model: nn.Module,
    spec: ModelSpec,
    manifest: pd.DataFrame,
    root: Path,
    params: Params,
    device: torch.device,
    val: DataLoader | None,
    unlabelled_images: UInt8Images | None,
    on_epoch_end: EpochCallback | None,
) -> SelfTrainingResult:
    """Self-train what fine-tuning left trainable; the target train split is the labelled
    set and, without ``unlabelled_images``, the unlabelled one too."""
    section = params.finetune
    clean = create_batch_transform(spec.image_size, spec.mean, spec.std)
    train = ManifestDataset(split_frame(manifest, "train"), root, spec.class_names, clean)
    labelled = LabelledImages(train.images, train.targets)
    given = unlabelled_images is not None and len(unlabelled_images) > 0
    unlabelled = unlabelled_images if given else train.images
    source = "unlabelled target images" if given else "target train images"
    print(f"finetune: self-training on {len(unlabelled)} {source}")
    views = augmented_views(
        spec.image_size, spec.mean, spec.std, section.augment, section.self_training.strong_augment
    )
    return self_train(
        model,
        labelled,
        unlabelled,
        section.self_training,
        views=views,
        batch_size=section.batch_size,
        seed=params.base.seed,
        device=device,
        weight_decay=section.weight_decay,
        label_smoothing=section.label_smoothing,
        grad_clip_norm=section.grad_clip_norm,
        val=val,
        on_epoch_end=on_epoch_end,
    )


def _self_training_metrics(result: SelfTrainingResult | None) -> dict[str, float]:
    """What ran, for metrics/finetune.json: ``self_training`` 1/0 and, when 1, its figures."""
    if result is None:
        return {"self_training": 0.0}
    return {
        "self_training": 1.0,
        "self_training_epochs": float(len(result.history)),
        "self_training_best_epoch": float(result.best_epoch),
        "self_training_mask_rate": result.mask_rate,
        "self_training_unlabelled_images": float(result.unlabelled_images),
    }


def unlabelled_pool(layout: Layout, root: Path, image_size: int) -> UInt8Images | None:
    """The validated unlabelled target images, decoded at the model's input size; None
    when no pool is configured or it holds no image."""
    path = layout.validated_unlabeled_manifest
    if not path.is_file():
        return None
    frame = read_unlabeled_manifest(path)
    if frame.empty:
        return None
    return decoded_images(frame, root, image_size, layout.decoded_cache_dir)


def run_finetune(
    params: Params,
    root: Path,
    on_epoch_end: EpochCallback | None = None,
    unlabelled_images: UInt8Images | None = None,
) -> StageOutcome:
    """Fine-tune the source model on the target train split, then self-train if enabled.

    ``unlabelled_images``: decoded unlabelled target images, uint8 ``(N, size, size, 3)``
    at the source model's input size; None: the validated unlabelled pool
    (``data.target.unlabeled_path``), and where that is empty the target train images
    serve as unlabelled views.
    """
    device = configure_runtime(params.base)
    layout = Layout(root)
    model, spec = load_model_dir(layout.model_dir("source"), device)
    if unlabelled_images is None:
        unlabelled_images = unlabelled_pool(layout, root, spec.image_size)
    manifest = read_manifest(layout.validated_manifest("target"))
    _check_label_sets(spec.class_names, class_names(manifest))
    section = params.finetune
    auto = section.strategy == "auto"
    distance = _domain_distance(model, spec, manifest, root, params, device) if auto else None
    if section.batchnorm == "reestimate":
        _adapt_batchnorm(model, spec, manifest, root, params, device)
    choice, cv_seconds = None, 0.0
    if distance is not None:  # the candidates start where the stage's training starts
        choice, cv_seconds = choose_strategy(model, spec, manifest, root, params, device, distance)
    strategy = choice.strategy if choice is not None else section.strategy
    plan = plan_finetune(model, spec.architecture, section, strategy)
    val = eval_loader(manifest, "val", root, spec, params.evaluate.batch_size, params.base.seed)
    extra_metrics: dict[str, float] = {}
    extra_artifacts: list[Path] = []
    if strategy == "feature_extraction" and section.embedding_cache:
        result = _fit_head_on_cache(model, spec, plan, manifest, root, params, device, on_epoch_end)
    else:
        result, extra_metrics, extra_artifacts = _fit_full_model(
            model, spec, plan, manifest, val, root, params, device, on_epoch_end
        )
    self_trained = None
    if self_training_enabled(
        section,
        strategy,
        has_unlabelled=unlabelled_images is not None and len(unlabelled_images) > 0,
    ):
        finished = len(result.history)
        self_trained = _self_train(
            model,
            spec,
            manifest,
            root,
            params,
            device,
            val,
            unlabelled_images,
            None if on_epoch_end is None else lambda r, e: on_epoch_end(r, finished + e),
        )
        print(
            f"finetune: self-training kept epoch {self_trained.best_epoch} of "
            f"{len(self_trained.history)} (0 = the fine-tuned model, unchanged); "
            f"last mask rate {self_trained.mask_rate:.2f}"
        )
    if not current_group().is_main:
        return StageOutcome({})  # rank 0 alone writes the model and metrics
    metrics = {
        "best_epoch": float(result.best_epoch),
        "trainable_parameters": float(plan.trainable_parameter_count(len(result.history) or 1)),
        **extra_metrics,
        **_self_training_metrics(self_trained),
    }
    if choice is not None:
        metrics.update(choice.metrics())
    left_out: dict[str, str] = {}
    if val is not None:
        metrics["target_val_accuracy"] = accuracy(*predict_logits(model, val, device))
    else:
        left_out["target_val_accuracy"] = "the target has no val split"
    model_dir = save_model_dir(model, spec, layout.model_dir("target"))
    metrics_path = write_metrics(layout.metrics("finetune"), metrics, left_out)
    details = {
        "model_dir": model_dir,
        "history": result.history,
        "strategy": strategy,
        "strategy_reason": (
            choice.reason if choice is not None else f"finetune.strategy is {strategy}"
        ),
    }
    if choice is not None:
        details["auto_cv_seconds"] = cv_seconds
    if self_trained is not None:
        details["self_training_history"] = self_trained.history
    return StageOutcome(metrics, [metrics_path, *extra_artifacts], details)
