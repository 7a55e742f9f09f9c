"""Semi-supervised domain adaptation: AdaBN, then FixMatch/AdaMatch-style self-training.

Target labels are scarce; unlabelled target images are cheap. Two uses of them carry most
of the gain reported on digit-style shifts (MNIST -> MNIST-M: 52-64 % source-only, 99 %
with AdaMatch and no target label):

- ``adapt_batchnorm`` (AdaBN): BatchNorm statistics recomputed on target images, so every
  layer normalises target activations with target statistics. Weights are untouched.
- ``self_train``: each step takes a labelled batch (weak view, cross-entropy) and ``mu``
  times as many unlabelled images. The weak view of an unlabelled image is pseudo-labelled
  where the model is confident; its strong view (``StrongBatchTransform``: inversion,
  grayscale, cutout, wide colour jitter) is trained towards that label. The model thus
  labels its own target data where it is sure, and learns to give the same answer under
  changes the source never showed. All views go through one forward pass, so BatchNorm
  normalises the labelled and unlabelled images with statistics of both.

From AdaMatch, optionally: a *relative* confidence threshold (``confidence_threshold`` x
the mean confidence on the labelled batch: the bar follows how sure the model is on data
it knows) and *distribution alignment* (the unlabelled predictions rescaled so that their
mean class distribution matches the labelled one's, which keeps a model biased towards a
few classes from pseudo-labelling everything as those). From mean teacher, optionally: an
EMA of the weights produces the pseudo-labels (``ema_decay``), steadier than the student.

Training starts from the given model (the source model or a fine-tuned one), so the first
pseudo-labels are already as good as that model. The BatchNorm statistics the model keeps
for inference are the running ones of the training batches (labelled and unlabelled
target views together). Re-estimating them on the clean unlabelled images instead (AdaBN
after each epoch) was measured worse on the synthetic US -> India data, by 1-3 points of
target accuracy at every epoch: the weights were trained under the statistics of the
mixed batches, not of clean ones. ``adapt_batchnorm`` stays the tool for a model whose
statistics are the source's (``finetune.batchnorm: reestimate`` does it before
fine-tuning). With a val loader, the best epoch is kept, the starting model (epoch 0)
included, so a run that does not help on val leaves the model exactly as it was.

Everything is seeded from ``seed``: which images each step takes, their augmentations and
dropout, so a CPU run repeats bitwise.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from roadshift.config import AugmentSection, SelfTrainingSection, StrongAugmentSection
from roadshift.data.batch_transforms import (
    EvalBatchTransform,
    create_batch_transform,
    create_strong_batch_transform,
)
from roadshift.train.loop import (
    TrainingDivergedError,
    accuracy,
    amp_dtype,
    create_optimizer,
    predict_logits,
    schedule_factor,
)
from roadshift.transfer.strategies import reestimate_batchnorm

UInt8Images = np.ndarray | torch.Tensor
"""Decoded images, ``(N, H, W, 3)`` uint8 (a memory-mapped cache array is fine)."""

EpochCallback = Callable[[dict[str, float], int], None]

WARMUP_FRACTION = 0.1
"""A fresh AdamW's first steps are ~lr per weight whatever the gradient; a short warm-up
keeps them from knocking a warm-started model off what it already knows."""

ALIGNMENT_MOMENTUM = 0.9
"""Class distributions for alignment are running means over ~10 steps: one labelled batch
of 32 images over 8 classes is too few to estimate a distribution."""

ADABN_BATCH_SIZE = 128


@dataclass(frozen=True)
class LabelledImages:
    """Labelled images as uint8 ``(N, H, W, 3)`` with their class indices ``(N,)``."""

    images: UInt8Images
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.images) != len(self.targets):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} targets")


@dataclass(frozen=True)
class AugmentedViews:
    """The three ways an image enters self-training: clean (AdaBN, the expected input size),
    weak (labelled loss, pseudo-labels) and strong (trained towards the pseudo-labels)."""

    clean: EvalBatchTransform
    weak: EvalBatchTransform
    strong: EvalBatchTransform


def augmented_views(
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    weak: AugmentSection,
    strong: StrongAugmentSection,
) -> AugmentedViews:
    """Views for a model's input size and normalisation (``ModelSpec``); the weak view is the
    ordinary train augmentation (``finetune.augment``)."""
    return AugmentedViews(
        clean=create_batch_transform(image_size, mean, std),
        weak=create_batch_transform(image_size, mean, std, weak),
        strong=create_strong_batch_transform(image_size, mean, std, strong),
    )


@dataclass
class SelfTrainingResult:
    """Per-epoch records, and which epoch's weights the model holds (0: the model as given)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")
    start_val_accuracy: float = float("nan")
    unlabelled_images: int = 0
    steps: int = 0

    @property
    def mask_rate(self) -> float:
        """Share of unlabelled images above the threshold in the last epoch."""
        return self.history[-1]["self_train_mask_rate"] if self.history else float("nan")


def _uint8_batch(images: UInt8Images, rows: np.ndarray) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[torch.from_numpy(rows)].contiguous()
    return torch.from_numpy(np.ascontiguousarray(images[rows]))


def _clean_batches(
    images: UInt8Images, transform: EvalBatchTransform, batch_size: int
) -> Iterator[tuple[torch.Tensor, None]]:
    """Batches of (nearly) equal size: BatchNorm's cumulative average (``momentum=None``)
    weighs every batch alike, so a short last batch would count as much as a full one."""
    count = max(1, math.ceil(len(images) / batch_size))
    for rows in np.array_split(np.arange(len(images)), count):
        yield transform(_uint8_batch(images, rows)), None


def adapt_batchnorm(
    model: nn.Module,
    images: UInt8Images | Iterable,
    device: torch.device,
    *,
    transform: EvalBatchTransform | None = None,
    batch_size: int = ADABN_BATCH_SIZE,
) -> int:
    """AdaBN: BatchNorm statistics of ``images`` alone; weights untouched. Returns the count.

    ``images`` is uint8 ``(N, H, W, 3)`` with the eval ``transform`` that normalises them,
    or a loader of ``(images, anything)`` batches already normalised. The work is
    ``strategies.reestimate_batchnorm``'s (reset, then a plain average over all batches);
    this only feeds it decoded arrays, which is what unlabelled data arrives as, in
    batches of equal size so that the average over batches is the one over images.
    """
    if isinstance(images, np.ndarray | torch.Tensor):
        if transform is None:
            raise ValueError("adapt_batchnorm: uint8 images need the eval transform")
        images = _clean_batches(images, transform, batch_size)
    return reestimate_batchnorm(model, images, device)


class _IndexStream:
    """Endless shuffled indices: permutation after permutation, each from ``(seed, pass)``,
    so a step's images depend on the seed and the step number alone."""

    def __init__(self, size: int, seed: int, stream: int) -> None:
        self.size, self.seed, self.stream = size, seed, stream
        self.passes, self.buffer = 0, np.empty(0, dtype=np.int64)

    def take(self, count: int) -> np.ndarray:
        while len(self.buffer) < count:
            rng = np.random.default_rng([self.seed, self.stream, self.passes])
            self.buffer = np.concatenate([self.buffer, rng.permutation(self.size)])
            self.passes += 1
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken


def _on_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last, as the training loop feeds the model (faster on CPU and GPU)."""
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@dataclass
class _Alignment:
    """Running mean class distributions of the labelled and the unlabelled predictions."""

    labelled: torch.Tensor | None = None
    unlabelled: torch.Tensor | None = None

    def update(self, labelled: torch.Tensor, unlabelled: torch.Tensor) -> None:
        batch_l, batch_u = labelled.mean(dim=0), unlabelled.mean(dim=0)
        if self.labelled is None or self.unlabelled is None:
            self.labelled, self.unlabelled = batch_l, batch_u
            return
        self.labelled = torch.lerp(batch_l, self.labelled, ALIGNMENT_MOMENTUM)
        self.unlabelled = torch.lerp(batch_u, self.unlabelled, ALIGNMENT_MOMENTUM)

    def align(self, probabilities: torch.Tensor) -> torch.Tensor:
        """AdaMatch: ``p * mean_labelled / mean_unlabelled``, renormalised."""
        assert self.labelled is not None and self.unlabelled is not None
        scaled = probabilities * (self.labelled / self.unlabelled.clamp_min(1e-6))
        return scaled / scaled.sum(dim=1, keepdim=True)


@dataclass
class _PseudoLabels:
    labels: torch.Tensor
    mask: torch.Tensor
    threshold: float


@torch.no_grad()
def _pseudo_labels(
    teacher_logits: torch.Tensor,
    labelled_logits: torch.Tensor,
    cfg: SelfTrainingSection,
    alignment: _Alignment,
) -> _PseudoLabels:
    """Labels and the 0/1 mask of the unlabelled images confident enough to train on."""
    probs_u = teacher_logits.float().softmax(dim=1)
    probs_l = labelled_logits.float().softmax(dim=1)
    if cfg.distribution_alignment:
        alignment.update(probs_l, probs_u)
        probs_u = alignment.align(probs_u)
    confidence, labels = probs_u.max(dim=1)
    threshold = cfg.confidence_threshold
    if cfg.relative_threshold:
        threshold *= probs_l.max(dim=1).values.mean().item()
    return _PseudoLabels(labels, (confidence >= threshold).float(), threshold)


@torch.no_grad()
def _ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Every floating-point tensor of the teacher (weights and BatchNorm statistics) follows
    the student's; counters are copied."""
    student_state = student.state_dict()
    for name, value in teacher.state_dict().items():
        if value.is_floating_point():
            value.lerp_(student_state[name], 1.0 - decay)
        else:
            value.copy_(student_state[name])


@dataclass
class _Run:
    """What every step needs besides the batch."""

    model: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    cfg: SelfTrainingSection
    views: AugmentedViews
    device: torch.device
    label_smoothing: float
    grad_clip_norm: float | None
    alignment: _Alignment = field(default_factory=_Alignment)


def _step(
    run: _Run,
    labelled: LabelledImages,
    unlabelled: UInt8Images,
    rows_l: np.ndarray,
    rows_u: np.ndarray,
    seeds: np.ndarray,
) -> torch.Tensor:
    """One optimiser step; returns (loss, labelled loss, unlabelled loss, masked, seen)."""
    views, device, cfg = run.views, run.device, run.cfg
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    raw_u = _uint8_batch(unlabelled, rows_u)
    x_l = views.weak(_uint8_batch(labelled.images, rows_l), generators[0])
    x_w = views.weak(raw_u, generators[1])
    x_s = views.strong(raw_u, generators[2])
    y_l = labelled.targets[torch.from_numpy(rows_l)].to(device)
    # one forward pass: BatchNorm normalises with statistics of labelled and unlabelled
    # images together. With a teacher the student needs no weak unlabelled view.
    parts = [x_l, x_s] if run.teacher is not None else [x_l, x_w, x_s]
    dtype = amp_dtype(device)
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = run.model(_on_device(torch.cat(parts), device)).float()
        if run.teacher is not None:
            with torch.no_grad():
                teacher_logits = run.teacher(_on_device(x_w, device)).float()
    logits_l, logits_s = logits[: len(x_l)], logits[-len(x_s) :]
    if run.teacher is None:
        teacher_logits = logits[len(x_l) : len(x_l) + len(x_w)].detach()
    pseudo = _pseudo_labels(teacher_logits, logits_l.detach(), cfg, run.alignment)
    loss_l = F.cross_entropy(logits_l, y_l, label_smoothing=run.label_smoothing)
    per_image = F.cross_entropy(logits_s, pseudo.labels, reduction="none")
    loss_u = (per_image * pseudo.mask).mean()  # over all unlabelled images, as FixMatch
    loss = loss_l + cfg.unlabeled_weight * loss_u
    if not math.isfinite(loss.item()):
        raise TrainingDivergedError(
            f"self-training: loss became {loss.item()}: lower finetune.self_training.lr"
        )
    run.scaler.scale(loss).backward()
    if run.grad_clip_norm:
        run.scaler.unscale_(run.optimizer)
        trainable = [p for p in run.model.parameters() if p.requires_grad]
        nn.utils.clip_grad_norm_(trainable, run.grad_clip_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.teacher is not None:
        _ema_update(run.teacher, run.model, float(cfg.ema_decay))
    return torch.tensor(
        [loss.item(), loss_l.item(), loss_u.item(), pseudo.mask.sum().item(), len(rows_u)],
        dtype=torch.float64,
    )


def _seed_epoch(seed: int, epoch: int) -> None:
    """Dropout and friends from ``(seed, epoch)`` alone."""
    torch.manual_seed(int(np.random.default_rng([seed, epoch, 7]).integers(0, 2**31)))


def _evaluate(model: nn.Module, val: Iterable | None, device: torch.device) -> dict[str, float]:
    if val is None:
        return {}
    logits, targets = predict_logits(model, val, device)
    return {
        "val_loss": F.cross_entropy(logits, targets).item(),
        "val_accuracy": accuracy(logits, targets),
    }


def _check_images(images: UInt8Images, name: str, image_size: int) -> None:
    """Decoded at the model's input size, or the batches would not stack or would be
    normalised as if they were something else."""
    if len(images) == 0:
        raise ValueError(f"self-training: no {name} images")
    shape, dtype = tuple(images.shape[1:]), str(images.dtype)
    if shape != (image_size, image_size, 3) or not dtype.endswith("uint8"):
        raise ValueError(
            f"self-training: {name} images must be uint8 (N, {image_size}, {image_size}, 3), "
            f"got {dtype} (N, {', '.join(map(str, shape))})"
        )


def _score(record: dict[str, float]) -> float:
    """The training loop's rule: val accuracy, ties to the lower val loss."""
    return record["val_accuracy"] - 1e-6 * record["val_loss"]


def self_train(
    model: nn.Module,
    labelled: LabelledImages,
    unlabelled: UInt8Images,
    cfg: SelfTrainingSection,
    *,
    views: AugmentedViews,
    batch_size: int,
    seed: int,
    device: torch.device,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.0,
    grad_clip_norm: float | None = None,
    val: Iterable | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> SelfTrainingResult:
    """``cfg.epochs`` epochs of self-training (see the module docstring), in place.

    ``labelled`` trains in batches of ``batch_size``, ``unlabelled`` (the labelled images
    themselves will do, their labels unused there) in batches of ``cfg.unlabeled_batch_ratio``
    times that; an epoch is a pass over whichever of the two takes more steps. The
    parameters that train are those with ``requires_grad`` (all at ``cfg.lr``, cosine decay
    after a short warm-up); the whole model is in train mode. With ``val`` (batches of
    normalised images and targets) the best epoch's weights are kept, epoch 0 (the model
    as given) included; without, the last epoch's. ``on_epoch_end(record, epoch)`` gets
    each epoch's ``self_train_mask_rate`` (share of unlabelled images above the
    threshold), losses, lr and val figures.
    """
    _check_images(labelled.images, "labelled", views.clean.image_size)
    _check_images(unlabelled, "unlabelled", views.clean.image_size)
    model.to(device).to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("self-training: no parameter of the model requires grad")
    unlabelled_batch = cfg.unlabeled_batch_ratio * batch_size
    steps_per_epoch = max(
        math.ceil(len(labelled.targets) / batch_size), math.ceil(len(unlabelled) / unlabelled_batch)
    )
    total_steps = cfg.epochs * steps_per_epoch
    teacher = None
    if cfg.ema_decay is not None:
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
    optimizer = create_optimizer([{"params": trainable, "lr": cfg.lr}], weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            schedule_factor, "cosine", total_steps=total_steps, warmup_fraction=WARMUP_FRACTION
        ),
    )
    dtype = amp_dtype(device)
    run = _Run(
        model=model,
        teacher=teacher,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        cfg=cfg,
        views=views,
        device=device,
        label_smoothing=label_smoothing,
        grad_clip_norm=grad_clip_norm,
    )
    result = SelfTrainingResult(unlabelled_images=len(unlabelled), steps=total_steps)
    start = _evaluate(model, val, device)
    best_score, best_state = -math.inf, None
    if start:
        result.start_val_accuracy = result.best_val_accuracy = start["val_accuracy"]
        best_score, best_state = _score(start), copy.deepcopy(model.state_dict())
    streams = (_IndexStream(len(labelled.targets), seed, 0), _IndexStream(len(unlabelled), seed, 1))
    for epoch in range(1, cfg.epochs + 1):
        _seed_epoch(seed, epoch)
        model.train()
        step_seeds = np.random.default_rng([seed, epoch, 3]).integers(
            0, 2**31, (steps_per_epoch, 3)
        )
        sums = torch.zeros(5, dtype=torch.float64)
        for step in range(steps_per_epoch):
            rows_l = streams[0].take(min(batch_size, len(labelled.targets)))
            rows_u = streams[1].take(unlabelled_batch)
            sums += _step(run, labelled, unlabelled, rows_l, rows_u, step_seeds[step])
        record = {
            "self_train_loss": sums[0].item() / steps_per_epoch,
            "self_train_labelled_loss": sums[1].item() / steps_per_epoch,
            "self_train_unlabelled_loss": sums[2].item() / steps_per_epoch,
            "self_train_mask_rate": sums[3].item() / sums[4].item(),
            "lr": optimizer.param_groups[0]["lr"],
        }
        record.update(_evaluate(model, val, device))
        if val is not None and _score(record) > best_score:
            best_score, best_state = _score(record), copy.deepcopy(model.state_dict())
            result.best_epoch, result.best_val_accuracy = epoch, record["val_accuracy"]
        result.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record, epoch)
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = cfg.epochs
    model.eval()
    return result
