"""The training loop, shared by source pretraining, target fine-tuning and the scratch baseline.

Fine-tuning is this same loop with a different initial model, trainable set and
per-group learning rates (nanoGPT's rule); strategies reach into it only through
``param_groups`` and the ``prepare_epoch`` hook. Reporting goes through a callback
so this module never needs to know about MLflow or Prefect. Every epoch is a pure
function of ``(seed, epoch)`` and the checkpointed state, which is what makes a
resumed run end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from roadshift.config import BaseSection
from roadshift.errors import RoadshiftError
from roadshift.train.checkpoints import Checkpointing
from roadshift.train.distributed import current_group, init_distributed
from roadshift.train.loaders import make_loader, set_loader_epoch
from roadshift.train.progress import EpochProgress
from roadshift.train.runtime import torch_threads

EpochCallback = Callable[[dict[str, float], int], None]
EpochHook = Callable[[nn.Module, int], None]

__all__ = ["make_loader"]  # re-exported: stages build loaders from here


class TrainingDivergedError(RoadshiftError, RuntimeError):
    """The loss became NaN or infinite; continuing would only corrupt the weights."""


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    schedule: Literal["one_cycle", "cosine", "constant"] = "one_cycle"
    warmup_fraction: float = 0.2
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_alpha: float = 0.4
    mix_probability: float = 0.5
    early_stopping_patience: int | None = None
    seed: int = 0
    progress: bool = False
    description: str = "train"


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")
    stopped_early_at: int | None = None
    resumed_from_epoch: int = 0


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device: cuda requested but no CUDA device is available")
    if choice in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def limit_interop_threads(threads: int) -> None:
    """No more inter-op threads than intra-op ones (torch's default is one per core).

    torch takes this setting once, before any inter-op work; a process that already ran
    some (a second ``configure_runtime`` in one process) keeps the count it has.
    """
    if torch.get_num_interop_threads() <= threads:
        return
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # documented: too late once inter-op work has started
        return


def configure_runtime(base: BaseSection) -> torch.device:
    """Seed everything, pin thread counts and join a torchrun group if there is one.

    With ``deterministic`` a CPU run is bitwise repeatable.
    """
    random.seed(base.seed)
    np.random.seed(base.seed)
    torch.manual_seed(base.seed)
    threads = torch_threads(base)
    torch.set_num_threads(threads)
    limit_interop_threads(threads)
    if base.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return init_distributed(resolve_device(base.device))


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where the GPU has it (no loss scaling), float16 on older GPUs, none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def create_optimizer(param_groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel: PyTorch picks its per-tensor loop on CPU, which took
    15-40 ms per step of the default backbone here against 2 ms fused (a quarter of the
    whole training step). Deterministic, and its state dict is the usual one."""
    return torch.optim.AdamW(param_groups, weight_decay=weight_decay, fused=True)


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last on every device: measured here, a CPU training step of the default
    backbone runs about 1.8x faster on it than on NCHW (bench/bench_training_loop.py)."""
    images = images.to(device, non_blocking=True)
    if images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    dtype = amp_dtype(device)
    all_logits, all_targets = [], []
    for images, targets in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(_to_device(images, device))
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
    return torch.cat(all_logits), torch.cat(all_targets)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    if len(targets) == 0:
        return float("nan")
    return (logits.argmax(dim=1) == targets).float().mean().item()


def schedule_factor(schedule: str, step: int, total_steps: int, warmup_fraction: float) -> float:
    """The lr multiplier at ``step``: a warm-up over ``warmup_fraction`` of the steps, then
    one-cycle (cosine up from 1/25, cosine down to ~0), cosine (linear up, cosine down) or
    constant. Written out rather than OneCycleLR, which divides by zero on very short runs."""
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        if schedule == "one_cycle":
            start = 1.0 / 25.0
            return start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * step / warmup))
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(1, total_steps - warmup), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def create_scheduler(
    optimizer: torch.optim.Optimizer, options: FitOptions, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule; each group's ``lr`` is its peak."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            schedule_factor,
            options.schedule,
            total_steps=total_steps,
            warmup_fraction=options.warmup_fraction,
        ),
    )


def mix_batch(
    images: torch.Tensor, targets: torch.Tensor, options: FitOptions, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix on a batch; returns images, the partner targets and the mixing weight."""
    if options.mix == "none" or len(targets) < 2 or rng.random() >= options.mix_probability:
        return images, targets, 1.0
    lam = float(rng.beta(options.mix_alpha, options.mix_alpha))
    partner = torch.from_numpy(rng.permutation(len(targets))).to(images.device)
    if options.mix == "mixup":
        return lam * images + (1.0 - lam) * images[partner], targets[partner], lam
    height, width = images.shape[-2:]
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[partner][..., top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, targets[partner], lam


def _seed_epoch(seed: int, epoch: int) -> np.random.Generator:
    """Reseed dropout and friends from (seed, epoch); returns the epoch's mixing RNG."""
    epoch_seed = int(np.random.default_rng([seed, epoch]).integers(0, 2**31))
    torch.manual_seed(epoch_seed)
    np.random.seed(epoch_seed)
    random.seed(epoch_seed)
    return np.random.default_rng([seed, epoch, 2])


def _clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> None:
    """``clip_grad_norm_``, minus its no-op: it multiplies every gradient by
    ``min(1, max_norm / norm)`` at every step, a pass over all of them (~1 % of a CPU step
    here) that changes nothing while the norm is under the limit, as it mostly is."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = nn.utils.get_total_norm(grads)
    # on a GPU, reading the norm back would stall it every step: always scale there.
    # The comparison is the one behind clip_grad_norm_'s clamp of the scaling factor.
    on_gpu = total.device.type != "cpu"
    if on_gpu or (max_norm / (total + 1e-6)).item() < 1.0:
        nn.utils.clip_grads_with_norm_(parameters, max_norm, total)


@dataclass
class _Step:
    """What one epoch needs besides the model and the data."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    device: torch.device
    options: FitOptions


def _train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    step: _Step,
    epoch: int,
    rng: np.random.Generator,
    progress: EpochProgress,
) -> dict[str, float]:
    dtype = amp_dtype(step.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, seen
    started = time.perf_counter()
    progress.start_epoch(epoch, len(loader))
    for images, targets in loader:
        images, targets = _to_device(images, step.device), targets.to(step.device)
        images, partner, lam = mix_batch(images, targets, step.options, rng)
        step.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(step.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
            loss = lam * step.loss_fn(logits, targets)
            if lam < 1.0:
                loss = loss + (1.0 - lam) * step.loss_fn(logits, partner)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingDivergedError(
                f"{step.options.description}: loss became {loss_value} in epoch {epoch}: lower "
                "the learning rate, enable grad_clip_norm, or check the data for broken images"
            )
        step.scaler.scale(loss).backward()
        if step.options.grad_clip_norm:
            step.scaler.unscale_(step.optimizer)
            _clip_gradients(trainable, step.options.grad_clip_norm)
        step.scaler.step(step.optimizer)
        step.scaler.update()
        step.scheduler.step()
        dominant = targets if lam >= 0.5 else partner
        correct = (logits.argmax(dim=1) == dominant).sum().item()
        sums += torch.tensor([loss_value * len(targets), correct, len(targets)], dtype=sums.dtype)
        progress.advance(loss_value)
    seconds = time.perf_counter() - started
    if current_group().is_distributed:
        dist.all_reduce(sums)
    seen = max(sums[2].item(), 1.0)
    return {
        "train_loss": sums[0].item() / seen,
        "train_accuracy": sums[1].item() / seen,
        "train_images_per_second": seen / max(seconds, 1e-9),
        "lr": max(group["lr"] for group in step.optimizer.param_groups),
    }


@dataclass
class _Best:
    score: float = -math.inf
    epoch: int = 0
    val_accuracy: float = float("nan")
    state: dict[str, torch.Tensor] | None = None
    stale_epochs: int = 0

    def update(self, record: dict[str, float], model: nn.Module, epoch: int) -> None:
        if "val_accuracy" in record:
            score = record["val_accuracy"] - 1e-6 * record["val_loss"]
        else:
            score = -record["train_loss"]
        if score > self.score:
            self.score, self.epoch, self.stale_epochs = score, epoch, 0
            self.val_accuracy = record.get("val_accuracy", float("nan"))
            self.state = copy.deepcopy(model.state_dict())
        else:
            self.stale_epochs += 1


def _checkpoint_state(
    epoch: int, model: nn.Module, step: _Step, best: _Best, history: list[dict[str, float]]
) -> dict:
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "scaler": step.scaler.state_dict(),
        "best": {
            "score": best.score,
            "epoch": best.epoch,
            "val_accuracy": best.val_accuracy,
            "state": best.state,
            "stale_epochs": best.stale_epochs,
        },
        "history": history,
    }


def _worth_saving(
    checkpoint: Checkpointing, epoch: int, options: FitOptions, stopped: bool
) -> bool:
    """The last epoch is not saved: the run ends and clears its checkpoint right after."""
    return epoch < options.epochs and not stopped and checkpoint.due()


def _resume(
    checkpoint: Checkpointing | None, model: nn.Module, step: _Step, best: _Best
) -> tuple[int, list[dict[str, float]]]:
    """Restore the last checkpoint, if any; returns the last finished epoch and the history."""
    state = checkpoint.load() if checkpoint is not None else None
    if state is None:
        return 0, []
    model.load_state_dict(state["model"])
    step.optimizer.load_state_dict(state["optimizer"])
    step.scheduler.load_state_dict(state["scheduler"])
    step.scaler.load_state_dict(state["scaler"])
    saved = state["best"]
    best.score, best.epoch = saved["score"], saved["epoch"]
    best.val_accuracy, best.state = saved["val_accuracy"], saved["state"]
    best.stale_epochs = saved["stale_epochs"]
    name = step.options.description
    print(f"{name}: resuming after epoch {state['epoch']} from {checkpoint.path}")
    return int(state["epoch"]), list(state["history"])


def _validate(
    model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device
) -> dict[str, float]:
    logits, targets = predict_logits(model, loader, device)
    return {"val_loss": loss_fn(logits, targets).item(), "val_accuracy": accuracy(logits, targets)}


def _wrap_for_data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    if not current_group().is_distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _average_buffers_across_ranks(model: nn.Module) -> None:
    """Each rank's BatchNorm saw only its shard; the mean over ranks is the statistic over all
    the data, and it leaves every rank validating (and saving) the same model."""
    if not current_group().is_distributed:
        return
    world = current_group().world_size
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)


def _trainable_mask(model: nn.Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


def fit(
    model: nn.Module,
    param_groups: list[dict],
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    options: FitOptions,
    *,
    device: torch.device,
    on_epoch_end: EpochCallback | None = None,
    prepare_epoch: EpochHook | None = None,
    checkpoint: Checkpointing | None = None,
) -> TrainResult:
    """Train with AdamW; keep the weights of the best validation epoch.

    ``param_groups`` carry their own peak ``lr``, which is how fine-tuning gives
    the backbone smaller rates than the new head. ``prepare_epoch(model, epoch)``
    runs after ``model.train()`` at every epoch start: strategies freeze blocks or
    keep BatchNorm statistics fixed there. With ``checkpoint`` the state is saved
    at epoch ends (as often as ``checkpoint.every_seconds`` allows) and a rerun
    continues from it. Under torchrun the model is
    wrapped in DistributedDataParallel, and only rank 0 reports and checkpoints.
    """
    group = current_group()
    main = group.is_main
    if group.is_distributed and main:
        print(f"{options.description}: data-parallel on {group.world_size} processes")
    model.to(device).to(memory_format=torch.channels_last)  # see _to_device
    dtype = amp_dtype(device)
    optimizer = create_optimizer(param_groups, options.weight_decay)
    step = _Step(
        optimizer=optimizer,
        scheduler=create_scheduler(optimizer, options, max(1, options.epochs * len(train_loader))),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=options.label_smoothing),
        device=device,
        options=options,
    )
    best = _Best()
    done, history = _resume(checkpoint, model, step, best)
    result = TrainResult(history=history, resumed_from_epoch=done)
    if on_epoch_end is not None and main:
        for epoch, record in enumerate(history, start=1):
            on_epoch_end(record, epoch)  # a resumed run's tracking shows every epoch
    if prepare_epoch is not None:
        prepare_epoch(model, done + 1)
    trainable_at_wrap = _trainable_mask(model)
    train_model = _wrap_for_data_parallel(model, device)
    stopped = best.stale_epochs >= (options.early_stopping_patience or math.inf)
    with EpochProgress(options.progress and main, options.description, options.epochs) as bars:
        for epoch in range(done + 1, options.epochs + 1):
            if stopped:
                break
            rng = _seed_epoch(options.seed, epoch)
            set_loader_epoch(train_loader, epoch)
            train_model.train()
            if prepare_epoch is not None:
                prepare_epoch(model, epoch)
                if train_model is not model and _trainable_mask(model) != trainable_at_wrap:
                    raise ValueError(
                        "finetune.progressive_unfreeze_epochs: changing the trainable set "
                        "mid-run is not supported under torchrun (DistributedDataParallel)"
                    )
            record = _train_one_epoch(train_model, train_loader, step, epoch, rng, bars)
            _average_buffers_across_ranks(model)
            if val_loader is not None:
                record.update(_validate(model, val_loader, step.loss_fn, device))
            best.update(record, model, epoch)
            result.history.append(record)
            bars.end_epoch(record)
            stopped = best.stale_epochs >= (options.early_stopping_patience or math.inf)
            if stopped:
                result.stopped_early_at = epoch
            if main:
                if on_epoch_end is not None:
                    on_epoch_end(record, epoch)
                if checkpoint is not None and _worth_saving(checkpoint, epoch, options, stopped):
                    checkpoint.save(_checkpoint_state(epoch, model, step, best, result.history))
    if best.state is not None:
        model.load_state_dict(best.state)
    result.best_epoch, result.best_val_accuracy = best.epoch, best.val_accuracy
    if checkpoint is not None and main:
        checkpoint.clear()
    return result
