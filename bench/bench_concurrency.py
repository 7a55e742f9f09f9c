"""Two pipelines on one machine: wall time of two concurrent ``roadshift run`` against one alone.

    .venv/bin/python bench/bench_concurrency.py [--tiny] [--also-active] [--keep]

Each run is a fresh temporary project (this checkout's files as they are now, its own git
repository, SQLite MLflow store, DVC cache and Prefect home with the temporary server), with
its data synthesised before the clock starts:

1. alone -- one ``roadshift run`` with the machine otherwise idle;
2. together -- two ``roadshift run`` started at the same moment in two other projects; the
   figure is the later of the two to finish.

Target: together within 2.5x of alone (two pipelines on the same cores cannot beat 2x;
threads that spin in OpenMP barriers made it ~50x). ``--also-active`` first runs one more
pipeline alone with ``OMP_WAIT_POLICY=ACTIVE`` (spinning waits, what ``roadshift`` ran with
before it chose the policy per stage), to check that one pipeline alone is not more than
10 % slower now. Each run's stages record the policy they chose (MLflow tag
``roadshift.omp_wait_policy``); the script prints them.
``--tiny`` uses the tests' tiny params (seconds per stage) to check the script itself;
its figures mean nothing. Run it on a quiet machine: any other load skews both figures.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from bench_pipeline import REPO, environment, fresh_project, roadshift

TOGETHER_TARGET = 2.5
ALONE_SLOWDOWN_TARGET = 1.10


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def tiny_params(root: Path) -> None:
    """The tests' tiny params over the project's own, with threads left to the machine."""
    sys.path.insert(0, str(REPO))
    from tests.helpers import TINY_PARAMS

    tiny = _merge(TINY_PARAMS, {"base": {"num_threads": 0}})
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(_merge(params, tiny), sort_keys=False))
    subprocess.run(["git", "commit", "-qam", "tiny params"], cwd=root, check=True)


def prepared_project(work: Path, tiny: bool) -> Path:
    work.mkdir(parents=True)
    root = fresh_project(work, worktree=True)
    if tiny:
        tiny_params(root)
    done = subprocess.run(
        roadshift("data", "synth", "--if-absent"),
        cwd=root,
        env=environment(root),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"data synth in {root} failed:\n{done.stdout}{done.stderr}")
    return root


def timed_run(root: Path, extra_env: dict[str, str] | None = None) -> float:
    env = environment(root)
    for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):  # a shell's pins would skew the figures
        env.pop(key, None)
    env.update(extra_env or {})
    started = time.perf_counter()
    done = subprocess.run(roadshift("run"), cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"roadshift run in {root} failed:\n{output}")
    return seconds


def stage_policies(root: Path) -> str:
    """``stage=policy`` for each stage run of the project's store (roadshift.train.runtime)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    chosen = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], order_by=["start_time ASC"]):
            stage = run.data.tags.get("roadshift.stage")
            if stage:
                chosen.append(f"{stage}={run.data.tags.get('roadshift.omp_wait_policy', '?')}")
    return " ".join(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny params: checks the script")
    parser.add_argument(
        "--also-active", action="store_true", help="one more alone run with spinning waits"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="roadshift-bench-concurrency-"))
    try:
        names = ["active", "alone", "first", "second"] if args.also_active else []
        names = names or ["alone", "first", "second"]
        projects = {name: prepared_project(work / name, args.tiny) for name in names}
        if args.also_active:
            active = timed_run(projects["active"], {"OMP_WAIT_POLICY": "ACTIVE"})
            print(f"alone, OMP_WAIT_POLICY=ACTIVE: {active:7.1f} s")
        alone = timed_run(projects["alone"])
        print(f"alone:                         {alone:7.1f} s")
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(timed_run, (projects["first"], projects["second"])))
        print(f"two together:                  {together[0]:7.1f} s and {together[1]:7.1f} s")
        for name, root in projects.items():
            print(f"  {name} stages' OpenMP wait policy: {stage_policies(root)}")
        ratio = max(together) / alone
        verdict = "ok" if ratio <= TOGETHER_TARGET else "MISSED"
        print(f"together / alone: {ratio:.2f}x (target <= {TOGETHER_TARGET}x): {verdict}")
        if args.also_active:
            slowdown = alone / active
            verdict = "ok" if slowdown <= ALONE_SLOWDOWN_TARGET else "MISSED"
            print(f"alone / alone ACTIVE: {slowdown:.2f}x (target <= 1.10x): {verdict}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
