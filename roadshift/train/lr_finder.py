"""Learning-rate range test (Leslie Smith, 2015; fastai's "lr finder").

Before a fine-tuning run we sweep the learning rate exponentially over a few
hundred mini-batches and watch the loss: too small and nothing moves, too large
and it blows up. The rate where the loss falls fastest is a good peak rate for
the one-cycle schedule in :func:`roadshift.train.loop.fit`. The sweep trains the
real model, so everything it touches (weights, BatchNorm statistics, gradients,
``requires_grad``, train/eval flags and the global RNG streams) is put back
afterwards: the caller then trains from exactly the start it would have had.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from roadshift.train.loop import create_optimizer

MIN_POINTS = 10
"""Fewer recorded steps than this cannot show a descent followed by a minimum."""

SKIP_FRACTION = 0.1
"""Share of the first points ignored for the suggestion: the bias-corrected
average still rests on a handful of batches there, so its slope is noise."""

MIN_CAP_DIVISOR = 2.0
"""The suggestion never exceeds lr(minimum smoothed loss) / this. The smoothed
minimum lags the true one, so its lr is already on the edge of instability."""


@dataclass(frozen=True)
class LrRangeResult:
    """What the sweep saw and what it recommends.

    ``lrs`` belong to the reference group (the one with the largest base lr);
    other groups ran at the same multiple of their own base lr, and
    ``suggested_group_lrs`` turns the suggestion into one lr per group, in the
    order the groups were given.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float
    reason: str
    final_group_lrs: list[float] = field(default_factory=list)
    suggested_group_lrs: list[float] = field(default_factory=list)
    stopped_early: bool = False


def lr_range_test(
    model: nn.Module,
    param_groups: list[dict],
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    loss_fn: nn.Module,
    start_lr: float = 1e-6,
    end_lr: float = 1.0,
    num_steps: int = 100,
    weight_decay: float = 1e-4,
    smoothing: float = 0.05,
    diverge_factor: float = 4.0,
    prepare: Callable[[nn.Module], None] | None = None,
) -> LrRangeResult:
    """Sweep the lr from ``start_lr`` to ``end_lr`` with AdamW and suggest a peak lr.

    The reference group (largest base ``lr``) runs at
    ``start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))`` at step ``i``;
    every other group keeps its ratio to it, so a backbone that should learn
    10x slower than the head does so here too. The loader is restarted as often
    as needed. The sweep stops early on a non-finite loss (that step is not
    recorded) or once the smoothed loss exceeds ``diverge_factor`` times the
    best smoothed loss so far (that step is recorded).

    Smoothing: ``avg = (1 - smoothing) * avg + smoothing * loss``, divided by
    ``1 - (1 - smoothing) ** (i + 1)`` so early points are not biased to zero.

    Suggestion rule: take the slope of the smoothed loss against log10(lr),
    ignore the first ~10% of points and everything after the minimum smoothed
    loss, pick the lr of the steepest descent, and cap it at
    ``lr(minimum) / 2``. Raises ``ValueError`` when fewer than 10 points were
    recorded or the minimum falls inside the ignored start, i.e. the sweep
    never showed a descent; lowering ``start_lr`` or raising ``num_steps`` helps.

    ``prepare`` is called instead of ``model.train()``, e.g. to keep a frozen
    backbone's BatchNorm in eval mode as the real run will. The model is moved
    to ``device`` (as ``fit`` does) and left there. Runs in fp32 without autocast.
    Global torch RNG state (CPU and ``device``'s CUDA) is restored afterwards,
    so a seeded caller gets the same draws with or without the sweep; a loader
    with its own ``generator`` still advances that generator.
    """
    _check_arguments(start_lr, end_lr, num_steps, smoothing, diverge_factor)
    groups = [{**group, "params": list(group["params"])} for group in param_groups]
    scales = _group_scales(groups)
    model.to(device)
    with _restored_model(model), _forked_rng(device), torch.enable_grad():
        (prepare or nn.Module.train)(model)
        optimizer = create_optimizer(groups, weight_decay)
        sweep = _Sweep(start_lr, end_lr, num_steps, smoothing, diverge_factor)
        for step, (inputs, targets) in zip(range(num_steps), _cycle(loader), strict=False):
            lr = sweep.lr_at(step)
            for group, scale in zip(optimizer.param_groups, scales, strict=True):
                group["lr"] = lr * scale
            loss = _train_step(model, optimizer, loss_fn, inputs, targets, device)
            if not sweep.record(lr, loss):
                break
        optimizer.zero_grad(set_to_none=True)
    if len(sweep.lrs) < MIN_POINTS:
        raise ValueError(
            f"lr range test stopped after {len(sweep.lrs)} of num_steps={num_steps} steps "
            f"({sweep.stop_reason}); at least {MIN_POINTS} are needed to judge the curve: "
            f"lower start_lr (now {start_lr:g}) or end_lr, or raise num_steps"
        )
    suggested, reason = suggest_lr(sweep.lrs, sweep.smoothed, start_lr, num_steps)
    return LrRangeResult(
        lrs=sweep.lrs,
        losses=sweep.losses,
        smoothed=sweep.smoothed,
        suggested_lr=suggested,
        reason=reason + (f"; stopped early: {sweep.stop_reason}" if sweep.stop_reason else ""),
        final_group_lrs=[sweep.lrs[-1] * scale for scale in scales],
        suggested_group_lrs=[suggested * scale for scale in scales],
        stopped_early=bool(sweep.stop_reason),
    )


def suggest_lr(
    lrs: list[float], smoothed: list[float], start_lr: float, num_steps: int
) -> tuple[float, str]:
    """Steepest descent of the smoothed loss before its minimum, capped at lr(min) / 2.

    Separate from the sweep so a curve can be re-judged (or tested) without
    training anything. ``start_lr``/``num_steps`` only go into the error text.
    """
    if len(lrs) < MIN_POINTS:
        raise ValueError(
            f"only {len(lrs)} lr range test points (num_steps={num_steps}); at least "
            f"{MIN_POINTS} are needed to judge the curve: lower start_lr (now {start_lr:g}) "
            "or raise num_steps"
        )
    loss = np.asarray(smoothed, dtype=np.float64)
    log_lr = np.log10(np.asarray(lrs, dtype=np.float64))
    skip = max(1, math.ceil(SKIP_FRACTION * len(lrs)))
    i_min = int(np.argmin(loss))
    if i_min <= skip:
        raise ValueError(
            f"the smoothed loss is lowest at lr={lrs[i_min]:.3g} (step {i_min} of {len(lrs)}), "
            f"inside the first {skip} points the suggestion ignores, so the sweep never showed "
            f"a descent: lower start_lr (now {start_lr:g}) or raise num_steps (now {num_steps})"
        )
    slope = np.gradient(loss, log_lr)
    i_steep = skip + int(np.argmin(slope[skip:i_min]))
    cap = lrs[i_min] / MIN_CAP_DIVISOR
    if lrs[i_steep] <= cap:
        return lrs[i_steep], (
            f"steepest descent of the smoothed loss at lr={lrs[i_steep]:.3g} "
            f"(slope {slope[i_steep]:.3g} per decade, step {i_steep}), below the cap "
            f"lr(min loss)/{MIN_CAP_DIVISOR:g}={cap:.3g}; first {skip} points ignored"
        )
    return cap, (
        f"steepest descent at lr={lrs[i_steep]:.3g} (step {i_steep}) is above the cap, so "
        f"suggested lr(min loss)/{MIN_CAP_DIVISOR:g} = {lrs[i_min]:.3g}/{MIN_CAP_DIVISOR:g}"
        f" = {cap:.3g}; first {skip} points ignored"
    )


def plot_lr_range(result: LrRangeResult, path: Path) -> Path:
    """Write the loss-vs-lr curve as a PNG so a human can sanity-check the suggestion.

    Uses a bare Agg ``Figure`` rather than pyplot: no global backend switch, no
    figure registry to leak from a long-running worker.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    ax.axvline(
        result.suggested_lr,
        color="C3",
        linestyle="--",
        label=f"suggested lr = {result.suggested_lr:.3g}",
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (reference group)")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


class _Sweep:
    """The lr schedule plus the recorded curve and the stopping rule."""

    def __init__(
        self,
        start_lr: float,
        end_lr: float,
        num_steps: int,
        smoothing: float,
        diverge_factor: float,
    ) -> None:
        self.start_lr, self.end_lr, self.num_steps = start_lr, end_lr, num_steps
        self.smoothing, self.diverge_factor = smoothing, diverge_factor
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.stop_reason = ""
        self._avg = 0.0
        self._best = math.inf

    def lr_at(self, step: int) -> float:
        """Exponential ramp that hits start_lr at step 0 and end_lr at the last step."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / (self.num_steps - 1))

    def record(self, lr: float, loss: float) -> bool:
        """Append one step; False when the sweep should stop."""
        if not math.isfinite(loss):
            self.stop_reason = f"loss became {loss} at lr={lr:.3g}"
            return False
        self._avg = (1 - self.smoothing) * self._avg + self.smoothing * loss
        value = self._avg / (1 - (1 - self.smoothing) ** (len(self.lrs) + 1))
        self.lrs.append(lr)
        self.losses.append(loss)
        self.smoothed.append(value)
        self._best = min(self._best, value)
        if self._best > 0 and value > self.diverge_factor * self._best:
            self.stop_reason = (
                f"smoothed loss {value:.3g} exceeded {self.diverge_factor:g} x best "
                f"{self._best:.3g} at lr={lr:.3g}"
            )
            return False
        return True


def _check_arguments(
    start_lr: float, end_lr: float, num_steps: int, smoothing: float, diverge_factor: float
) -> None:
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if num_steps < MIN_POINTS:
        raise ValueError(
            f"num_steps={num_steps}: at least {MIN_POINTS} are needed for a suggestion"
        )
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing={smoothing}: must be in (0, 1]")
    if diverge_factor <= 1:
        raise ValueError(f"diverge_factor={diverge_factor}: must be > 1")


def _group_scales(groups: list[dict]) -> list[float]:
    """Each group's lr as a fraction of the largest, which becomes the reference."""
    if not groups:
        raise ValueError("param_groups is empty")
    if any("lr" not in group for group in groups):
        raise ValueError("every param group needs an 'lr' so the ratios between groups are known")
    reference = max(float(group["lr"]) for group in groups)
    if reference <= 0:
        raise ValueError("at least one param group needs a positive 'lr'")
    return [float(group["lr"]) / reference for group in groups]


def _cycle(loader: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Restart the loader when it runs out; a loader that yields nothing is an error."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yielded no batches")


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    device: torch.device,
) -> float:
    """One AdamW step; returns the loss before the update. A non-finite loss skips the step."""
    inputs, targets = inputs.to(device), targets.to(device)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    value = loss.item()
    if math.isfinite(value):
        loss.backward()
        optimizer.step()
    return value


@contextlib.contextmanager
def _restored_model(model: nn.Module) -> Iterator[None]:
    """Put back every parameter, buffer, gradient, requires_grad and train flag on exit.

    Snapshots go to CPU so a large model on the GPU does not need twice the
    memory; copying back is bit-exact. Named parameters and buffers cover the
    state_dict plus non-persistent buffers.
    """
    tensors = {
        name: tensor.detach().to("cpu", copy=True)
        for name, tensor in (*model.named_parameters(), *model.named_buffers())
    }
    grads = {
        name: None if p.grad is None else p.grad.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
    }
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    training = {name: module.training for name, module in model.named_modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, tensor in (*model.named_parameters(), *model.named_buffers()):
                tensor.copy_(tensors[name])
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad[name])
            saved = grads[name]
            param.grad = None if saved is None else saved.to(param.device)
        for name, module in model.named_modules():
            module.training = training[name]


def _forked_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Restore the CPU (and this CUDA device's) RNG afterwards, so the sweep is invisible."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.accelerator.current_device_index()
    return torch.random.fork_rng(devices=[index], device_type=device.type)
