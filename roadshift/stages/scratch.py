"""Scratch baseline: the same architecture trained from random init on the target train split only.

It answers whether the source domain helped at all: the fine-tuned model must beat
what the small target set gives on its own, under the very same schedule
(``finetune`` section). With ``evaluate.scratch_baseline: false`` the stage only
writes a marker, so DVC still has an output to track and evaluate skips the baseline.
"""

from __future__ import annotations

import json
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
from roadshift.training import configure_runtime, fit

DISABLED_MARKER = "disabled.json"


def scratch_enabled(model_dir: Path) -> bool:
    return not (model_dir / DISABLED_MARKER).is_file()


def _write_disabled_marker(model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in model_dir.iterdir():
        if stale.is_file():
            stale.unlink()
    marker = model_dir / DISABLED_MARKER
    marker.write_text(json.dumps({"reason": "evaluate.scratch_baseline is false"}) + "\n")
    return marker


def run_scratch(
    params: Params, root: Path, on_epoch_end: EpochCallback | None = None
) -> StageOutcome:
    layout = Layout(root)
    model_dir = layout.model_dir("scratch")
    if not params.evaluate.scratch_baseline:
        _write_disabled_marker(model_dir)
        return StageOutcome({}, [write_json(layout.metrics("scratch"), {})])
    device = configure_runtime(params.base)
    manifest_path = layout.validated_manifest("target")
    manifest = read_manifest(manifest_path)
    spec = new_model_spec(params, class_names(manifest))
    model = new_model(spec, params, weights=None)
    section = params.finetune
    train = train_loader(manifest, root, spec, section, params)
    groups = [{"params": list(model.parameters()), "lr": section.lr, "name": "all"}]
    lr_choice = tune_learning_rate("scratch", section, model, groups, train, device, root)
    result = fit(
        model,
        lr_choice.param_groups,
        train,
        eval_loader(manifest, "val", root, spec, params.evaluate.batch_size, params.base.seed),
        fit_options(section, params, "scratch"),
        device=device,
        on_epoch_end=on_epoch_end,
        checkpoint=stage_checkpointing("scratch", params, root, manifest_path),
    )
    if not current_group().is_main:
        return StageOutcome({})  # rank 0 alone writes the model and metrics
    metrics = {
        "best_epoch": float(result.best_epoch),
        "scratch_val_accuracy": result.best_val_accuracy,
        **lr_choice.metrics,
    }
    saved = save_model_dir(model, spec, model_dir)
    metrics_path = write_json(layout.metrics("scratch"), metrics)
    return StageOutcome(
        metrics,
        [metrics_path, *lr_choice.artifacts],
        {"model_dir": saved, "history": result.history},
    )
