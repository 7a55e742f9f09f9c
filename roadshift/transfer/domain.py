"""How far the target domain is from the source, in the space the source model's head sees.

The proxy A-distance (Ben-David et al., 2007/2010) between the source model's
penultimate-layer embeddings of the two domains: if a linear classifier cannot tell the
domains apart there, the source features look the same on both. ``strategy: auto`` used
to choose from it (with the target's size); thresholds tuned on synthetic data picked the
worse strategy on a real pair, so the choice is now cross-validated on the target labels
(``roadshift.transfer.selection``) and the distance is logged as information: it says how
large the shift is, not which strategy bridges it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from roadshift.train.loop import amp_dtype
from roadshift.train.models import head_module_name

CV_FOLDS = 5


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block, then every module's own mode back (a training loop may
    have set BatchNorm layers individually)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


@torch.no_grad()
def head_inputs(
    model: nn.Module,
    architecture: str,
    loader: Iterable,
    device: torch.device,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head module receives for each image, with the labels, on the CPU.

    Taken by a forward pre-hook on the head, so it is exactly the head's input for any
    backbone (a flat vector for most, ``(C, 1, 1)`` for ConvNeXt, whose head flattens
    itself); the head can be called on it directly. Eval mode, float32; at most
    ``limit`` images.
    """
    head = getattr(model, head_module_name(architecture))
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach().float().cpu())
    )
    targets: list[torch.Tensor] = []
    dtype = amp_dtype(device)
    try:
        with _eval_mode(model.to(device)):
            for images, labels in loader:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    model(images.to(device, non_blocking=True))
                targets.append(torch.as_tensor(labels))
                if limit is not None and sum(len(t) for t in targets) >= limit:
                    break
    finally:
        handle.remove()
    if not captured:
        raise ValueError("head_inputs: the loader gave no images to embed")
    return torch.cat(captured)[:limit], torch.cat(targets)[:limit]


def embed(
    model: nn.Module,
    architecture: str,
    loader: Iterable,
    device: torch.device,
    limit: int | None = None,
) -> torch.Tensor:
    """Penultimate features (the head's input) of up to ``limit`` images, eval mode."""
    features, _ = head_inputs(model, architecture, loader, device, limit)
    return features


def _balanced_sample(
    source: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """As many rows of each domain: otherwise a classifier always answering the larger
    domain would have an error below 1/2 and the distance would reflect sizes, not data."""
    n = min(len(source), len(target))
    return (
        source[rng.choice(len(source), n, replace=False)],
        target[rng.choice(len(target), n, replace=False)],
    )


def _l2_normalise(rows: np.ndarray) -> np.ndarray:
    """Unit length, so the classifier separates directions, not feature magnitudes."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _flat(features: torch.Tensor) -> np.ndarray:
    return features.detach().reshape(len(features), -1).float().cpu().numpy().astype(np.float64)


def proxy_a_distance(
    source: torch.Tensor, target: torch.Tensor, seed: int, folds: int = CV_FOLDS
) -> float:
    """Proxy A-distance ``2 (1 - 2 err)`` in [0, 2] between two sets of embeddings.

    ``err`` is the k-fold cross-validated error of a logistic-regression classifier
    told to separate the domains: 0 when the domains are indistinguishable (err about
    1/2), 2 when they are perfectly separable. Balanced subsample, L2-normalised rows.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(seed)
    a, b = _balanced_sample(_flat(source), _flat(target), rng)
    if len(a) < 2:
        raise ValueError(
            "proxy_a_distance needs at least 2 embeddings per domain, "
            f"got {len(source)} source and {len(target)} target"
        )
    rows = _l2_normalise(np.concatenate([a, b]))
    domains = np.repeat([0, 1], len(a))
    splits = StratifiedKFold(n_splits=min(folds, len(a)), shuffle=True, random_state=seed)
    predicted = cross_val_predict(LogisticRegression(max_iter=2000), rows, domains, cv=splits)
    error = float(np.mean(predicted != domains))
    return float(np.clip(2.0 * (1.0 - 2.0 * error), 0.0, 2.0))
