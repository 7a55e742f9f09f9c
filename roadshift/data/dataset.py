"""A torch Dataset over a manifest split: decode with Pillow, transform with albumentations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from roadshift.data.images import to_rgb


def load_rgb(path: Path) -> np.ndarray:
    """Decode to HxWx3 uint8 by the documented per-mode rule (``roadshift.data.images``)."""
    with Image.open(path) as image:
        return np.asarray(to_rgb(image))


class ManifestDataset(Dataset):
    def __init__(
        self,
        manifest: pd.DataFrame,
        root: Path,
        class_names: Sequence[str],
        transform: Callable[..., dict],
    ) -> None:
        unknown = sorted(set(manifest["label"]) - set(class_names))
        if unknown:
            raise ValueError(
                f"labels {unknown} are not among the model's classes {list(class_names)}"
            )
        index = {name: i for i, name in enumerate(class_names)}
        self.paths = [root / p for p in manifest["path"]]
        self.targets = torch.tensor([index[label] for label in manifest["label"]], dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.transform(image=load_rgb(self.paths[i]))["image"]
        return image, self.targets[i]

    def __getitems__(self, batch: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fetch a batch; a seeded batch first reseeds the augmentations (see roadshift.loaders)."""
        seed = getattr(batch, "seed", None)
        if seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        indices = getattr(batch, "indices", batch)
        return [self[i] for i in indices]


def split_frame(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    return manifest[manifest["split"] == split].reset_index(drop=True)
