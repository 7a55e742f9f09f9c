"""A torch Dataset over a manifest split that hands out whole, already transformed batches.

Images come decoded once from ``roadshift.data.decoded`` (a memory-mapped uint8 array)
and are transformed a batch at a time by ``roadshift.data.batch_transforms``. The
loader (``roadshift.train.loaders``) asks for a batch through ``__getitems__``; a seeded batch
seeds the batch's augmentations, which is what keeps an epoch reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from roadshift.data.batch_transforms import EvalBatchTransform
from roadshift.data.decoded import decoded_images, load_rgb
from roadshift.layout import Layout

__all__ = ["ManifestDataset", "load_rgb", "split_frame"]

Batch = tuple[torch.Tensor, torch.Tensor]


class ManifestDataset(Dataset):
    """``(image, label index)`` pairs of a manifest frame; ``__getitems__`` returns one
    collated batch, so the loader must not collate again (``make_loader`` knows)."""

    returns_batches = True

    def __init__(
        self,
        manifest: pd.DataFrame,
        root: Path,
        class_names: Sequence[str],
        transform: EvalBatchTransform,
        *,
        cache: bool = True,
    ) -> None:
        unknown = sorted(set(manifest["label"]) - set(class_names))
        if unknown:
            raise ValueError(
                f"labels {unknown} are not among the model's classes {list(class_names)}"
            )
        index = {name: i for i, name in enumerate(class_names)}
        self.paths = [Path(root) / p for p in manifest["path"]]
        self.targets = torch.tensor([index[label] for label in manifest["label"]], dtype=torch.long)
        self.transform = transform
        cache_dir = Layout(Path(root)).decoded_cache_dir if cache else None
        self.images = decoded_images(manifest, Path(root), transform.image_size, cache_dir)
        self._rows = np.arange(len(self.paths))

    def subset(
        self, rows: Sequence[int], transform: EvalBatchTransform | None = None
    ) -> ManifestDataset:
        """The same decoded images, restricted to ``rows`` in that order and optionally
        transformed differently: no second decode, no new cache entry."""
        chosen = np.asarray(rows, dtype=np.int64)
        subset = object.__new__(ManifestDataset)
        subset.paths = [self.paths[i] for i in chosen]
        subset.targets = self.targets[chosen]
        subset.transform = transform if transform is not None else self.transform
        subset.images = self.images
        subset._rows = self._rows[chosen]
        return subset

    def __len__(self) -> int:
        return len(self.paths)

    def _batch(self, indices: Sequence[int], seed: int | None) -> Batch:
        rows = self._rows[np.asarray(indices, dtype=np.int64)]
        uint8 = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return self.transform(uint8, generator), self.targets[np.asarray(indices)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self._batch([i], None)
        return images[0], targets[0]

    def __getitems__(self, batch: Sequence[int]) -> Batch:
        """A ``SeededBatch`` (see roadshift.train.loaders) seeds its augmentations."""
        return self._batch(getattr(batch, "indices", batch), getattr(batch, "seed", None))


def split_frame(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    return manifest[manifest["split"] == split].reset_index(drop=True)
