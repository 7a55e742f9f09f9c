"""What the training-side stages share: loaders over a manifest split and metric files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch.utils.data import DataLoader

from roadshift.config import Params, TrainSection
from roadshift.data.dataset import ManifestDataset, split_frame
from roadshift.data.transforms import create_eval_transform, create_train_transform
from roadshift.models import ModelSpec
from roadshift.training import make_loader

EpochCallback = Callable[[dict[str, float], int], None]


@dataclass
class StageOutcome:
    """Numbers and files a stage produced, for the shell (CLI/flow) to log and show."""

    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def fit_options(section: TrainSection) -> dict:
    """The one place a training section of params.yaml becomes ``fit()``'s keyword arguments."""
    return {
        "epochs": section.epochs,
        "weight_decay": section.weight_decay,
        "label_smoothing": section.label_smoothing,
        "grad_clip_norm": section.grad_clip_norm,
    }


def train_loader(
    manifest: pd.DataFrame, root: Path, spec: ModelSpec, section: TrainSection, params: Params
) -> DataLoader:
    transform = create_train_transform(
        spec.image_size, spec.mean, spec.std, section.augment, seed=params.base.seed
    )
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
    transform = create_eval_transform(spec.image_size, spec.mean, spec.std)
    dataset = ManifestDataset(frame, root, spec.class_names, transform)
    return make_loader(dataset, batch_size, shuffle=False, seed=seed)
