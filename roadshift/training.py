"""The training loop, shared by source pretraining and target fine-tuning.

Fine-tuning is this same loop with a different initial model, a different set of
trainable parameters and learning rates (nanoGPT's rule). Reporting goes through
a callback so this module never needs to know about MLflow or Prefect.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from roadshift.config import BaseSection

EpochCallback = Callable[[dict[str, float], int], None]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; continuing would only corrupt the weights."""


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device: cuda requested but no CUDA device is available")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def configure_runtime(base: BaseSection) -> torch.device:
    """Seed everything and pin thread counts so a CPU run is bitwise repeatable."""
    random.seed(base.seed)
    np.random.seed(base.seed)
    torch.manual_seed(base.seed)
    threads = base.num_threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    if base.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return resolve_device(base.device)


def _seed_worker(worker_id: int) -> None:
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    dataset = torch.utils.data.get_worker_info().dataset
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(worker_seed)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers else None,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(images.to(device, non_blocking=True))
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
    return torch.cat(all_logits), torch.cat(all_targets)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    if len(targets) == 0:
        return float("nan")
    return (logits.argmax(dim=1) == targets).float().mean().item()


def _train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    grad_clip_norm: float | None,
    scaler: torch.amp.GradScaler,
    epoch: int,
    set_train_mode: Callable[[nn.Module], None],
) -> tuple[float, float]:
    set_train_mode(model)
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in loader:
        images, targets = (
            images.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
        )
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(images)
            loss = loss_fn(logits, targets)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {loss.item()} in epoch {epoch}: lower the learning rate, enable "
                "grad_clip_norm, or check the data for broken images"
            )
        scaler.scale(loss).backward()
        if grad_clip_norm:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(dim=1) == targets).sum().item()
        seen += len(targets)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def fit(
    model: nn.Module,
    param_groups: list[dict],
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    *,
    epochs: int,
    device: torch.device,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.0,
    grad_clip_norm: float | None = None,
    on_epoch_end: EpochCallback | None = None,
    set_train_mode: Callable[[nn.Module], None] = nn.Module.train,
) -> TrainResult:
    """Train with AdamW and a one-cycle schedule; keep the weights of the best validation epoch.

    ``param_groups`` carry their own ``lr`` (the peak of the cycle), which is how
    fine-tuning gives the backbone a smaller rate than the new head.
    ``set_train_mode`` lets feature extraction keep a frozen backbone's
    BatchNorm statistics fixed while the head trains.
    """
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    steps = max(1, epochs * len(train_loader))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in param_groups],
        total_steps=steps,
        pct_start=0.2,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    result = TrainResult()
    best_score, best_state = -math.inf, None
    for epoch in range(1, epochs + 1):
        train_loss, train_acc = _train_one_epoch(
            model,
            train_loader,
            optimizer,
            scheduler,
            loss_fn,
            device,
            grad_clip_norm,
            scaler,
            epoch,
            set_train_mode,
        )
        record = {"train_loss": train_loss, "train_accuracy": train_acc}
        if val_loader is not None:
            val_logits, val_targets = predict_logits(model, val_loader, device)
            record["val_loss"] = loss_fn(val_logits, val_targets).item()
            record["val_accuracy"] = accuracy(val_logits, val_targets)
            score = record["val_accuracy"] - 1e-6 * record["val_loss"]
        else:
            score = train_acc
        if score > best_score:
            best_score, result.best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
            result.best_val_accuracy = record.get("val_accuracy", float("nan"))
        result.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record, epoch)
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
