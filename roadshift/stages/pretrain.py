"""Source-domain pretraining: learn road signs where labels are plentiful."""

from __future__ import annotations

from pathlib import Path

from roadshift.config import Params
from roadshift.jsonio import write_metrics
from roadshift.layout import Layout
from roadshift.stages.outcome import StageOutcome
from roadshift.train.distributed import current_group
from roadshift.train.loop import accuracy, configure_runtime, predict_logits
from roadshift.train.models import save_model_dir
from roadshift.train.recipe import (
    EpochCallback,
    eval_loader,
    train_new_model,
)


def run_pretrain(
    params: Params, root: Path, on_epoch_end: EpochCallback | None = None
) -> StageOutcome:
    device = configure_runtime(params.base)
    layout = Layout(root)
    trained = train_new_model(
        "pretrain",
        layout.validated_manifest("source"),
        params,
        root,
        device,
        weights=params.model.weights,
        on_epoch_end=on_epoch_end,
    )
    if not current_group().is_main:
        return StageOutcome({})  # rank 0 alone writes the model and metrics
    model, spec, result = trained.model, trained.spec, trained.result
    metrics = {
        "best_epoch": float(result.best_epoch),
        "source_val_accuracy": result.best_val_accuracy,
        **trained.lr_choice.metrics,
    }
    test = eval_loader(
        trained.manifest, "test", root, spec, params.evaluate.batch_size, params.base.seed
    )
    if test is not None:
        metrics["source_test_accuracy"] = accuracy(*predict_logits(model, test, device))
    model_dir = save_model_dir(model, spec, layout.model_dir("source"))
    metrics_path = write_metrics(layout.metrics("pretrain"), metrics)
    return StageOutcome(
        metrics,
        [metrics_path, *trained.lr_choice.artifacts],
        {"model_dir": model_dir, "history": result.history},
    )
