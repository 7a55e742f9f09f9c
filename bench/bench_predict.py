"""Batch-prediction speed: the registered pyfunc model against the bare torch model, same weights.

    .venv/bin/python bench/bench_predict.py [--images 512] [--batch-size 64] [--repeats 7]
                                            [--profile]

Both sides get the same synthetic road-sign images (params.yaml's architecture at the default
64 px, 0 epochs of training: speed does not depend on the weights) as uint8 batches of
``--batch-size``:

* pyfunc: ``mlflow.pyfunc.load_model("models:/...@champion")`` from a throwaway SQLite store,
  ``model.predict(uint8 batch)``; what ``roadshift predict`` and ``mlflow models serve`` run.
* bare: the same weights from the model folder, the uint8 -> normalised float tensor step done
  minimally in torch (one batched op), then ``softmax(model(x))``.
* for reference: the bare forward pass alone on tensors made beforehand, in the layout the
  bare path produces (channels_last: a permuted NHWC array) and in plain NCHW (what stacking
  per-image CHW tensors gives, as the pyfunc does); and the pyfunc's own preprocessing and
  weights with a channels_last batch (``pyfunc_with_channels_last``, the proposed fix).

The runs take turns batch by batch, so drift in the machine's speed hits all of them; each
figure is the median over the repeats (one repeat = every batch once). The target is
pyfunc >= 0.8 x bare. Below it (or with --profile) the pyfunc path is profiled with cProfile
and the top entries printed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow
import numpy as np
import torch

from roadshift.config import Params, RegisterSection, load_params, parse_params
from roadshift.data.synth import CLASSES, image_rng, render_sign_image
from roadshift.registry.register import register_model_dir
from roadshift.tracking import configure_tracking
from roadshift.train.models import load_model_dir, save_model_dir
from roadshift.train.recipe import new_model, new_model_spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench-road-signs"
TARGET_RATIO = 0.8
Predict = Callable[[np.ndarray], object]


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    """Rendered target-domain signs, all classes in turn, as one (N, size, size, 3) uint8 array."""
    images = [
        np.asarray(
            render_sign_image(
                "target", CLASSES[i % len(CLASSES)], image_rng(seed, "bench", i), size
            )
        )
        for i in range(count)
    ]
    return np.stack(images)


def register_untrained_model(params: Params, work: Path) -> Path:
    """Create (0 epochs) and register the default model; it becomes champion of a fresh name."""
    spec = new_model_spec(params, CLASSES)
    torch.manual_seed(params.base.seed)
    model_dir = save_model_dir(new_model(spec, params, weights=None).eval(), spec, work / "model")
    configure_tracking(parse_params({"tracking": {"experiment": "bench-predict"}}), work)
    with mlflow.start_run(run_name="bench-predict"):
        register_model_dir(
            model_dir, {"target_macro_f1": 1.0}, {}, RegisterSection(model_name=MODEL_NAME)
        )
    return model_dir


def bare_predictor(model_dir: Path) -> tuple[Predict, Predict, Callable[[np.ndarray], object]]:
    """(uint8 -> probabilities, preprocessed tensor -> probabilities, uint8 -> tensor)."""
    model, spec = load_model_dir(model_dir)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0

    def to_tensor(batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (spec.image_size, spec.image_size):
            x = torch.nn.functional.interpolate(
                x, size=(spec.image_size, spec.image_size), mode="area"
            )
        return (x - mean) / std

    def forward(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(model(x), dim=1).numpy()

    return (lambda batch: forward(to_tensor(batch))), forward, to_tensor


def interleaved_pass(runs: dict[str, tuple[Predict, list]]) -> dict[str, float]:
    """Images/s of each run over all batches, taking turns batch by batch.

    On a shared machine the load changes within seconds; alternating whole passes still
    lets one side catch a quiet spell. Turns per batch (in rotating order) spread it evenly.
    """
    names = list(runs)
    seconds = dict.fromkeys(names, 0.0)
    images = dict.fromkeys(names, 0)
    for index in range(len(next(iter(runs.values()))[1])):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            predict, batches = runs[name]
            started = time.perf_counter()
            predict(batches[index])
            seconds[name] += time.perf_counter() - started
            images[name] += len(batches[index])
    return {name: images[name] / seconds[name] for name in names}


def profile(predict: Predict, batches: list, top: int = 18) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for batch in batches:
        predict(batch)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def pyfunc_with_channels_last(pyfunc) -> Predict:
    """The registered model's own preprocessing and weights, fed to torch as channels_last.

    A sketch of the registry fix, measured beside the real thing: same transform, same
    stacking, only the batch's memory layout differs (mobilenet's depthwise convolutions run
    faster on CPU in NHWC, and the layout then carries through the whole network).
    """
    inner = pyfunc.unwrap_python_model()

    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.stack([inner.transform(image=image)["image"] for image in batch])
        with torch.inference_mode():
            x = x.contiguous(memory_format=torch.channels_last)
            return torch.softmax(inner.model(x), dim=1).numpy()

    return predict


def measure(runs: dict[str, tuple[Predict, list]], repeats: int) -> dict[str, list[float]]:
    interleaved_pass(runs)  # warm-up: lazy imports, allocator, kernel selection
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, rate in interleaved_pass(runs).items():
            rates[name].append(rate)
    return rates


PYFUNC = "pyfunc: registry model, uint8"
BARE = "bare torch: uint8 -> tensor -> model"
FIX = "pyfunc internals, channels_last"


def report(rates: dict[str, list[float]], header: str) -> float:
    """Print the table and the verdict; returns pyfunc / bare."""
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(header)
    for name, rate in medians.items():
        spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
        print(f"  {name:<40} {rate:7.0f} images/s  (range {spread})")
    ratio = medians[PYFUNC] / medians[BARE]
    met = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"pyfunc / bare: {ratio:.2f}  (target >= {TARGET_RATIO}: {met})")
    print(f"pyfunc internals without MLflow's wrapper: {medians[FIX] / medians[BARE]:.2f} of bare")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch default")
    parser.add_argument("--profile", action="store_true", help="profile even if on target")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(PROJECT_ROOT / "params.yaml")
    size = params.base.image_size
    images = synthetic_images(args.images, size, params.base.seed)
    uint8_batches = [
        images[start : start + args.batch_size] for start in range(0, len(images), args.batch_size)
    ]
    with tempfile.TemporaryDirectory(prefix="roadshift-bench-predict-") as tmp:
        model_dir = register_untrained_model(params, Path(tmp))
        pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
        bare, forward, to_tensor = bare_predictor(model_dir)
        np.testing.assert_allclose(  # same weights, same preprocessing up to float rounding
            pyfunc.predict(uint8_batches[0]).iloc[:, 1:].to_numpy(),
            bare(uint8_batches[0]),
            atol=1e-4,
        )
        tensors = [to_tensor(batch) for batch in uint8_batches]  # NHWC permuted: channels_last
        rates = measure(
            {
                PYFUNC: (pyfunc.predict, uint8_batches),
                BARE: (bare, uint8_batches),
                "bare forward only, channels_last tensors": (forward, tensors),
                "bare forward only, NCHW tensors": (forward, [t.contiguous() for t in tensors]),
                FIX: (pyfunc_with_channels_last(pyfunc), uint8_batches),
            },
            args.repeats,
        )
        ratio = report(
            rates,
            f"{params.model.architecture} at {size} px, {len(CLASSES)} classes, {args.images} "
            f"images in batches of {args.batch_size}, torch threads {torch.get_num_threads()}, "
            f"median of {args.repeats} interleaved repeats",
        )
        if ratio < TARGET_RATIO or args.profile:
            print("\ncProfile of the pyfunc path (one pass, sorted by own time):")
            print(profile(pyfunc.predict, uint8_batches))


if __name__ == "__main__":
    main()
