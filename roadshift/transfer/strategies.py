"""Which parameters fine-tuning trains, at which learning rate, from which epoch.

A plan is made once, before the optimiser: every group that will ever train is in
``param_groups`` from the start, so the optimiser (and its one-cycle schedule) is
built once, and a group that is not due yet just has ``requires_grad`` off. At the
start of each epoch the training loop calls ``prepare_epoch(model, epoch)``, which
sets ``requires_grad`` and the train/eval modes from the epoch number alone; a run
resumed from a checkpoint at epoch 7 therefore behaves exactly as one that got there.

The rules follow the usual transfer-learning practice:

- ``feature_extraction``: only the head trains; the frozen backbone is in eval mode,
  so its BatchNorm keeps the source statistics it was trained with.
- ``fine_tune``: the last ``unfreeze_blocks`` backbone blocks train too, the block
  ``i`` places from the top at ``lr * backbone_lr_factor * layer_lr_decay**i``
  (discriminative learning rates: early, generic features move least).
- ``progressive_unfreeze_epochs = k``: the head alone for ``k`` epochs, then one more
  block from the top every ``k`` epochs (ULMFiT's gradual unfreezing), so a new head
  does not send large gradients through a backbone it has not yet learnt to use.
- BatchNorm: ``adapt`` lets trainable blocks re-estimate statistics on target batches;
  ``frozen`` keeps the source statistics everywhere (affine weights still train);
  ``reestimate`` recomputes them once on the target train split (AdaBN,
  ``reestimate_batchnorm``) and then keeps them, like ``frozen``.

A frozen block is put in eval mode as a whole, not only its BatchNorm, so that it
computes exactly the features it computes at inference (EfficientNet's stochastic
depth, for instance, is off); that is also what the embedding cache sees.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from roadshift.config import FinetuneSection
from roadshift.train.models import BATCHNORM_TYPES, backbone_blocks, head_module_name, replace_head

Strategy = Literal["feature_extraction", "fine_tune"]
STRATEGIES: tuple[str, str] = ("feature_extraction", "fine_tune")
HEAD_GROUP = "head"


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, BATCHNORM_TYPES)]


def _set_requires_grad(parameters: Iterable[nn.Parameter], flag: bool) -> None:
    for parameter in parameters:
        parameter.requires_grad_(flag)


def named_blocks(model: nn.Module, architecture: str) -> list[tuple[str, nn.Module]]:
    """Backbone blocks named ``block_<index>``, input side first, as the groups are named."""
    return [(f"block_{i}", block) for i, block in enumerate(backbone_blocks(model, architecture))]


@dataclass(frozen=True)
class FinetunePlan:
    """Optimiser groups plus the per-epoch schedule that says which of them train.

    ``unfreeze_epochs`` maps each group name to the first (1-based) epoch it trains.
    """

    architecture: str
    strategy: Strategy
    batchnorm: Literal["adapt", "frozen", "reestimate"]
    param_groups: list[dict] = field(repr=False)
    unfreeze_epochs: dict[str, int] = field(default_factory=dict)

    def trains(self, name: str, epoch: int) -> bool:
        """Whether the group (or block) called ``name`` trains in ``epoch``."""
        first = self.unfreeze_epochs.get(name)
        return first is not None and epoch >= first

    def trainable_groups(self, epoch: int) -> list[str]:
        return [g["name"] for g in self.param_groups if self.trains(g["name"], epoch)]

    def trainable_parameter_count(self, epoch: int) -> int:
        """Parameters that receive gradients in ``epoch``; grows under progressive unfreezing."""
        return sum(
            p.numel()
            for group in self.param_groups
            if self.trains(group["name"], epoch)
            for p in group["params"]
        )

    def set_trainable(self, model: nn.Module, epoch: int) -> None:
        """``requires_grad`` on exactly the parameters of the groups due in ``epoch``."""
        for name, block in named_blocks(model, self.architecture):
            _set_requires_grad(block.parameters(), self.trains(name, epoch))
        head = getattr(model, head_module_name(self.architecture))
        _set_requires_grad(head.parameters(), True)

    def prepare_epoch(self, model: nn.Module, epoch: int) -> None:
        """Trainable parameters and train/eval modes for ``epoch`` (1-based), from it alone."""
        if epoch < 1:
            raise ValueError(f"epochs are counted from 1, got {epoch}")
        self.set_trainable(model, epoch)
        for name, block in named_blocks(model, self.architecture):
            if not self.trains(name, epoch):
                block.eval()
                continue
            block.train()
            if self.batchnorm != "adapt":
                for batchnorm in _batchnorms(block):
                    batchnorm.eval()
        getattr(model, head_module_name(self.architecture)).train()


def _num_classes(head: nn.Module) -> int:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the head has no nn.Linear, so its number of classes is unknown")
    return linears[-1].out_features


def _allowed_blocks(section: FinetuneSection, available: int) -> int:
    if section.unfreeze_blocks == "all":
        return available
    return min(section.unfreeze_blocks, available)


def _block_groups(
    model: nn.Module, architecture: str, section: FinetuneSection
) -> tuple[list[dict], dict[str, int]]:
    """Groups for the last ``unfreeze_blocks`` blocks, top first, with their unfreeze epochs."""
    blocks = named_blocks(model, architecture)
    allowed = _allowed_blocks(section, len(blocks))
    top_first = list(reversed(blocks))[:allowed]
    groups, unfreeze = [], {}
    for depth, (name, block) in enumerate(top_first):
        parameters = list(block.parameters())
        if not parameters:
            continue
        lr = section.lr * section.backbone_lr_factor * section.layer_lr_decay**depth
        groups.append({"params": parameters, "lr": lr, "name": name})
        unfreeze[name] = 1 + (depth + 1) * section.progressive_unfreeze_epochs
    return groups, unfreeze


def plan_finetune(
    model: nn.Module, architecture: str, section: FinetuneSection, strategy: Strategy
) -> FinetunePlan:
    """Make the plan, replace the head if ``reinit_head``, and freeze per epoch 1.

    The model is changed in place (a new head, ``requires_grad`` flags), because the
    optimiser groups must hold the very parameters that will train.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    head_name = head_module_name(architecture)
    if section.reinit_head:
        replace_head(model, architecture, _num_classes(getattr(model, head_name)))
    head = getattr(model, head_name)
    groups = [{"params": list(head.parameters()), "lr": section.lr, "name": HEAD_GROUP}]
    unfreeze = {HEAD_GROUP: 1}
    if strategy == "fine_tune":
        block_groups, block_unfreeze = _block_groups(model, architecture, section)
        groups += block_groups
        unfreeze |= block_unfreeze
    plan = FinetunePlan(architecture, strategy, section.batchnorm, groups, unfreeze)
    plan.set_trainable(model, epoch=1)
    return plan


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, loader: Iterable, device: torch.device) -> int:
    """Recompute every BatchNorm's running statistics on ``loader`` (AdaBN).

    The statistics are reset and then averaged over all batches (``momentum=None``),
    not blended with the source ones, so they describe the target data alone. The
    rest of the model runs in eval mode (no dropout); batches of a single image are
    skipped, since BatchNorm cannot take statistics of one value per channel. Modes
    and momenta are restored afterwards. Returns the number of images used.
    """
    batchnorms = _batchnorms(model)
    if not batchnorms:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = {bn: bn.momentum for bn in batchnorms}
    model.to(device).eval()
    for batchnorm in batchnorms:
        batchnorm.reset_running_stats()
        batchnorm.momentum = None
        batchnorm.train()
    seen = 0
    try:
        for images, _ in loader:
            if len(images) < 2:
                continue
            model(images.to(device, non_blocking=True))
            seen += len(images)
    finally:
        for batchnorm, momentum in momenta.items():
            batchnorm.momentum = momentum
        for module, training in modes.items():
            module.training = training
    if seen == 0:
        raise ValueError("reestimate_batchnorm: the loader gave no batch of two or more images")
    return seen
