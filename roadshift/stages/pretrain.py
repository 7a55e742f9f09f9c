"""Source-domain pretraining: learn road signs where labels are plentiful."""

from __future__ import annotations

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
from roadshift.training import accuracy, configure_runtime, fit, predict_logits


def run_pretrain(
    params: Params, root: Path, on_epoch_end: EpochCallback | None = None
) -> StageOutcome:
    device = configure_runtime(params.base)
    layout = Layout(root)
    manifest = read_manifest(layout.validated_manifest("source"))
    classes = class_names(manifest)
    spec = ModelSpec(
        architecture=params.model.architecture,
        class_names=classes,
        image_size=params.base.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    model = create_model(
        spec.architecture, spec.num_classes, params.model.weights, params.model.dropout
    )
    section = params.pretrain
    loaders = {
        split: eval_loader(
            manifest, split, root, spec, params.evaluate.batch_size, params.base.seed
        )
        for split in ("val", "test")
    }
    result = fit(
        model,
        [{"params": list(model.parameters()), "lr": section.lr}],
        train_loader(manifest, root, spec, section, params),
        loaders["val"],
        device=device,
        **fit_options(section),
        on_epoch_end=on_epoch_end,
    )
    metrics = {
        "best_epoch": float(result.best_epoch),
        "source_val_accuracy": result.best_val_accuracy,
    }
    if loaders["test"] is not None:
        metrics["source_test_accuracy"] = accuracy(*predict_logits(model, loaders["test"], device))
    model_dir = save_model_dir(model, spec, layout.model_dir("source"))
    metrics_path = write_json(layout.metrics("pretrain"), metrics)
    return StageOutcome(
        metrics, [metrics_path], {"model_dir": model_dir, "history": result.history}
    )
