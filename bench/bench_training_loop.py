"""Training-loop overhead: roadshift's ``fit`` against a bare PyTorch loop, side by side.

    .venv/bin/python bench/bench_training_loop.py [--repeats 3] [--epochs 2]

Same model (the default backbone), batch size, images, augmentation, DataLoader
and optimiser in both. ``fit`` also does everything the pipeline needs per step
and per epoch: the lr schedule, gradient clipping, label smoothing, the NaN
check, metric bookkeeping, a rich progress bar, MLflow logging of every epoch
(SQLite store) and a checkpoint after every epoch. Validation is left out of
both (it is extra work, not overhead). The runs alternate, so drift in the
machine's speed hits both; each figure is the median over the repeats.
Prints figures only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow
import torch
from torch import nn

from roadshift.checkpoints import Checkpointing
from roadshift.config import Params, load_params
from roadshift.data.manifest import build_manifest, class_names
from roadshift.data.synth import source_split_counts, synthesize_domain
from roadshift.stages.common import fit_options, new_model, new_model_spec, train_loader
from roadshift.tracking import MetricLogger
from roadshift.training import configure_runtime, fit


def source_images(root: Path, params: Params) -> tuple:
    folder = root / "data" / "raw" / "source"
    synthesize_domain(
        "source",
        folder,
        source_split_counts(params.synth.source_per_class),
        params.synth.image_size,
        params.base.seed,
    )
    return build_manifest(folder, "source", params.prepare, root)


def bare_loop(model: nn.Module, loader, epochs: int, lr: float, device: torch.device) -> int:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.to(device).train()
    seen = 0
    for _ in range(epochs):
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), targets)
            loss.backward()
            optimizer.step()
            seen += len(targets)
    return seen


def roadshift_fit(
    model: nn.Module, loader, params: Params, epochs: int, work: Path, device: torch.device
) -> int:
    section = params.pretrain.model_copy(update={"epochs": epochs})
    options = dataclasses.replace(fit_options(section, params, "bench"), progress=True)
    checkpoint = Checkpointing(work / "checkpoints", fingerprint="bench")
    with mlflow.start_run(run_name="bench-training-loop"):
        fit(
            model,
            [{"params": list(model.parameters()), "lr": section.lr}],
            loader,
            None,
            options,
            device=device,
            on_epoch_end=MetricLogger(),
            checkpoint=checkpoint,
        )
    return epochs * len(loader.dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    device = configure_runtime(params.base)
    with tempfile.TemporaryDirectory(prefix="roadshift-bench-loop-") as tmp:
        work = Path(tmp)
        manifest = source_images(work, params)
        spec = new_model_spec(params, class_names(manifest))
        loader = train_loader(manifest, work, spec, params.pretrain, params)
        initial = new_model(spec, params, weights=None).state_dict()
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        mlflow.set_experiment("bench-training-loop")

        def fresh_model() -> nn.Module:
            model = new_model(spec, params, weights=None)
            model.load_state_dict(copy.deepcopy(initial))
            return model

        rates: dict[str, list[float]] = {"bare PyTorch loop": [], "roadshift fit()": []}
        bare_loop(fresh_model(), loader, 1, params.pretrain.lr, device)  # warm-up
        for _ in range(args.repeats):
            for name in rates:
                model = fresh_model()
                started = time.perf_counter()
                if name.startswith("bare"):
                    images = bare_loop(model, loader, args.epochs, params.pretrain.lr, device)
                else:
                    images = roadshift_fit(model, loader, params, args.epochs, work, device)
                rates[name].append(images / (time.perf_counter() - started))

    bare, ours = (statistics.median(values) for values in rates.values())
    print(
        f"\nmodel {spec.architecture} {spec.image_size}px, batch {params.pretrain.batch_size}, "
        f"{len(loader.dataset)} train images x {args.epochs} epochs, {args.repeats} repeats, "
        f"device {device}, torch threads {torch.get_num_threads()}"
    )
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name:<18} {statistics.median(values):7.1f} images/s  (runs: {shown})")
    ratio = ours / bare
    verdict = "met" if ratio >= 0.9 else "NOT met"
    print(f"  ratio fit/bare     {ratio:.3f}  (target >= 0.90: {verdict})")


if __name__ == "__main__":
    main()
