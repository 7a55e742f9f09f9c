"""Source-domain pretraining: learn road signs where labels are plentiful."""

from __future__ import annotations

from pathlib import Path

from roadshift.config import Params
from roadshift.data.manifest import class_names, read_manifest
from roadshift.distributed import current_group
from roadshift.jsonio import write_json
from roadshift.layout import Layout
from roadshift.models import save_model_dir
from roadshift.stages.common import (
    EpochCallback,
    StageOutcome,
    eval_loader,
    fit_options,
    new_model,
    new_model_spec,
    stage_checkpointing,
    train_loader,
    tune_learning_rate,
)
from roadshift.training import accuracy, configure_runtime, fit, predict_logits


def run_pretrain(
    params: Params, root: Path, on_epoch_end: EpochCallback | None = None
) -> StageOutcome:
    device = configure_runtime(params.base)
    layout = Layout(root)
    manifest_path = layout.validated_manifest("source")
    manifest = read_manifest(manifest_path)
    spec = new_model_spec(params, class_names(manifest))
    model = new_model(spec, params, weights=params.model.weights)
    section = params.pretrain
    loaders = {
        split: eval_loader(
            manifest, split, root, spec, params.evaluate.batch_size, params.base.seed
        )
        for split in ("val", "test")
    }
    train = train_loader(manifest, root, spec, section, params)
    groups = [{"params": list(model.parameters()), "lr": section.lr, "name": "all"}]
    lr_choice = tune_learning_rate("pretrain", section, model, groups, train, device, root)
    result = fit(
        model,
        lr_choice.param_groups,
        train,
        loaders["val"],
        fit_options(section, params, "pretrain"),
        device=device,
        on_epoch_end=on_epoch_end,
        checkpoint=stage_checkpointing("pretrain", params, root, manifest_path),
    )
    if not current_group().is_main:
        return StageOutcome({})  # rank 0 alone writes the model and metrics
    metrics = {
        "best_epoch": float(result.best_epoch),
        "source_val_accuracy": result.best_val_accuracy,
        **lr_choice.metrics,
    }
    if loaders["test"] is not None:
        metrics["source_test_accuracy"] = accuracy(*predict_logits(model, loaders["test"], device))
    model_dir = save_model_dir(model, spec, layout.model_dir("source"))
    metrics_path = write_json(layout.metrics("pretrain"), metrics)
    return StageOutcome(
        metrics,
        [metrics_path, *lr_choice.artifacts],
        {"model_dir": model_dir, "history": result.history},
    )
