"""Does labelling what ``roadshift label suggest`` picks pay off against labelling at random?

    .venv/bin/python bench/bench_label_suggest.py [--datasets embedded digits]
        [--seeds 0 1 2] [--start 10] [--add 5] [--workdir DIR] [--tiny]

Per dataset and seed: a project with ``--start`` (10) labelled target train images per class,
the rest of the target train images as the unlabelled pool (their true classes kept aside as
the oracle), run through the real stages in-process as ``bench/bench_transfer.py`` does
(prepare -> validate -> pretrain -> finetune -> evaluate; pretrain once per dataset, seed 0).
The fine-tuned model then ranks the pool with the ``label suggest`` core
(``roadshift.serve.suggest.suggest_for_labelling``, the command minus the registry download)
and ``--add`` x classes images (5 a class: 40 embedded, 50 digits) are taken two ways:

* ``suggest``: the images ``label suggest --n <that many>`` chooses;
* ``random``: as many drawn uniformly at random from the pool (what a person without the tool
  does: the pool has no labels, so a per-class draw is not possible for them).

Each choice is labelled by the oracle (copied into ``target/train/<true class>/`` and removed
from the pool, as ``roadshift data add target`` does), the model fine-tuned again from the same
pretrained source model with the same seed, and scored on the fixed target test split. Prints
target test accuracy per seed and mean +- standard deviation over seeds per dataset and arm,
and the start (10 labels) for reference; writes ``bench/results/label_suggest.json`` and
``.png``. Asserts nothing.

Datasets: ``embedded`` (synth's road signs with 45 target train images a class, 64 px) and
``digits`` (``bench/real_pair.py``: scikit-learn's digits -> digits on photographs, 32 px).

``--tiny`` proves the script runs: one epoch everywhere, ``fine_tune`` instead of ``auto``,
a small source set; its figures mean nothing and it writes ``label_suggest_tiny.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml
from real_pair import build_digits_pair  # bench/, beside this script

from roadshift.config import Params, load_params, parse_params
from roadshift.data.pool import images_in, remove_labelled_from_pool
from roadshift.data.synth import synthesize_dataset
from roadshift.layout import Layout
from roadshift.registry.model_files import RegisteredModel
from roadshift.serve.features import LoadedModel
from roadshift.serve.suggest import suggest_for_labelling
from roadshift.stages.runner import run_stage
from roadshift.train.models import load_model_dir

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "bench" / "results"
RAW = Path("data/raw")
SOURCE_DIR, TARGET_DIR, POOL_DIR = RAW / "source", RAW / "target", RAW / "target_unlabeled"
EXTENSIONS = (".png",)
ARMS = ("suggest", "random")


# --- datasets: labelled start, pool, oracle ---------------------------------------------------


def build_embedded(store: Path, root: Path, start: int, tiny: bool) -> dict[str, str]:
    """Synth's data, 45 target train images a class; the first ``start`` of each class stay
    labelled, the others go flat into the pool. The oracle: pool file name -> class."""
    full = store / "embedded"
    if not full.is_dir():
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["synth"]["target_train_per_class"] = 45
        raw["synth"]["target_unlabeled_per_class"] = 0
        if tiny:
            raw["synth"].update(source_per_class=20, target_test_per_class=6, image_size=32)
        params = parse_params(raw)
        synthesize_dataset(full, params.synth, seed=params.base.seed)
    shutil.copytree(full / "source", root / SOURCE_DIR)
    shutil.copytree(full / "target", root / TARGET_DIR)
    pool = root / POOL_DIR
    pool.mkdir(parents=True)
    oracle = {}
    for class_dir in sorted((root / TARGET_DIR / "train").iterdir()):
        for extra in sorted(class_dir.iterdir())[start:]:
            name = f"p{len(oracle):05d}.png"  # the class only in the oracle, not the name
            shutil.move(extra, pool / name)
            oracle[name] = class_dir.name
    return oracle


def build_digits(store: Path, root: Path, start: int, tiny: bool) -> dict[str, str]:
    built = store / f"digits-{start}"
    if not built.is_dir():
        build_digits_pair(built, seed=0, labels_per_class=start, image_size=32)
    shutil.copytree(built / "source", root / SOURCE_DIR)
    shutil.copytree(built / "target", root / TARGET_DIR)
    shutil.copytree(built / "unlabeled", root / POOL_DIR)
    with (built / "unlabeled_labels.csv").open() as handle:
        return {row["file"]: row["label"] for row in csv.DictReader(handle)}


DATASETS = {"embedded": (build_embedded, 64), "digits": (build_digits, 32)}


def write_params(root: Path, image_size: int, seed: int, tiny: bool) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["base"].update(seed=seed, image_size=32 if tiny else image_size)
    raw["data"]["source"]["path"] = str(SOURCE_DIR)
    raw["data"]["target"].update(path=str(TARGET_DIR), unlabeled_path=str(POOL_DIR))
    raw["evaluate"].update(scratch_baseline=False, bootstrap_samples=0)
    if tiny:
        raw["pretrain"]["epochs"] = 1
        raw["finetune"].update(epochs=1, strategy="fine_tune")
        raw["finetune"]["self_training"]["epochs"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(root / "params.yaml")


# --- one run ------------------------------------------------------------------------------------


def stages(root: Path, params: Params, names: tuple[str, ...], log) -> None:
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        for name in names:
            print(f"\n=== {name} ===", flush=True)
            run_stage(name, params, root)


def accuracy(root: Path) -> float:
    return float(json.loads(Layout(root).metrics("evaluate").read_text())["target_accuracy"])


def label_by_oracle(root: Path, chosen: list[Path], oracle: dict[str, str]) -> None:
    """Copy each chosen pool image into target/train/<true class>/, then drain the pool."""
    for path in chosen:
        destination = root / TARGET_DIR / "train" / oracle[path.name] / f"added-{path.name}"
        shutil.copyfile(path, destination)
    remove_labelled_from_pool(root / POOL_DIR, [root / TARGET_DIR], EXTENSIONS)


def suggested(root: Path, params: Params, n: int, out: Path) -> list[Path]:
    model, spec = load_model_dir(Layout(root).model_dir("target"))
    loaded = LoadedModel(
        RegisteredModel("bench", "0", Layout(root).model_dir("target"), {}), model, spec
    )
    result = suggest_for_labelling(loaded, params, root, n, out)
    pool = images_in(root / POOL_DIR, EXTENSIONS)
    return [pool[s.index] for s in result.chosen]


def fork(base: Path, arm_root: Path) -> None:
    """A copy of the start project: data, params and the pretrained source model."""
    shutil.copytree(base / "data" / "raw", arm_root / "data" / "raw")
    shutil.copyfile(base / "params.yaml", arm_root / "params.yaml")
    shutil.copytree(Layout(base).model_dir("source"), Layout(arm_root).model_dir("source"))
    for stage in ("pretrain",):
        metrics = Layout(base).metrics(stage)
        if metrics.is_file():
            Layout(arm_root).metrics(stage).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(metrics, Layout(arm_root).metrics(stage))


def run_seed(name: str, workdir: Path, store: Path, seed: int, args, log) -> dict[str, float]:
    build, image_size = DATASETS[name]
    base = workdir / f"{name}-seed{seed}" / "start"
    base.mkdir(parents=True)
    oracle = build(store, base, args.start, args.tiny)
    params = write_params(base, image_size, seed, args.tiny)
    pretrained = workdir / f"{name}-pretrained"
    if pretrained.is_dir():  # pretrain once per dataset: the source data never changes
        stages(base, params, ("prepare", "validate"), log)
        shutil.copytree(pretrained / "source", Layout(base).model_dir("source"))
    else:
        stages(base, params, ("prepare", "validate", "pretrain"), log)
        shutil.copytree(Layout(base).model_dir("source"), pretrained / "source")
    stages(base, params, ("finetune", "evaluate"), log)
    figures = {"start": accuracy(base)}
    classes = len({c for c in oracle.values()})
    n = args.add * classes
    pool = images_in(base / POOL_DIR, EXTENSIONS)
    picks = {
        "suggest": suggested(base, params, n, workdir / f"{name}-seed{seed}" / "suggested"),
        "random": [
            pool[i] for i in np.random.default_rng(seed).choice(len(pool), n, replace=False)
        ],
    }
    for arm in ARMS:
        arm_root = workdir / f"{name}-seed{seed}" / arm
        fork(base, arm_root)
        chosen = [arm_root / POOL_DIR / p.relative_to(base / POOL_DIR) for p in picks[arm]]
        label_by_oracle(arm_root, chosen, oracle)
        arm_params = load_params(arm_root / "params.yaml")
        stages(arm_root, arm_params, ("prepare", "validate", "finetune", "evaluate"), log)
        figures[arm] = accuracy(arm_root)
        counts = {
            c: sum(oracle[p.name] == c for p in picks[arm]) for c in sorted(set(oracle.values()))
        }
        figures[f"{arm}_classes_covered"] = sum(v > 0 for v in counts.values())
    print(
        f"[{name} seed {seed}] start {figures['start']:.3f}  suggest {figures['suggest']:.3f}  "
        f"random {figures['random']:.3f}",
        flush=True,
    )
    return figures


def summary(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in ("start", *ARMS):
        values = [s[key] for s in per_seed]
        out[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    gains = [s["suggest"] - s["random"] for s in per_seed]
    out["suggest_minus_random"] = {
        "mean": statistics.fmean(gains),
        "std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
        "min": min(gains),
        "max": max(gains),
    }
    return out


def plot(results: dict, path: Path) -> Path:
    names = list(results)
    figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        stats = results[name]["summary"]
        keys = ("start", *ARMS)
        axis.bar(
            keys,
            [stats[k]["mean"] for k in keys],
            yerr=[stats[k]["std"] for k in keys],
            color=("#999999", "#1f77b4", "#ff7f0e"),
            capsize=4,
        )
        for seed in results[name]["per_seed"]:
            axis.plot(keys, [seed[k] for k in keys], "k.", alpha=0.5)
        axis.set_title(name)
        axis.set_ylabel("target test accuracy")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--start", type=int, default=10, help="labels per class to start from")
    parser.add_argument("--add", type=int, default=5, help="labels per class to add")
    parser.add_argument("--workdir", type=Path, help="keep the projects here (default: temp)")
    parser.add_argument("--tiny", action="store_true", help="one epoch: proves it runs")
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        store = workdir / "store"
        store.mkdir(exist_ok=True)
        with (workdir / "stages.log").open("a") as log:
            for name in args.datasets:
                per_seed = [run_seed(name, workdir, store, s, args, log) for s in args.seeds]
                results[name] = {"per_seed": per_seed, "summary": summary(per_seed)}
    seconds = time.perf_counter() - started
    for name, result in results.items():
        stats = result["summary"]
        print(f"\n{name}: target test accuracy over seeds {args.seeds} (mean +- std, min..max)")
        for key in ("start", *ARMS, "suggest_minus_random"):
            s = stats[key]
            print(
                f"  {key:<22} {s['mean']:.3f} +- {s['std']:.3f}  ({s['min']:.3f}..{s['max']:.3f})"
            )
    stem = "label_suggest_tiny" if args.tiny else "label_suggest"
    payload = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": round(seconds, 1),
        "results": results,
    }
    out = OUTPUT / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{seconds:.0f} s; figures: {out}, plot: {plot(results, OUTPUT / f'{stem}.png')}")


if __name__ == "__main__":
    main()
