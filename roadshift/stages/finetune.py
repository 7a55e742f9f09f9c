"""Target-domain fine-tuning, starting from the source model.

The strategy follows the transfer-learning rule of thumb: with little target data
that looks like the source, train only the head on frozen features
(``feature_extraction``); with more data or a bigger shift, let the backbone adapt
too, at smaller, layer-wise decaying learning rates (``fine_tune``). ``auto`` makes
that call from two measurements: train images per class and the proxy A-distance
between source and target embeddings of the source model. How each strategy trains
is planned in ``roadshift.transfer``; this stage wires data, plan and loop together.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from roadshift.config import Params
from roadshift.data.batch_transforms import create_batch_transform
from roadshift.data.dataset import ManifestDataset, split_frame
from roadshift.data.manifest import class_names, read_manifest
from roadshift.jsonio import write_json
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
from roadshift.transfer.domain import StrategyChoice, choose_strategy, embed, proxy_a_distance
from roadshift.transfer.embeddings import fit_head_with_embedding_cache
from roadshift.transfer.strategies import FinetunePlan, plan_finetune, reestimate_batchnorm


class LabelSetMismatchError(ValueError):
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


def measure_and_choose(
    model: nn.Module,
    spec: ModelSpec,
    source: pd.DataFrame,
    target: pd.DataFrame,
    root: Path,
    params: Params,
    device: torch.device,
) -> StrategyChoice:
    """``strategy: auto``: embed samples of both train splits with the source model,
    measure their proxy A-distance and choose from it and the target's images per class."""
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
    distance = proxy_a_distance(*embeddings, seed=seed)
    images_per_class = len(split_frame(target, "train")) / spec.num_classes
    return choose_strategy(images_per_class, distance, auto)


def _resolve_strategy(
    model: nn.Module,
    spec: ModelSpec,
    target: pd.DataFrame,
    root: Path,
    params: Params,
    device: torch.device,
) -> StrategyChoice | None:
    """The auto choice, printed with its reason; None for a strategy set in params.yaml."""
    if params.finetune.strategy != "auto":
        return None
    source = read_manifest(Layout(root).validated_manifest("source"))
    choice = measure_and_choose(model, spec, source, target, root, params, device)
    print(f"finetune: {choice.reason}")
    return choice


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


def run_finetune(
    params: Params, root: Path, on_epoch_end: EpochCallback | None = None
) -> StageOutcome:
    device = configure_runtime(params.base)
    layout = Layout(root)
    model, spec = load_model_dir(layout.model_dir("source"), device)
    manifest = read_manifest(layout.validated_manifest("target"))
    _check_label_sets(spec.class_names, class_names(manifest))
    section = params.finetune
    choice = _resolve_strategy(model, spec, manifest, root, params, device)
    strategy = choice.strategy if choice is not None else section.strategy
    if section.batchnorm == "reestimate":
        _adapt_batchnorm(model, spec, manifest, root, params, device)
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
    if not current_group().is_main:
        return StageOutcome({})  # rank 0 alone writes the model and metrics
    metrics = {
        "best_epoch": float(result.best_epoch),
        "target_val_accuracy": result.best_val_accuracy,
        "trainable_parameters": float(plan.trainable_parameter_count(len(result.history) or 1)),
        **extra_metrics,
    }
    if choice is not None:
        metrics["domain_distance"] = choice.domain_distance
    if val is not None:
        metrics["target_val_accuracy"] = accuracy(*predict_logits(model, val, device))
    model_dir = save_model_dir(model, spec, layout.model_dir("target"))
    metrics_path = write_json(layout.metrics("finetune"), metrics)
    details = {
        "model_dir": model_dir,
        "history": result.history,
        "strategy": strategy,
        "strategy_reason": (
            choice.reason if choice is not None else f"finetune.strategy is {strategy}"
        ),
    }
    if choice is not None:
        details["images_per_class"] = choice.images_per_class
    return StageOutcome(metrics, [metrics_path, *extra_artifacts], details)
