"""Transfer benchmark through the bring-your-own-data path, on the embedded data and a real pair.

    .venv/bin/python bench/bench_transfer.py [--datasets embedded digits]
        [--labels 5 10 25 all] [--workdir DIR]

What a user does, once per dataset: put the images in a project folder under ``data/raw/``
(``source/``, ``target/``, the unlabelled pool ``target_unlabeled/``), point ``params.yaml`` at
them (``data.source.path``, ``data.target.path``, ``data.target.unlabeled_path``;
``base.image_size`` 32 for the digits pair), and run the stages. Here the real stage functions
run in-process, through the same dispatch ``roadshift stage <name>`` uses
(``roadshift.stages.runner.run_stage``, without its MLflow stage run), each reading the
project's own ``params.yaml``: prepare -> validate -> pretrain -> finetune -> scratch -> evaluate.
Everything else is the repository's ``params.yaml`` as it stands (the defaults the targets
are about).

Datasets:

* ``embedded``: the synthetic US -> India road signs (``roadshift data synth``), 64 px, with
  45 labelled target train images per class so that "all" matches the real pair; target val
  (6 a class) and test (40 a class) fixed; the unlabelled pool is synth's default
  (``synth.target_unlabeled_per_class``, 60 a class, the same at every budget).
* ``digits``: ``bench/real_pair.py``, scikit-learn's bundled real digit scans -> the other
  digits blended MNIST-M style into crops of its bundled photographs, 32 px; 45 target train
  and 45 test images per class, no target val split; at K labels per class the other 45 - K
  train images are the unlabelled pool (none at "all").

Per labels-per-class budget (the same images nested across budgets), both with no
unlabelled images (``unlabeled_path`` an empty folder, ``finetune.self_training.enabled:
false``) and with the pool (``enabled`` at its default, ``auto``): every strategy
(``feature_extraction``, ``fine_tune``, ``auto``) fine-tuned and evaluated, read back from
``metrics/evaluate.json`` (target accuracy and macro-F1 of the fine-tuned model, source-only
and scratch baselines) and ``metrics/finetune.json`` (self-training, domain distance, any
cross-validation scores ``auto`` wrote), plus the strategy ``auto`` chose.

What is not rerun, as DVC would not rerun it: pretrain runs once per dataset, and its model is
reused while ``data/validated/source.csv`` stays byte-identical (checked each time: pretrain's
only data dependency); scratch runs once per budget (it reads neither the pool nor the strategy,
though DVC would rerun it on any change to the finetune section); and with the pool, a strategy
set explicitly for which the finetune stage's own ``self_training_enabled`` says no
self-training runs is not fine-tuned again: its result is the one without the pool (marked
``=``). ``auto`` always runs, since its choice is made inside the stage.

Prints a table per dataset and the issue's targets; writes ``bench/results/data_efficiency.json``
and ``.png`` (accuracy vs labels per class, one line per method, one panel per dataset) and logs
them to MLflow (experiment ``roadshift-benchmarks``). Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import pandas as pd
import yaml
from real_pair import TARGET_TRAIN_PER_CLASS, build_digits_pair  # bench/, beside this script

from roadshift.config import Params, load_params, parse_params
from roadshift.data.manifest import read_manifest
from roadshift.data.synth import synthesize_dataset
from roadshift.layout import Layout
from roadshift.stages.finetune import self_training_enabled
from roadshift.stages.outcome import StageOutcome
from roadshift.stages.runner import run_stage
from roadshift.tracking import resolve_tracking_uri

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "bench" / "results"
ALL_LABELS = TARGET_TRAIN_PER_CLASS  # "all": 45 labelled target train images per class
STRATEGIES = ("feature_extraction", "fine_tune", "auto")
POOL_SUFFIX = "+unlabelled"
BASELINES = ("source_only", "scratch")
METHODS = (*BASELINES, *STRATEGIES, *(s + POOL_SUFFIX for s in STRATEGIES))
RAW = Path("data/raw")
SOURCE_DIR, TARGET_DIR = RAW / "source", RAW / "target"
POOL_DIR, NO_POOL_DIR = RAW / "target_unlabeled", RAW / "no_unlabeled"
DIGITS_SEED = 0
AUTO_TOLERANCE = 0.02


# --- the datasets, written into the project as a user would copy their folders -------------


@dataclass(frozen=True)
class DataSet:
    name: str
    title: str
    image_size: int
    source_description: str
    target_description: str
    build: Callable[[Path, Path, int], None]  # (store, project root, labels per class)


def _replace_tree(source: Path, destination: Path) -> None:
    shutil.rmtree(destination, ignore_errors=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, destination)
    else:
        destination.mkdir()


def build_embedded(store: Path, root: Path, labels: int) -> None:
    """Synth's data with 45 target train images a class (once, in ``store``), then the first
    ``labels`` of each class (synth numbers them, so budgets are nested) into the project."""
    full = store / "embedded"
    if not full.is_dir():
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["synth"]["target_train_per_class"] = ALL_LABELS
        params = parse_params(raw)
        synthesize_dataset(full, params.synth, seed=params.base.seed)
    _replace_tree(full / "source", root / SOURCE_DIR)
    _replace_tree(full / "target", root / TARGET_DIR)
    for class_dir in sorted((root / TARGET_DIR / "train").iterdir()):
        for extra in sorted(class_dir.iterdir())[labels:]:
            extra.unlink()
    _replace_tree(full / "target_unlabeled", root / POOL_DIR)


def build_digits(store: Path, root: Path, labels: int) -> None:
    """``real_pair.build_digits_pair`` at this budget: the other train images go to the pool."""
    built = store / f"digits-{labels}"
    if not built.is_dir():
        build_digits_pair(
            built,
            seed=DIGITS_SEED,
            labels_per_class=labels if labels < ALL_LABELS else None,
            image_size=32,
        )
    _replace_tree(built / "source", root / SOURCE_DIR)
    _replace_tree(built / "target", root / TARGET_DIR)
    _replace_tree(built / "unlabeled", root / POOL_DIR)  # empty folder at "all"


DATASETS = {
    "embedded": DataSet(
        "embedded",
        "embedded synthetic road signs (US -> India), 64 px",
        64,
        "US roads (MUTCD signs), synthetic",
        "Indian roads (IRC:67 signs), synthetic",
        build_embedded,
    ),
    "digits": DataSet(
        "digits",
        "real pair: scikit-learn digits -> digits on photographs (MNIST-M style), 32 px",
        32,
        "scikit-learn digits scans, upscaled",
        "other digits blended into crops of scikit-learn's sample photographs",
        build_digits,
    ),
}


# --- the project: params.yaml and the stages --------------------------------------------------


def write_params(
    root: Path, dataset: DataSet, *, pool: bool, strategy: str | None = None
) -> Params:
    """The repository's params.yaml pointed at the project's folders, as a user edits it."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["base"]["image_size"] = dataset.image_size
    raw["data"]["source"] = {"path": str(SOURCE_DIR), "description": dataset.source_description}
    raw["data"]["target"] = {
        "path": str(TARGET_DIR),
        "description": dataset.target_description,
        # under DVC the key must name a folder: an empty one for "no unlabelled images"
        "unlabeled_path": str(POOL_DIR if pool else NO_POOL_DIR),
    }
    if not pool:
        raw["finetune"]["self_training"]["enabled"] = False
    if strategy is not None:
        raw["finetune"]["strategy"] = strategy
    (root / NO_POOL_DIR).mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(root / "params.yaml")


@dataclass
class Project:
    root: Path
    log: TextIO
    seconds: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str, params: Params) -> Any:
        """One stage's own function, its output to the project's log."""
        started = time.perf_counter()
        print(f"\n=== {name} ===", file=self.log, flush=True)
        with contextlib.redirect_stdout(self.log), contextlib.redirect_stderr(self.log):
            outcome = run_stage(name, params, self.root)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return outcome

    def metrics(self, stage: str) -> dict[str, float]:
        return json.loads(Layout(self.root).metrics(stage).read_text())

    def digest(self, domain: str) -> str:
        data = Layout(self.root).validated_manifest(domain).read_bytes()
        return hashlib.sha256(data).hexdigest()


def _finetune_cell(project: Project, params: Params) -> dict[str, Any]:
    """Finetune then evaluate; the figures from metrics/finetune.json and evaluate.json."""
    started = time.perf_counter()
    outcome: StageOutcome = project.stage("finetune", params)
    finetune_seconds = time.perf_counter() - started
    project.stage("evaluate", params)
    evaluation, finetune = project.metrics("evaluate"), project.metrics("finetune")
    details = outcome.details or {}
    cv = {k: v for k, v in finetune.items() if "cv" in k.lower()}
    cv |= {k: v for k, v in details.items() if "cv" in k.lower() and _jsonable(v)}
    return {
        "accuracy": evaluation["target_accuracy"],
        "macro_f1": evaluation["target_macro_f1"],
        "accuracy_ci": [
            evaluation.get("target_accuracy_ci_low"),
            evaluation.get("target_accuracy_ci_high"),
        ],
        "strategy": details.get("strategy"),
        "reason": details.get("strategy_reason"),
        "domain_distance": finetune.get("domain_distance"),
        "cv": cv,
        "self_training": {k: v for k, v in finetune.items() if k.startswith("self_training")},
        "finetune_seconds": round(finetune_seconds, 1),
        "baselines": {
            "source_only": (
                evaluation["source_only_target_accuracy"],
                evaluation["source_only_target_macro_f1"],
            ),
            "scratch": (
                evaluation.get("scratch_target_accuracy"),
                evaluation.get("scratch_target_macro_f1"),
            ),
        },
    }


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _has_val(root: Path) -> bool:
    target = read_manifest(Layout(root).validated_manifest("target"))
    return bool((target["split"] == "val").any())


def _pool_size(root: Path) -> int:
    path = Layout(root).validated_unlabeled_manifest
    return len(pd.read_csv(path)) if path.is_file() else 0


@dataclass
class DatasetRun:
    """One dataset's results: ``cells[budget][method]``."""

    name: str
    title: str
    budgets: list[str]
    cells: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    pretrain: dict[str, float] = field(default_factory=dict)
    pool_sizes: dict[str, int] = field(default_factory=dict)
    has_val: bool = False
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _labels_of(budget: str) -> int:
    return ALL_LABELS if budget == "all" else int(budget)


def _reused_from(
    cells: dict[str, dict[str, Any]],
    strategy: str,
    pool: bool,
    params: Params,
    full_grid: bool,
) -> str | None:
    """The cell whose model this one would train again, bit for bit, or None.

    With the pool, a strategy for which the finetune stage's ``self_training_enabled`` says
    no self-training runs trains what it trained without the pool; and the strategy ``auto``
    chose trains what ``auto`` trained (roadshift.transfer.selection restores the RNGs so
    that it does; the full grid of 2026-12-01 measured it so in all 14 cells)."""
    if strategy == "auto":
        return None
    usable = {m for m, c in cells.items() if "error" not in c}
    runs_pool = self_training_enabled(params.finetune, strategy, has_unlabelled=True)
    if pool and not runs_pool and strategy in usable:
        return strategy
    auto = "auto" + (POOL_SUFFIX if pool else "")
    if not full_grid and auto in usable and cells[auto].get("strategy") == strategy:
        return auto
    return None


def _strategy_cells(
    project: Project, dataset: DataSet, run: DatasetRun, budget: str, pool: bool, full_grid: bool
) -> None:
    """Finetune + evaluate every strategy at one budget and pool setting (``auto`` first)."""
    cells = run.cells[budget]
    for strategy in ("auto", "feature_extraction", "fine_tune"):
        method = strategy + (POOL_SUFFIX if pool else "")
        params = write_params(project.root, dataset, pool=pool, strategy=strategy)
        source = _reused_from(cells, strategy, pool, params, full_grid)
        if source is not None:
            copied = {k: v for k, v in cells[source].items() if k not in ("cv", "reason")}
            cells[method] = {**copied, "strategy": strategy, "same_as": source}
        else:
            try:
                cells[method] = _finetune_cell(project, params)
            except Exception as error:  # a failed cell is reported, the grid goes on
                cells[method] = {"error": f"{type(error).__name__}: {error}"}
        print(f"[{dataset.name}] {budget}/class {method}: {_cell_line(cells[method])}", flush=True)


def run_dataset(
    dataset: DataSet, workdir: Path, budgets: list[str], *, full_grid: bool = False
) -> DatasetRun:
    root, store = workdir / dataset.name, workdir / "store"
    root.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = DatasetRun(dataset.name, dataset.title, budgets)
    with (root / "stages.log").open("w") as log:
        project = Project(root, log)
        dataset.build(store, root, _labels_of(budgets[0]))
        params = write_params(root, dataset, pool=False)
        project.stage("prepare", params)
        project.stage("validate", params)
        project.stage("pretrain", params)
        run.pretrain = project.metrics("pretrain")
        pretrained_on = project.digest("source")
        print(
            f"[{dataset.name}] pretrain: source test accuracy "
            f"{run.pretrain.get('source_test_accuracy', float('nan')):.3f} "
            f"({project.seconds['pretrain']:.0f} s)",
            flush=True,
        )
        for budget in budgets:
            run.cells[budget] = cells = {}
            dataset.build(store, root, _labels_of(budget))
            for pool in (False, True):
                params = write_params(root, dataset, pool=pool)
                project.stage("prepare", params)
                project.stage("validate", params)
                if project.digest("source") != pretrained_on:  # DVC would rerun pretrain
                    run.notes.append(f"{budget}/class: source manifest changed; pretrained again")
                    project.stage("pretrain", params)
                    pretrained_on = project.digest("source")
                run.has_val = _has_val(root)
                if not pool:
                    project.stage("scratch", params)
                else:
                    run.pool_sizes[budget] = _pool_size(root)
                    if run.pool_sizes[budget] == 0:
                        continue  # no unlabelled images at this budget ("all" on the pair)
                _strategy_cells(project, dataset, run, budget, pool, full_grid)
                baseline = next((c for c in cells.values() if "baselines" in c), None)
                if baseline is not None and not pool:
                    for name in BASELINES:
                        accuracy, macro_f1 = baseline["baselines"][name]
                        cells[name] = {"accuracy": accuracy, "macro_f1": macro_f1}
    run.seconds = time.perf_counter() - started
    run.stage_seconds = {k: round(v, 1) for k, v in project.seconds.items()}
    return run


def _cell_line(cell: dict[str, Any]) -> str:
    if "error" in cell:
        return f"FAILED ({cell['error']})"
    if "same_as" in cell:
        return f"same model as {cell['same_as']}: not trained again"
    line = f"accuracy {cell['accuracy']:.3f}, macro-F1 {cell['macro_f1']:.3f}"
    if cell.get("strategy"):
        line += f", {cell['strategy']}"
    if cell.get("self_training", {}).get("self_training"):
        line += (
            f", self-trained (kept epoch {cell['self_training']['self_training_best_epoch']:.0f})"
        )
    return line + f", finetune {cell['finetune_seconds']:.0f} s"


# --- report ----------------------------------------------------------------------------------


def _value(run: DatasetRun, budget: str, method: str, key: str = "accuracy") -> float | None:
    cell = run.cells.get(budget, {}).get(method, {})
    value = cell.get(key)
    return None if value is None else float(value)


def _column(budget: str) -> str:
    return f"all({ALL_LABELS})" if budget == "all" else budget


def table(run: DatasetRun) -> list[str]:
    lines = [f"\n{run.title}"]
    lines.append(
        "  target test accuracy / macro-F1 by labelled target images per class; "
        f"target val split: {'yes' if run.has_val else 'no'}"
    )
    lines.append(
        "  (=: same model as without the pool, as no self-training runs for that strategy; "
        "*: same model as auto, which chose that strategy; -: no unlabelled images)"
    )
    lines.append(f"  {'method':<30}" + "".join(f"{_column(b):>16}" for b in run.budgets))
    for method in METHODS:
        row = f"  {method:<30}"
        for budget in run.budgets:
            cell = run.cells.get(budget, {}).get(method)
            if cell is None:
                row += f"{'-':>16}"
            elif "error" in cell:
                row += f"{'failed':>16}"
            else:
                mark = {None: " ", "auto": "*", "auto" + POOL_SUFFIX: "*"}.get(
                    cell.get("same_as"), "="
                )
                row += f"{cell['accuracy']:>8.3f}/{cell['macro_f1']:.3f}{mark}"
        lines.append(row)
    lines.append(
        "  pool (unlabelled images): "
        + ", ".join(f"{_column(b)}: {run.pool_sizes.get(b, 0)}" for b in run.budgets)
    )
    for budget in run.budgets:
        for method in ("auto", "auto" + POOL_SUFFIX):
            cell = run.cells.get(budget, {}).get(method)
            if not cell or "error" in cell:
                continue
            extra = ""
            if cell.get("cv") and not method.endswith(POOL_SUFFIX):
                extra += f" {_cv_summary(cell['cv'])};"
            st = cell.get("self_training", {})
            if st.get("self_training"):
                extra += (
                    f" self-training ran on {st.get('self_training_unlabelled_images', 0):.0f} "
                    f"images, kept epoch {st.get('self_training_best_epoch', 0):.0f} "
                    f"(0 = fine-tuned model), mask rate {st.get('self_training_mask_rate', 0):.2f}"
                )
            elif method.endswith(POOL_SUFFIX):
                extra += " self-training did not run"
            distance = cell.get("domain_distance")
            shown = "n/a" if distance is None else f"{distance:.2f}"
            lines.append(
                f"  {_column(budget)}/class {method}: chose {cell.get('strategy')} "
                f"(proxy A-distance {shown});{extra}"
            )
    for error in [
        f"  {b}/class {m}: {c['error']}"
        for b, row in run.cells.items()
        for m, c in row.items()
        if "error" in c
    ]:
        lines.append(error)
    lines += [f"  note: {note}" for note in run.notes]
    lines.append(
        f"  {run.seconds:.0f} s; by stage: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in run.stage_seconds.items())
    )
    return lines


def _cv_summary(cv: dict[str, float]) -> str:
    """The cross-validation behind ``auto``'s choice, from metrics/finetune.json."""
    means = {s: cv.get(f"auto_cv_{s}_mean") for s in ("feature_extraction", "fine_tune")}
    if any(v is None for v in means.values()):
        return "cv " + ", ".join(f"{k} {v:.3f}" for k, v in cv.items())
    shown = ", ".join(f"{s} {v:.3f}" for s, v in means.items())
    return (
        f"CV held-out macro-F1 means {shown} ({cv.get('auto_cv_folds', 0):.0f} folds, "
        f"{cv.get('auto_cv_seconds', 0):.0f} s)"
    )


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _auto_gaps(run: DatasetRun) -> list[tuple[str, str, float, float, str]]:
    """(budget, setting, auto, best, best strategy) wherever all three strategies ran."""
    gaps = []
    for budget in run.budgets:
        for suffix, setting in (("", "labelled only"), (POOL_SUFFIX, "with unlabelled")):
            scores = {s: _value(run, budget, s + suffix) for s in STRATEGIES}
            if any(v is None for v in scores.values()):
                continue
            best = max(("feature_extraction", "fine_tune"), key=lambda s: scores[s] or 0.0)
            gaps.append((budget, setting, scores["auto"] or 0.0, scores[best] or 0.0, best))
    return gaps


def auto_target_lines(run: DatasetRun, tag: str) -> list[str]:
    gaps = _auto_gaps(run)
    detail = [
        f"  auto - best strategy at {_column(b)}/class, {setting}: {auto - best:+.3f} "
        f"(auto {auto:.3f}, best {best_name} {best:.3f})"
        for b, setting, auto, best, best_name in gaps
    ]
    worst = min((auto - best for _, _, auto, best, _ in gaps), default=None)
    ok = None if worst is None else worst >= -AUTO_TOLERANCE
    return [
        *detail,
        f"target [{tag}] auto within {AUTO_TOLERANCE:.2f} of the best strategy at every budget: "
        f"worst {_fmt(worst)}{_short(worst, -AUTO_TOLERANCE)}: {_verdict(ok)}",
    ]


def _short(value: float | None, bar: float | None) -> str:
    """``, 0.111 short`` where ``value`` misses ``bar``."""
    if value is None or bar is None or value >= bar:
        return ""
    return f", {bar - value:.3f} short"


def digits_targets(run: DatasetRun) -> list[str]:
    """The issue's targets on the real pair, defaults only (strategy auto, self-training auto)."""
    lines = []
    cell = run.cells.get("10", {}).get("auto" + POOL_SUFFIX, {})
    with_pool = _value(run, "10", "auto" + POOL_SUFFIX)
    ran = cell.get("self_training", {}).get("self_training")
    ran = "self-training " + ("ran" if ran else "did not run")
    lines.append(
        f"target [digits] 10 labels/class + unlabelled rest >= 0.90 target accuracy: "
        f"{_fmt(with_pool)}{_short(with_pool, 0.90)} ({ran}): "
        f"{_verdict(None if with_pool is None else with_pool >= 0.90)}"
    )
    alone, scratch = _value(run, "10", "auto"), _value(run, "10", "scratch")
    bar = None if scratch is None else max(0.80, scratch + 0.05)
    ok = None if alone is None or bar is None else alone >= bar
    lines.append(
        f"target [digits] 10 labels/class alone >= 0.80 and >= scratch + 0.05: "
        f"{_fmt(alone)}{_short(alone, bar)} (scratch {_fmt(scratch)}): {_verdict(ok)}"
    )
    full, scratch_full = _value(run, "all", "auto"), _value(run, "all", "scratch")
    ok = None if full is None or scratch_full is None else full >= scratch_full
    lines.append(
        f"target [digits] all labels >= scratch: {_fmt(full)}{_short(full, scratch_full)} "
        f"(scratch {_fmt(scratch_full)}): {_verdict(ok)}"
    )
    return lines + auto_target_lines(run, "digits")


def embedded_targets(run: DatasetRun) -> list[str]:
    """The benchmark's standing targets on the embedded data (docs/benchmarks.md)."""
    best = [v for s in STRATEGIES if (v := _value(run, "10", s)) is not None]
    scratch = _value(run, "10", "scratch")
    gain = None if len(best) < len(STRATEGIES) or scratch is None else max(best) - scratch
    ok = None if gain is None else gain >= 0.15
    shown = "n/a" if gain is None else f"{gain:+.3f}"
    lines = [
        f"target [embedded] best transfer - scratch at 10/class >= +0.15 (labelled only): "
        f"{shown}: {_verdict(ok)}"
    ]
    return lines + auto_target_lines(run, "embedded")


def plot(runs: list[DatasetRun], path: Path) -> Path:
    figure, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 5.6), squeeze=False)
    colours = {
        "source_only": "0.55",
        "scratch": "black",
        "feature_extraction": "tab:blue",
        "fine_tune": "tab:orange",
        "auto": "tab:green",
    }
    for axis, run in zip(axes[0], runs, strict=True):
        xs = [_labels_of(b) for b in run.budgets]
        for method in METHODS:
            base = method.removesuffix(POOL_SUFFIX)
            points = [
                (x, v)
                for x, b in zip(xs, run.budgets, strict=True)
                if (v := _value(run, b, method)) is not None
            ]
            if not points:
                continue
            style: dict[str, Any] = {"color": colours[base], "marker": "o", "linewidth": 1.5}
            if base == "auto":  # wide and pale under the strategy it chose, which it matches
                style |= {"linewidth": 5, "alpha": 0.45, "zorder": 1}
            if method.endswith(POOL_SUFFIX):
                style |= {"linestyle": "--", "marker": "^"}
            elif method in BASELINES:
                style |= {"linestyle": ":", "marker": "s"}
            axis.plot(*zip(*points, strict=True), label=method, **style)
        axis.set_xscale("log")
        axis.set_xticks(xs, [_column(b) for b in run.budgets])
        axis.minorticks_off()
        axis.set_xlabel("labelled target images per class")
        axis.set_ylabel("target test accuracy")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.set_title(run.title, fontsize=9)
    legend: dict[str, Any] = {}
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=8)
    figure.suptitle("Data efficiency, repository defaults (dashed: with unlabelled target images)")
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def log_to_mlflow(runs: list[DatasetRun], figure: Path, figures: Path, seconds: float) -> str:
    params = load_params(REPO / "params.yaml")
    mlflow.set_tracking_uri(resolve_tracking_uri(params.tracking, REPO))
    mlflow.set_experiment("roadshift-benchmarks")
    with mlflow.start_run(run_name="transfer-data-efficiency") as active:
        mlflow.log_params(
            {"architecture": params.model.architecture, "datasets": [r.name for r in runs]}
        )
        for run in runs:
            for budget in run.budgets:
                metrics = {
                    f"{run.name}.{method.replace('+', '_')}_accuracy": value
                    for method in METHODS
                    if (value := _value(run, budget, method)) is not None
                }
                mlflow.log_metrics(metrics, step=_labels_of(budget))
        mlflow.log_metric("wall_seconds", seconds)
        mlflow.log_artifact(str(figure))
        mlflow.log_artifact(str(figures))
        return active.info.run_id


@contextlib.contextmanager
def workspace(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    temporary = Path(tempfile.mkdtemp(prefix="roadshift-bench-transfer-"))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _payload(runs: list[DatasetRun], seconds: float, full_grid: bool, targets: list[str]) -> dict:
    return {
        "seconds": round(seconds, 1),
        "full_grid": full_grid,
        "params": "the repository's params.yaml (defaults), per dataset base.image_size and data.*",
        "datasets": {
            run.name: {
                "title": run.title,
                "budgets": run.budgets,
                "all_labels_per_class": ALL_LABELS,
                "target_val_split": run.has_val,
                "pool_sizes": run.pool_sizes,
                "pretrain": run.pretrain,
                "cells": run.cells,
                "seconds": round(run.seconds, 1),
                "stage_seconds": run.stage_seconds,
                "notes": run.notes,
            }
            for run in runs
        },
        "targets": [line for line in targets if line.startswith("target")],
    }


def _runs_from(payload: dict) -> list[DatasetRun]:
    """The runs of a data_efficiency.json written by this script (``--report-from``)."""
    return [
        DatasetRun(
            name,
            data["title"],
            data["budgets"],
            cells=data["cells"],
            pretrain=data["pretrain"],
            pool_sizes=data["pool_sizes"],
            has_val=data["target_val_split"],
            seconds=data["seconds"],
            stage_seconds=data["stage_seconds"],
            notes=data["notes"],
        )
        for name, data in payload["datasets"].items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="+", choices=sorted(DATASETS), default=["digits", "embedded"]
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        default=["5", "10", "25", "all"],
        help=f"labelled target images per class (1-{ALL_LABELS - 1}, or all = {ALL_LABELS})",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the projects here")
    parser.add_argument(
        "--full-grid",
        action="store_true",
        help="also train the strategy auto chose by hand (the same model; about 6 minutes more)",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        default=None,
        metavar="JSON",
        help="train nothing: print and plot a data_efficiency.json this script wrote",
    )
    args = parser.parse_args()
    budgets = sorted(
        {"all" if b in ("all", str(ALL_LABELS)) else str(int(b)) for b in args.labels},
        key=_labels_of,
    )
    started = time.perf_counter()
    if args.report_from is not None:
        saved = json.loads(args.report_from.read_text())
        runs, seconds, full_grid = _runs_from(saved), saved["seconds"], saved.get("full_grid")
    else:
        runs, full_grid = [], args.full_grid
        with workspace(args.workdir) as workdir:
            print(f"projects under {workdir} (stage output in <dataset>/stages.log)", flush=True)
            for name in args.datasets:
                runs.append(run_dataset(DATASETS[name], workdir, budgets, full_grid=full_grid))
                raw = json.dumps(dataclasses.asdict(runs[-1]), indent=1, default=str)
                (workdir / f"{name}.json").write_text(raw)
        seconds = time.perf_counter() - started
    lines = [line for run in runs for line in table(run)]
    targets: list[str] = []
    for run in runs:
        targets += digits_targets(run) if run.name == "digits" else embedded_targets(run)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    figure = plot(runs, OUTPUT / "data_efficiency.png")
    figures = OUTPUT / "data_efficiency.json"
    figures.write_text(json.dumps(_payload(runs, seconds, full_grid, targets), indent=2) + "\n")
    logged = ""
    if args.report_from is None:
        logged = f"; MLflow run {log_to_mlflow(runs, figure, figures, seconds)}"
    print("\n".join(lines))
    print()
    print("\n".join(targets))
    print(f"\nplot {figure}, figures {figures}{logged}; {seconds:.0f} s in all")


if __name__ == "__main__":
    main()
