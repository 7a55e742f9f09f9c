"""Training throughput against the physical ceiling: the bare model on in-memory tensors.

    .venv/bin/python bench/bench_training_loop.py [--repeats 5] [--epochs 2]

Three ways to push the default source train split (params.yaml: backbone, image size,
batch size, lr) through the same model, side by side in one process:

* ceiling -- the bare model's forward + backward + AdamW step (fused kernel) on
  batches that are already normalised float tensors in memory (channels_last, as
  training uses): no decoding, no augmentation, no bookkeeping. Nothing that trains
  can be faster. (forward + backward without the optimizer step is printed too.)
* bare loop over the stage's loader -- the same bare step, fed by the pretrain stage's
  own loader (decoded-image cache + batched augmentation): the data path's cost.
* pretrain stage's training -- ``train_loader`` + ``fit`` with the options the pretrain
  stage builds (schedule, clipping, label smoothing, NaN check, MLflow logging of every
  epoch to SQLite, checkpoints spaced by ``checkpoint_every_seconds`` (10 s by default,
  so none within one of these few-second repeats; the 20-epoch pretrain stage saves
  twice, ~0.1 s of its ~30 s); progress bars only when stderr is a terminal, as in the
  stage, so not under ``make bench``). Validation is left out: it is extra work, not
  training.

The three alternate within each repeat, so drift in the machine's speed hits all of
them; each figure is the median over the repeats. Target: the stage's training runs at
>= 85 % of the ceiling.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow
import torch
from torch import nn

from roadshift.config import Params, load_params
from roadshift.data.batch_transforms import create_batch_transform
from roadshift.data.manifest import build_manifest, class_names
from roadshift.data.synth import source_split_counts, synthesize_domain
from roadshift.tracking import MetricLogger
from roadshift.train.checkpoints import Checkpointing
from roadshift.train.loop import configure_runtime, fit
from roadshift.train.recipe import fit_options, new_model, new_model_spec, train_loader

TARGET_FRACTION = 0.85


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


def in_memory_batches(loader, spec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The split, decoded and normalised once (no augmentation), as channels_last batches."""
    dataset = loader.dataset
    clean_transform = create_batch_transform(spec.image_size, spec.mean, spec.std)
    clean = dataset.subset(range(len(dataset)), transform=clean_transform)
    batches = []
    size = loader.batch_sampler.batch_size
    for start in range(0, len(clean), size):
        images, targets = clean.__getitems__(list(range(start, min(start + size, len(clean)))))
        batches.append((images.contiguous(memory_format=torch.channels_last), targets))
    return batches


def bare_steps(model: nn.Module, batches, epochs: int, lr: float, device: torch.device) -> int:
    """forward + backward + AdamW step (the fused kernel, as fit uses), nothing else."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    loss_fn = nn.CrossEntropyLoss()
    model.to(device).to(memory_format=torch.channels_last).train()
    seen = 0
    for _ in range(epochs):
        for images, targets in batches:
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images), targets).backward()
            optimizer.step()
            seen += len(targets)
    return seen


def forward_backward(model: nn.Module, batches, epochs: int, device: torch.device) -> int:
    """forward + backward only: the model's compute with no optimiser at all."""
    loss_fn = nn.CrossEntropyLoss()
    model.to(device).to(memory_format=torch.channels_last).train()
    seen = 0
    for _ in range(epochs):
        for images, targets in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model(images.to(device)), targets.to(device)).backward()
            seen += len(targets)
    return seen


def stage_fit(
    model: nn.Module, loader, params: Params, epochs: int, work: Path, device: torch.device
) -> int:
    section = params.pretrain.model_copy(update={"epochs": epochs})
    options = fit_options(section, params, "pretrain")  # bars only on a terminal, as the stage
    checkpoint = Checkpointing(
        work / "checkpoints", fingerprint="bench", every_seconds=section.checkpoint_every_seconds
    )
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    device = configure_runtime(params.base)
    lr = params.pretrain.lr
    with tempfile.TemporaryDirectory(prefix="roadshift-bench-loop-") as tmp:
        work = Path(tmp)
        manifest = source_images(work, params)
        spec = new_model_spec(params, class_names(manifest))
        loader = train_loader(manifest, work, spec, params.pretrain, params)
        batches = in_memory_batches(loader, spec)
        initial = new_model(spec, params, weights=None).state_dict()
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        mlflow.set_experiment("bench-training-loop")

        def fresh_model() -> nn.Module:
            model = new_model(spec, params, weights=None)
            model.load_state_dict(copy.deepcopy(initial))
            return model

        runs: dict[str, Callable[[nn.Module], int]] = {
            "ceiling: bare model, in-memory tensors": lambda m: bare_steps(
                m, batches, args.epochs, lr, device
            ),
            "forward + backward only, in-memory": lambda m: forward_backward(
                m, batches, args.epochs, device
            ),
            "bare step over the stage's loader": lambda m: bare_steps(
                m, loader, args.epochs, lr, device
            ),
            "pretrain stage's training (fit)": lambda m: stage_fit(
                m, loader, params, args.epochs, work, device
            ),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        bare_steps(fresh_model(), batches, 1, lr, device)  # warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():
                model = fresh_model()
                # the stage's CLI opens its MLflow run before training: not timed here either
                with mlflow.start_run(run_name=name):
                    started = time.perf_counter()
                    images = run(model)
                    rates[name].append(images / (time.perf_counter() - started))

    print(
        f"\nmodel {spec.architecture} {spec.image_size}px, batch {params.pretrain.batch_size}, "
        f"{len(loader.dataset)} train images x {args.epochs} epochs, {args.repeats} repeats "
        f"(alternating), device {device}, torch threads {torch.get_num_threads()}, "
        f"loader workers {loader.num_workers}"
    )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name:<40} {medians[name]:7.1f} images/s  (runs: {shown})")
    ceiling, forward_backward_only, data_path, stage = medians.values()
    print(f"  data path (bare step over loader) / ceiling   {data_path / ceiling:.3f}")
    print(f"  training / forward+backward only               {stage / forward_backward_only:.3f}")
    fraction = stage / ceiling
    verdict = "met" if fraction >= TARGET_FRACTION else "NOT met"
    print(
        f"training throughput / ceiling: {fraction:.3f} "
        f"(target >= {TARGET_FRACTION:.2f}: {verdict})"
    )


if __name__ == "__main__":
    main()
