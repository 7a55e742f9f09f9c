"""Feature extraction on cached embeddings: run the frozen backbone once, then train the head.

When only the head trains, every epoch of the full-model loop pushes each image through
a backbone whose output never changes (frozen weights, BatchNorm in eval mode): all
but the head's share of the compute is wasted. Here the target train split is embedded
once, in ``embedding_views`` views (view 0 unaugmented, the others through the seeded
train augmentations, so augmentation still enlarges the tiny data set), and the head
alone is trained on (embedding, label) pairs by the same ``fit()`` loop. Validation
uses embeddings of the val split, so best-epoch selection judges the same head the
full model will carry. The backbone keeps its source BatchNorm statistics (or the
re-estimated ones, if ``batchnorm: reestimate`` ran before).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from roadshift.config import FinetuneSection
from roadshift.data.batch_transforms import create_batch_transform
from roadshift.data.dataset import ManifestDataset, split_frame
from roadshift.train.loop import EpochCallback, FitOptions, TrainResult, fit, make_loader
from roadshift.train.models import ModelSpec, head_module_name
from roadshift.transfer.domain import head_inputs


def view_loaders(
    frame: pd.DataFrame,
    root: Path,
    spec: ModelSpec,
    section: FinetuneSection,
    seed: int,
    views: int,
) -> list[DataLoader]:
    """One ordered loader per view: view 0 with the eval transform, view ``v`` with the
    train transform, its batches seeded from ``seed + v`` (distinct but reproducible
    augmentations). All views share one decoded array."""
    clean = create_batch_transform(spec.image_size, spec.mean, spec.std)
    augmented = create_batch_transform(spec.image_size, spec.mean, spec.std, section.augment)
    images = ManifestDataset(frame, root, spec.class_names, clean)
    loaders = []
    for view in range(views):
        dataset = images.subset(range(len(images)), augmented if view > 0 else clean)
        loaders.append(
            make_loader(
                dataset,
                section.batch_size,
                shuffle=False,
                seed=seed + view,
                num_workers=section.num_workers,
            )
        )
    return loaders


def embedding_dataset(
    model: nn.Module, architecture: str, loaders: list[DataLoader], device: torch.device
) -> TensorDataset:
    """The head's inputs for every image of every loader, with their labels."""
    pairs = [head_inputs(model, architecture, loader, device) for loader in loaders]
    return TensorDataset(torch.cat([f for f, _ in pairs]), torch.cat([t for _, t in pairs]))


def _head_options(options: FitOptions) -> FitOptions:
    """CutMix cuts rectangles out of images; on embedding vectors it would be meaningless,
    so it is switched off here (mixup, a convex combination, still applies)."""
    if options.mix == "cutmix":
        return dataclasses.replace(options, mix="none")
    return options


def fit_head_on_embeddings(
    model: nn.Module,
    architecture: str,
    param_groups: list[dict],
    train: TensorDataset,
    val: TensorDataset | None,
    options: FitOptions,
    *,
    batch_size: int,
    device: torch.device,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train the model's head module on cached embeddings; the model keeps the best head.

    ``param_groups`` must hold only head parameters (``plan_finetune`` with
    ``feature_extraction`` makes exactly that). The head is the model's own module, so
    training it in place trains the model's head; it is set back explicitly all the same.
    """
    head_name = head_module_name(architecture)
    head = getattr(model, head_name)
    head_ids = {id(p) for p in head.parameters()}
    if any(id(p) not in head_ids for group in param_groups for p in group["params"]):
        raise ValueError("fit_head_on_embeddings: param_groups hold parameters outside the head")
    train_loader = make_loader(train, batch_size, shuffle=True, seed=options.seed)
    val_loader = (
        make_loader(val, batch_size, shuffle=False, seed=options.seed) if val is not None else None
    )
    result = fit(
        head,
        param_groups,
        train_loader,
        val_loader,
        _head_options(options),
        device=device,
        on_epoch_end=on_epoch_end,
        checkpoint=None,  # seconds of work: not worth a checkpoint
    )
    setattr(model, head_name, head)
    return result


def fit_head_with_embedding_cache(
    model: nn.Module,
    spec: ModelSpec,
    manifest: pd.DataFrame,
    root: Path,
    section: FinetuneSection,
    param_groups: list[dict],
    options: FitOptions,
    *,
    device: torch.device,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Embed the manifest's train (``embedding_views`` views) and val splits with the
    frozen backbone, then train the head on them (``fit_head_on_embeddings``)."""
    train_frame = split_frame(manifest, "train")
    if train_frame.empty:
        raise ValueError("the manifest has no images in the train split")
    loaders = view_loaders(train_frame, root, spec, section, options.seed, section.embedding_views)
    train = embedding_dataset(model, spec.architecture, loaders, device)
    val_frame = split_frame(manifest, "val")
    val = (
        None
        if val_frame.empty
        else embedding_dataset(
            model, spec.architecture, view_loaders(val_frame, root, spec, section, 0, 1), device
        )
    )
    return fit_head_on_embeddings(
        model,
        spec.architecture,
        param_groups,
        train,
        val,
        options,
        batch_size=section.batch_size,
        device=device,
        on_epoch_end=on_epoch_end,
    )
