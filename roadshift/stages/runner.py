"""What ``roadshift stage <name>`` runs: one stage, inside its MLflow stage run.

Each stage module ``roadshift.stages.<name>`` defines ``run_<name>(params, root, ...)``; it
is imported by name, so a stage command loads only its own stage's code (and dvc.yaml's
deps for that stage need to cover only that). Training stages can run as a torchrun
group (``ROADSHIFT_TRAIN_PROCESSES``); rank 0 alone tracks and writes.
"""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

from roadshift.config import Params
from roadshift.layout import Layout
from roadshift.stages.outcome import StageOutcome

TRAINING_STAGES = ("pretrain", "finetune", "scratch")
STAGES = ("prepare", "validate", *TRAINING_STAGES, "evaluate", "register")


def run_stage(name: str, params: Params, root: Path, on_epoch_end=None) -> StageOutcome:
    """The stage's own function; training stages report each epoch to ``on_epoch_end``."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    stage_function = getattr(importlib.import_module(f"roadshift.stages.{name}"), f"run_{name}")
    if name in TRAINING_STAGES:
        return stage_function(params, root, on_epoch_end=on_epoch_end)
    return stage_function(params, root)


# The figures a person reads at the console as a stage ends; all of them are in
# metrics/<stage>.json, MLflow and `dvc metrics show`.
HEADLINE_METRICS = {
    "validate": ("source_total_images", "target_total_images", "target_unlabeled_total_images"),
    "pretrain": ("source_test_accuracy", "best_epoch"),
    "finetune": ("target_val_accuracy", "best_epoch"),
    "scratch": ("scratch_val_accuracy", "best_epoch"),
    "evaluate": ("target_accuracy", "target_macro_f1"),
}


def headline(name: str, metrics: dict[str, float], root: Path) -> str | None:
    shown = [key for key in HEADLINE_METRICS.get(name, ()) if key in metrics]
    if not shown:
        return None
    figures = ", ".join(f"{key} {metrics[key]:.4g}" for key in shown)
    return f"{name}: {figures} (all: {Layout(root).metrics(name).relative_to(root)})"


def print_headline(name: str, outcome: object, root: Path) -> None:
    line = headline(name, getattr(outcome, "metrics", None) or {}, root)
    if line:
        print(line)


def run_stage_command(name: str, params: Params, root: Path, argv: list[str]) -> int:
    """Run a stage as its command does: under torchrun where asked, tracked in MLflow.

    ``argv`` is the command's own arguments, to start it again under torchrun.
    """
    from roadshift.data.mlflow_inputs import log_data_inputs
    from roadshift.tracking import (
        MetricLogger,
        configure_tracking,
        explain_tracking_outage,
        log_stage_outcome,
        resolve_tracking_uri,
        stage_run,
    )
    from roadshift.train.distributed import (
        TRAIN_PROCESSES_ENV,
        is_main_process,
        launched_by_torchrun,
        requested_processes,
        shutdown_distributed,
        torchrun_command,
    )

    if name in TRAINING_STAGES and not launched_by_torchrun():
        processes = requested_processes()
        if processes > 1:
            print(f"{name}: {TRAIN_PROCESSES_ENV}={processes}: starting torchrun")
            return subprocess.run(torchrun_command(processes, argv), check=False).returncode
    try:
        if not is_main_process():  # another rank trains its shard; rank 0 tracks and writes
            run_stage(name, params, root)
            return 0
        tracking_uri = resolve_tracking_uri(params.tracking, root)
        with explain_tracking_outage(tracking_uri, f"running stage {name}"):
            configure_tracking(params, root)
            with stage_run(name, params, root):
                log_data_inputs(params, root, name)  # the Runs page's Dataset column
                outcome = run_stage(name, params, root, on_epoch_end=MetricLogger())
                log_stage_outcome(outcome)
        print_headline(name, outcome, root)
        return 0
    finally:
        shutdown_distributed()
