"""Data efficiency: target-test accuracy of every strategy at 10, 25 and 50 target labels per class.

    .venv/bin/python bench/bench_transfer.py [--labels 10 25 50] [--workdir DIR]

On the embedded synthetic data (US MUTCD source -> Indian IRC:67 target, the
repository's params.yaml otherwise), one source model is pretrained; then, for each
labels-per-class budget, the target train split is cut to that many images per
class (the same images for every strategy, nested across budgets) and the
same fixed val and test splits are kept. Rows: source-only (the source model on
the target test split), scratch (same architecture, target labels only),
feature_extraction, fine_tune and auto. The figures, the plot (accuracy vs
labels per class, one line per strategy) and the auto choices are logged to
MLflow (experiment ``roadshift-benchmarks``). Prints figures and whether the
targets hold; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import pandas as pd

from roadshift.config import Params, load_params, params_to_dict, parse_params
from roadshift.data.manifest import read_manifest, write_manifest
from roadshift.data.synth import synthesize_dataset
from roadshift.layout import Layout
from roadshift.stages.evaluate import evaluate_model_dir
from roadshift.stages.finetune import run_finetune
from roadshift.stages.prepare import run_prepare
from roadshift.stages.pretrain import run_pretrain
from roadshift.stages.scratch import run_scratch
from roadshift.tracking import resolve_tracking_uri
from roadshift.train.loop import configure_runtime

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "bench" / "results"
TRANSFER = ("feature_extraction", "fine_tune", "auto")
ROWS = ("source_only", "scratch", *TRANSFER)


def project(root: Path, labels: list[int]) -> Params:
    """The repository's params.yaml, with enough synthetic target labels for the largest budget."""
    raw = params_to_dict(load_params(REPO / "params.yaml"))
    raw["synth"]["target_train_per_class"] = max(labels)
    params = parse_params(raw)
    synthesize_dataset(root / "data" / "raw", params.synth, seed=params.base.seed)
    run_prepare(params, root)
    layout = Layout(root)
    for domain in ("source", "target"):
        layout.validated_manifest(domain).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(layout.manifest(domain), layout.validated_manifest(domain))
    shutil.copyfile(layout.manifest("target"), root / "target_full.csv")
    return params


def cut_target_train(root: Path, per_class: int) -> None:
    """Keep ``per_class`` train images per class (by file order, so budgets are nested)."""
    full = read_manifest(root / "target_full.csv")
    train = full[full["split"] == "train"].sort_values("path")
    kept = train.groupby("label", sort=True).head(per_class)
    rest = full[full["split"] != "train"]
    write_manifest(
        pd.concat([kept, rest]).reset_index(drop=True), Layout(root).validated_manifest("target")
    )


def test_accuracy(root: Path, model: str, params: Params) -> float:
    layout = Layout(root)
    device = configure_runtime(params.base)
    report = evaluate_model_dir(
        layout.model_dir(model), layout.validated_manifest("target"), root, params, device
    )
    return report.accuracy


def with_strategy(params: Params, strategy: str) -> Params:
    raw = params_to_dict(params)
    raw["finetune"]["strategy"] = strategy
    return parse_params(raw)


def run_budget(root: Path, params: Params, per_class: int) -> tuple[dict[str, float], dict]:
    cut_target_train(root, per_class)
    scores = {"source_only": test_accuracy(root, "source", params)}
    run_scratch(params, root)
    scores["scratch"] = test_accuracy(root, "scratch", params)
    auto: dict = {}
    for strategy in TRANSFER:
        outcome = run_finetune(with_strategy(params, strategy), root)
        scores[strategy] = test_accuracy(root, "target", params)
        if strategy == "auto":
            auto = {
                "chosen": outcome.details.get("strategy"),
                "reason": outcome.details.get("strategy_reason"),
                "domain_distance": outcome.metrics.get("domain_distance"),
            }
    return scores, auto


def plot(results: dict[int, dict[str, float]], path: Path) -> Path:
    budgets = sorted(results)
    figure, axes = plt.subplots(figsize=(6, 4))
    for row in ROWS:
        style = {"linestyle": "--", "marker": "x"} if row == "auto" else {"marker": "o"}
        axes.plot(budgets, [results[b][row] for b in budgets], label=row, **style)
    axes.set_xlabel("target labels per class")
    axes.set_ylabel("target test accuracy")
    axes.set_xticks(budgets)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title("Data efficiency: US -> India road signs")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def log_to_mlflow(results, autos, figure: Path, params: Params, seconds: float) -> str:
    mlflow.set_tracking_uri(resolve_tracking_uri(params.tracking, REPO))
    mlflow.set_experiment("roadshift-benchmarks")
    with mlflow.start_run(run_name="transfer-data-efficiency") as run:
        mlflow.log_params({"architecture": params.model.architecture, "budgets": sorted(results)})
        for budget, scores in results.items():
            mlflow.log_metrics({f"{row}_accuracy": v for row, v in scores.items()}, step=budget)
        mlflow.log_metric("wall_seconds", seconds)
        mlflow.log_artifact(str(figure))
        mlflow.log_dict({"accuracy": results, "auto": autos}, "data_efficiency.json")
        return run.info.run_id


def report(results: dict[int, dict[str, float]], autos: dict[int, dict]) -> None:
    budgets = sorted(results)
    print("\ntarget-test accuracy by target labels per class")
    print(f"  {'strategy':<20}" + "".join(f"{b:>8}" for b in budgets))
    for row in ROWS:
        print(f"  {row:<20}" + "".join(f"{results[b][row]:>8.3f}" for b in budgets))
    for budget in budgets:
        auto = autos[budget]
        print(f"  {budget}/class: {auto['reason']}")
    low = budgets[0]
    best_low = max(results[low][s] for s in TRANSFER)
    gain = best_low - results[low]["scratch"]
    verdict = "met" if gain >= 0.15 else "NOT met"
    print(f"\nbest transfer - scratch at {low}/class: {gain:+.3f} (target >= +0.150: {verdict})")
    for budget in budgets:
        best = max(results[budget][s] for s in ("feature_extraction", "fine_tune"))
        gap = results[budget]["auto"] - best
        verdict = "met" if gap >= -0.02 else "NOT met"
        print(f"auto - best at {budget}/class: {gap:+.3f} (target >= -0.020: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--workdir", type=Path, default=None, help="keep the project here")
    args = parser.parse_args()
    started = time.perf_counter()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="roadshift-bench-transfer-"))
    root.mkdir(parents=True, exist_ok=True)
    params = project(root, args.labels)
    pretrained = run_pretrain(params, root)
    print(f"source model: source test accuracy {pretrained.metrics['source_test_accuracy']:.3f}")
    results, autos = {}, {}
    for budget in sorted(args.labels):
        results[budget], autos[budget] = run_budget(root, params, budget)
        print(f"{budget}/class: " + ", ".join(f"{k} {v:.3f}" for k, v in results[budget].items()))
    seconds = time.perf_counter() - started
    OUTPUT.mkdir(parents=True, exist_ok=True)
    figure = plot(results, OUTPUT / "data_efficiency.png")
    figures = OUTPUT / "data_efficiency.json"
    figures.write_text(json.dumps({"accuracy": results, "auto": autos}, indent=2) + "\n")
    run_id = log_to_mlflow(results, autos, figure, params, seconds)
    report(results, autos)
    print(f"\nplot {figure}, figures {figures}; MLflow run {run_id}; {seconds:.0f} s in all")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
