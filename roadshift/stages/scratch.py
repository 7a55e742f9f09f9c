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
from roadshift.jsonio import write_json
from roadshift.layout import Layout
from roadshift.models import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, create_model, save_model_dir
from roadshift.stages.common import (
    EpochCallback,
    StageOutcome,
    eval_loader,
    fit_options,
    train_loader,
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
    manifest = read_manifest(layout.validated_manifest("target"))
    spec = ModelSpec(
        architecture=params.model.architecture,
        class_names=class_names(manifest),
        image_size=params.base.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    model = create_model(spec.architecture, spec.num_classes, None, params.model.dropout)
    section = params.finetune
    result = fit(
        model,
        [{"params": list(model.parameters()), "lr": section.lr}],
        train_loader(manifest, root, spec, section, params),
        eval_loader(manifest, "val", root, spec, params.evaluate.batch_size, params.base.seed),
        device=device,
        **fit_options(section),
        on_epoch_end=on_epoch_end,
    )
    metrics = {
        "best_epoch": float(result.best_epoch),
        "scratch_val_accuracy": result.best_val_accuracy,
    }
    saved = save_model_dir(model, spec, model_dir)
    metrics_path = write_json(layout.metrics("scratch"), metrics)
    return StageOutcome(metrics, [metrics_path], {"model_dir": saved, "history": result.history})
