"""Target-domain fine-tuning, starting from the source model.

Two strategies, after the usual rule of thumb: with little target data that
looks like the source, train only a new head on frozen features
(``feature_extraction``); with more data or a bigger shift, let the whole
network adapt, the backbone at a smaller learning rate than the head
(``fine_tune``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from roadshift.config import Params
from roadshift.data.manifest import class_names, read_manifest
from roadshift.jsonio import write_json
from roadshift.layout import Layout
from roadshift.models import (
    backbone_parameters,
    head_module_name,
    head_parameters,
    load_model_dir,
    replace_head,
    save_model_dir,
)
from roadshift.stages.common import (
    EpochCallback,
    StageOutcome,
    eval_loader,
    fit_options,
    train_loader,
)
from roadshift.training import accuracy, configure_runtime, fit, predict_logits


class LabelSetMismatchError(ValueError):
    """The target classes differ from the ones the source model learned."""


def _check_label_sets(source: tuple[str, ...], target: tuple[str, ...]) -> None:
    if source == target:
        return
    only_source = sorted(set(source) - set(target))
    only_target = sorted(set(target) - set(source))
    raise LabelSetMismatchError(
        "source and target domains must share one label set: "
        f"only in source: {only_source or 'none'}; only in target: {only_target or 'none'}"
    )


def _frozen_backbone_train_mode(head: nn.Module):
    """Train the head while the frozen backbone's BatchNorm keeps its source statistics."""
    head_modules = set(head.modules())

    def set_mode(model: nn.Module) -> None:
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module not in head_modules:
                module.eval()

    return set_mode


def trainable_groups(model: nn.Module, architecture: str, params: Params) -> list[dict]:
    """Freeze or unfreeze per strategy and return the optimiser's parameter groups."""
    section = params.finetune
    head = head_parameters(model, architecture)
    backbone = backbone_parameters(model, architecture)
    if section.strategy == "feature_extraction":
        for parameter in backbone:
            parameter.requires_grad_(False)
        return [{"params": head, "lr": section.lr}]
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return [
        {"params": backbone, "lr": section.lr * section.backbone_lr_factor},
        {"params": head, "lr": section.lr},
    ]


def run_finetune(
    params: Params, root: Path, on_epoch_end: EpochCallback | None = None
) -> StageOutcome:
    device = configure_runtime(params.base)
    layout = Layout(root)
    model, spec = load_model_dir(layout.model_dir("source"))
    manifest = read_manifest(layout.validated_manifest("target"))
    _check_label_sets(spec.class_names, class_names(manifest))
    section = params.finetune
    if section.strategy == "feature_extraction":
        replace_head(model, spec.architecture, spec.num_classes)
    groups = trainable_groups(model, spec.architecture, params)
    set_mode = (
        _frozen_backbone_train_mode(getattr(model, head_module_name(spec.architecture)))
        if section.strategy == "feature_extraction"
        else nn.Module.train
    )
    val = eval_loader(manifest, "val", root, spec, params.evaluate.batch_size, params.base.seed)
    result = fit(
        model,
        groups,
        train_loader(manifest, root, spec, section, params),
        val,
        device=device,
        **fit_options(section),
        on_epoch_end=on_epoch_end,
        set_train_mode=set_mode,
    )
    trainable = sum(p.numel() for group in groups for p in group["params"])
    metrics = {
        "best_epoch": float(result.best_epoch),
        "target_val_accuracy": result.best_val_accuracy,
        "trainable_parameters": float(trainable),
    }
    if val is not None:
        metrics["target_val_accuracy"] = accuracy(*predict_logits(model, val, device))
    model_dir = save_model_dir(model, spec, layout.model_dir("target"))
    metrics_path = write_json(layout.metrics("finetune"), metrics)
    details = {"model_dir": model_dir, "history": result.history, "strategy": section.strategy}
    return StageOutcome(metrics, [metrics_path], details)
