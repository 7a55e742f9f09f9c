"""What the training-side stages share: loaders over a manifest split, the one mapping from a
params section to the training loop's options, and checkpoint locations."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from roadshift.config import Params, TrainSection, params_to_dict
from roadshift.data.batch_transforms import create_batch_transform
from roadshift.data.dataset import ManifestDataset, split_frame
from roadshift.data.manifest import class_names, read_manifest
from roadshift.layout import Layout
from roadshift.train.checkpoints import Checkpointing, fingerprint
from roadshift.train.loop import FitOptions, TrainResult, fit, make_loader
from roadshift.train.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    create_model,
    resolve_small_input_stem,
)
from roadshift.train.progress import progress_enabled

EpochCallback = Callable[[dict[str, float], int], None]


def new_model_spec(params: Params, class_names: tuple[str, ...]) -> ModelSpec:
    """The spec of a model trained from ``params.model`` (pretrain and the scratch baseline)."""
    architecture, image_size = params.model.architecture, params.base.image_size
    return ModelSpec(
        architecture=architecture,
        class_names=class_names,
        image_size=image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        small_input_stem=resolve_small_input_stem(
            params.model.small_input_stem, architecture, image_size
        ),
    )


def new_model(spec: ModelSpec, params: Params, *, weights: str | None):
    return create_model(
        spec.architecture,
        spec.num_classes,
        weights,
        params.model.dropout,
        small_input_stem=spec.small_input_stem,
    )


def fit_options(section: TrainSection, params: Params, description: str) -> FitOptions:
    """The one place a training section of params.yaml becomes the training loop's options."""
    return FitOptions(
        epochs=section.epochs,
        weight_decay=section.weight_decay,
        label_smoothing=section.label_smoothing,
        grad_clip_norm=section.grad_clip_norm,
        schedule=section.schedule,
        warmup_fraction=section.warmup_fraction,
        mix=section.mix,
        mix_alpha=section.mix_alpha,
        mix_probability=section.mix_probability,
        early_stopping_patience=section.early_stopping_patience,
        seed=params.base.seed,
        progress=progress_enabled(params.base.progress_bars),
        description=description,
    )


# The params section each training stage trains with (scratch shares fine-tuning's schedule).
TRAINING_SECTIONS = {"pretrain": "pretrain", "finetune": "finetune", "scratch": "finetune"}


@dataclass(frozen=True)
class LearningRateChoice:
    param_groups: list[dict]
    metrics: dict[str, float]
    artifacts: list[Path]


def tune_learning_rate(
    stage: str,
    section: TrainSection,
    model: nn.Module,
    param_groups: list[dict],
    loader: DataLoader,
    device: torch.device,
    root: Path,
    prepare: Callable[[nn.Module], None] | None = None,
) -> LearningRateChoice:
    """With ``lr_finder`` on, replace each group's peak lr by the range test's suggestion
    (ratios between groups kept); otherwise keep the configured rates."""
    if not section.lr_finder:
        return LearningRateChoice(param_groups, {}, [])
    from roadshift.train.lr_finder import lr_range_test, plot_lr_range

    try:
        result = lr_range_test(
            model,
            param_groups,
            loader,
            device,
            loss_fn=nn.CrossEntropyLoss(label_smoothing=section.label_smoothing),
            weight_decay=section.weight_decay,
            prepare=prepare,
        )
    except ValueError as error:
        # no usable curve (e.g. a tiny train split): train at the configured rates, and say so
        print(f"{stage}: lr finder gave no suggestion ({error}); keeping {stage}.lr={section.lr}")
        return LearningRateChoice(param_groups, {}, [])
    print(f"{stage}: lr finder suggests {result.suggested_lr:.3g} ({result.reason})")
    tuned = [
        {**group, "lr": lr}
        for group, lr in zip(param_groups, result.suggested_group_lrs, strict=True)
    ]
    plot = plot_lr_range(result, Layout(root).root / "reports" / "lr_finder" / f"{stage}.png")
    return LearningRateChoice(tuned, {"lr_finder_suggested_lr": result.suggested_lr}, [plot])


def stage_checkpointing(
    stage: str, params: Params, root: Path, *inputs: Path
) -> Checkpointing | None:
    """Checkpoints for ``stage``, valid only for these params and input files."""
    section_name = TRAINING_SECTIONS[stage]
    if not getattr(params, section_name).checkpoint:
        return None
    settings = params_to_dict(params)
    relevant = {key: settings[key] for key in ("base", "model", section_name)}
    # how often to save does not change what a saved state means
    relevant[section_name] = {
        name: value
        for name, value in relevant[section_name].items()
        if not name.startswith("checkpoint")
    }
    key = fingerprint(stage, json.dumps(relevant, sort_keys=True), *inputs)
    every_seconds = getattr(params, section_name).checkpoint_every_seconds
    return Checkpointing(Layout(root).checkpoint_dir(stage), key, every_seconds)


def train_loader(
    manifest: pd.DataFrame, root: Path, spec: ModelSpec, section: TrainSection, params: Params
) -> DataLoader:
    transform = create_batch_transform(spec.image_size, spec.mean, spec.std, section.augment)
    dataset = ManifestDataset(split_frame(manifest, "train"), root, spec.class_names, transform)
    if len(dataset) == 0:
        raise ValueError("the manifest has no images in the train split")
    return make_loader(
        dataset,
        section.batch_size,
        shuffle=True,
        seed=params.base.seed,
        num_workers=section.num_workers,
    )


def eval_loader(
    manifest: pd.DataFrame, split: str, root: Path, spec: ModelSpec, batch_size: int, seed: int
) -> DataLoader | None:
    frame = split_frame(manifest, split)
    if frame.empty:
        return None
    transform = create_batch_transform(spec.image_size, spec.mean, spec.std)
    dataset = ManifestDataset(frame, root, spec.class_names, transform)
    return make_loader(dataset, batch_size, shuffle=False, seed=seed)


@dataclass
class TrainedModel:
    """A model trained with every parameter at one lr, and what the stage reports about it."""

    model: nn.Module
    spec: ModelSpec
    manifest: pd.DataFrame
    result: TrainResult
    lr_choice: LearningRateChoice


def train_new_model(
    stage: str,
    manifest_path: Path,
    params: Params,
    root: Path,
    device: torch.device,
    *,
    weights: str | None,
    on_epoch_end: EpochCallback | None,
) -> TrainedModel:
    """Source pretraining and the scratch baseline: a new model from ``params.model`` trained
    on a manifest's train split, best epoch chosen on its val split, checkpointed."""
    section: TrainSection = getattr(params, TRAINING_SECTIONS[stage])
    manifest = read_manifest(manifest_path)
    spec = new_model_spec(params, class_names(manifest))
    model = new_model(spec, params, weights=weights)
    train = train_loader(manifest, root, spec, section, params)
    groups = [{"params": list(model.parameters()), "lr": section.lr, "name": "all"}]
    lr_choice = tune_learning_rate(stage, section, model, groups, train, device, root)
    result = fit(
        model,
        lr_choice.param_groups,
        train,
        eval_loader(manifest, "val", root, spec, params.evaluate.batch_size, params.base.seed),
        fit_options(section, params, stage),
        device=device,
        on_epoch_end=on_epoch_end,
        checkpoint=stage_checkpointing(stage, params, root, manifest_path),
    )
    return TrainedModel(model, spec, manifest, result, lr_choice)
