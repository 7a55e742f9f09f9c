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
from roadshift.jsonio import write_json, write_metrics
from roadshift.layout import Layout
from roadshift.stages.outcome import StageOutcome
from roadshift.train.distributed import current_group
from roadshift.train.loop import configure_runtime
from roadshift.train.models import save_model_dir
from roadshift.train.recipe import (
    EpochCallback,
    train_new_model,
)

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
    trained = train_new_model(
        "scratch",
        layout.validated_manifest("target"),
        params,
        root,
        device,
        weights=None,
        on_epoch_end=on_epoch_end,
    )
    if not current_group().is_main:
        return StageOutcome({})  # rank 0 alone writes the model and metrics
    metrics = {
        "best_epoch": float(trained.result.best_epoch),
        "scratch_val_accuracy": trained.result.best_val_accuracy,
        **trained.lr_choice.metrics,
    }
    saved = save_model_dir(trained.model, trained.spec, model_dir)
    metrics_path = write_metrics(layout.metrics("scratch"), metrics)
    return StageOutcome(
        metrics,
        [metrics_path, *trained.lr_choice.artifacts],
        {"model_dir": saved, "history": trained.result.history},
    )
