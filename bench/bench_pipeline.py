"""End to end: wall time and peak memory of the whole pipeline on the embedded default.

    .venv/bin/python bench/bench_pipeline.py [--reruns 3] [--profile-rerun]

In a fresh temporary project (``git archive HEAD`` of this checkout, ``git init``, its
own local SQLite MLflow store, DVC cache and Prefect home with the temporary server,
exactly what ``make run`` uses), with params.yaml as committed:

1. cold -- ``roadshift data synth --if-absent`` + ``roadshift run`` on a project that
   has never run: synthesis, every stage, registration, DVC push;
2. rerun -- ``roadshift run`` again with nothing changed (DVC skips every stage);
3. retrain -- ``roadshift data synth --add-target-batch 6`` (a new labelled target
   batch), then ``roadshift run``: prepare, validate, finetune, scratch and evaluate
   run again, pretrain is skipped.

Peak memory is the largest sum of resident set sizes over the whole process tree
(``roadshift run``, the Prefect server it starts, DVC's stage processes), sampled
every 0.2 s with psutil: an upper bound, since pages shared between processes count
once per process. The first run also warms the page cache for the later ones, as a
user's own reruns would be. ``--profile-rerun`` runs one more rerun under cProfile and
prints where its time went.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from roadshift.cli import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
COLD_TARGET_S = 300.0
RERUN_TARGET_S = 30.0
PEAK_TARGET_GIB = 4.0
# the CLI's own offline settings, plus the temporary Prefect server and unbuffered output
BENCH_ENV = {**OFFLINE_ENV, "PREFECT_SERVER_EPHEMERAL_ENABLED": "true", "PYTHONUNBUFFERED": "1"}


@dataclass
class Measured:
    seconds: float
    peak_bytes: int
    output: str


def _copy_worktree(root: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)


def fresh_project(work: Path, worktree: bool) -> Path:
    """What a fresh clone holds (the committed tree; with ``worktree``, the checkout's
    tracked and untracked files as they are now), as its own git repository."""
    root = work / "project"
    root.mkdir()
    if worktree:
        _copy_worktree(root)
    else:
        archive = subprocess.run(
            ["git", "archive", "HEAD"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x"], cwd=root, input=archive, check=True)
    for args in (
        ["init", "-q"],
        ["config", "user.email", "bench@roadshift.invalid"],
        ["config", "user.name", "roadshift bench"],
        ["add", "-A"],
        ["commit", "-q", "-m", "fresh clone"],
    ):
        subprocess.run(["git", *args], cwd=root, check=True)
    return root


def environment(root: Path) -> dict[str, str]:
    """The Makefile's environment, pointed at the temporary project and its own code."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "MLFLOW_", "ROADSHIFT_"))
    }
    env.update(BENCH_ENV)
    env["PREFECT_HOME"] = str(root / ".prefect")
    # the venv's editable install points at this checkout: the copy's code must win
    env["PYTHONPATH"] = str(root)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


def measure(command: list[str], root: Path, env: dict[str, str]) -> Measured:
    """Run ``command`` in ``root``; wall time and the peak RSS sum of its process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True)
    reader.start()
    watched = psutil.Process(process.pid)
    while process.poll() is None:
        peak = max(peak, _tree_rss(watched))
        time.sleep(0.2)
    reader.join()
    seconds = time.perf_counter() - started
    output = "".join(chunks)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return Measured(seconds, peak, output)


def roadshift(*args: str) -> list[str]:
    return [str(VENV_BIN / "roadshift"), *args]


def stage_lines(output: str) -> list[str]:
    """The flow's closing per-stage lines (``  pretrain  ran (41.2 s)``)."""
    return [
        line.strip()
        for line in output.splitlines()
        if line.startswith("  ") and ("ran (" in line or "skipped (" in line)
    ]


def profile_rerun(root: Path, env: dict[str, str], out: Path) -> list[str]:
    """One more unchanged rerun under cProfile; the slowest calls by cumulative time."""
    import pstats

    command = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "roadshift", "run"]
    measure(command, root, env)
    stats = pstats.Stats(str(out))
    stats.sort_stats("cumulative")
    rows = []
    for (path, line, name), (_, _, _, cumulative, _) in stats.stats.items():
        label = f"{Path(path).name}:{line}({name})"
        rows.append((cumulative, label))
    rows.sort(reverse=True)
    wanted = (
        "import_module",
        "training_pipeline",
        "version_data",
        "reproduce_stage",
        "start_run",
        "register",
        "push_to_remote",
        "configure_tracking",
        "lineage_tags",
        "_run_stages",
        "publish_",
        "create_markdown_artifact",
        "start",
    )
    shown = [
        f"{seconds:7.2f} s  {label}" for seconds, label in rows if any(w in label for w in wanted)
    ]
    return shown[:20]


def gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--profile-rerun", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    parser.add_argument(
        "--worktree", action="store_true", help="copy the checkout as it is, not HEAD"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="roadshift-bench-pipeline-"))
    try:
        root = fresh_project(work, args.worktree)
        env = environment(root)
        synth = measure(roadshift("data", "synth", "--if-absent"), root, env)
        pipeline = measure(roadshift("run"), root, env)
        cold = Measured(
            synth.seconds + pipeline.seconds,
            max(synth.peak_bytes, pipeline.peak_bytes),
            pipeline.output,
        )
        reruns = [measure(roadshift("run"), root, env) for _ in range(args.reruns)]
        profile = profile_rerun(root, env, work / "rerun.prof") if args.profile_rerun else []
        batch = measure(
            roadshift("data", "synth", "--add-target-batch", "6", "--batch-id", "bench"), root, env
        )
        retrain = measure(roadshift("run"), root, env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")

    rerun_s = statistics.median(r.seconds for r in reruns)
    rerun_peak = max(r.peak_bytes for r in reruns)
    peak = max(cold.peak_bytes, rerun_peak, retrain.peak_bytes)
    print(f"embedded default (params.yaml as committed), fresh project, {os.cpu_count()} CPUs")
    print(
        f"  cold: synth {synth.seconds:.1f} s + pipeline {pipeline.seconds:.1f} s = "
        f"{cold.seconds:.1f} s, peak {gib(cold.peak_bytes)} (1 run)"
    )
    for line in stage_lines(cold.output):
        print(f"      {line}")
    shown = ", ".join(f"{r.seconds:.1f}" for r in reruns)
    print(
        f"  unchanged rerun: {rerun_s:.1f} s median of {len(reruns)} (runs: {shown}), "
        f"peak {gib(rerun_peak)}"
    )
    print(
        f"  retrain after a new target batch: {retrain.seconds:.1f} s (1 run; adding the "
        f"batch took {batch.seconds:.1f} s more), peak {gib(retrain.peak_bytes)}"
    )
    for line in stage_lines(retrain.output):
        print(f"      {line}")
    if profile:
        print("  where an unchanged rerun spends its time (cProfile, cumulative, main process):")
        for line in profile:
            print(f"    {line}")
    print(
        f"cold pipeline: {cold.seconds:.0f} s (target < {COLD_TARGET_S:.0f} s: "
        f"{verdict(cold.seconds < COLD_TARGET_S)})"
    )
    print(
        f"unchanged rerun: {rerun_s:.1f} s (target < {RERUN_TARGET_S:.0f} s: "
        f"{verdict(rerun_s < RERUN_TARGET_S)})"
    )
    ratio = retrain.seconds / cold.seconds
    print(f"retrain / cold: {ratio:.2f} (target < 0.50: {verdict(ratio < 0.5)})")
    print(
        f"peak memory: {gib(peak)} (target < {PEAK_TARGET_GIB:.0f} GiB: "
        f"{verdict(peak < PEAK_TARGET_GIB * 2**30)})"
    )


if __name__ == "__main__":
    main()
