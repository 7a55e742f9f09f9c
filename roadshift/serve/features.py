"""The champion's view of image files: embeddings (the head's input) and probabilities.

Shift monitoring and label suggestions compare images where the model compares them, so they
need its embeddings, which the registered pyfunc does not return. The version's own model
folder is loaded (``roadshift.registry.model_files``) and every file goes through the serving
path's decoding and preprocessing (``decode_image``, ``create_eval_transform``) on the CPU,
as the pyfunc runs: the probabilities here are the ones ``roadshift predict`` prints.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from roadshift.registry.model_files import RegisteredModel, download_registered_model
from roadshift.serve.predict import decode_image
from roadshift.train.models import ModelSpec, head_module_name, load_model_dir
from roadshift.transfer.domain import head_inputs

FEATURE_BATCH = 64


@dataclass(frozen=True)
class LoadedModel:
    registered: RegisteredModel
    model: nn.Module
    spec: ModelSpec


@dataclass(frozen=True)
class Features:
    embeddings: torch.Tensor  # (N, D) float32, the head's input
    probabilities: np.ndarray  # (N, classes)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1) if len(self.probabilities) else np.zeros(0)


@contextmanager
def registered_model(name: str, version: str | None = None) -> Iterator[LoadedModel]:
    """The version (the champion by default) loaded on the CPU, from a temporary download."""
    with tempfile.TemporaryDirectory(prefix="roadshift-model-") as folder:
        registered = download_registered_model(name, version, Path(folder))
        model, spec = load_model_dir(registered.model_dir)
        yield LoadedModel(registered, model.eval(), spec)


def _batches(
    paths: Sequence[Path], spec: ModelSpec, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from roadshift.data.transforms import create_eval_transform

    transform = create_eval_transform(spec.image_size, spec.mean, spec.std)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([transform(image=decode_image(p))["image"] for p in chunk])
        yield images, torch.zeros(len(chunk), dtype=torch.long)


@torch.no_grad()
def features_of(
    loaded: LoadedModel, paths: Sequence[Path], batch_size: int = FEATURE_BATCH
) -> Features:
    """Embeddings and probabilities of ``paths`` in order (an unreadable file raises
    ``UnreadableImageError`` naming it)."""
    architecture = loaded.spec.architecture
    if not paths:
        return Features(torch.zeros(0, 1), np.zeros((0, loaded.spec.num_classes)))
    device = torch.device("cpu")
    embeddings, _ = head_inputs(
        loaded.model, architecture, _batches(list(paths), loaded.spec, batch_size), device
    )
    head = getattr(loaded.model, head_module_name(architecture))
    head.eval()
    probabilities = torch.softmax(head(embeddings), dim=1).numpy().astype(np.float64)
    return Features(embeddings.reshape(len(embeddings), -1), probabilities)
