"""End to end: wall time and peak memory of the whole pipeline on the embedded default.

    .venv/bin/python bench/bench_pipeline.py [--projects 3] [--reruns 1] [--profile-rerun]

In each of ``--projects`` fresh temporary projects (``git archive HEAD`` of this checkout,
``git init``, its own local SQLite MLflow store, DVC cache and Prefect home with the
temporary server, exactly what ``make run`` uses), with params.yaml as committed:

1. cold -- ``roadshift data synth --if-absent`` + ``roadshift run`` on a project that
   has never run: synthesis, every stage, registration, DVC push;
2. rerun -- ``roadshift run`` again with nothing changed (DVC skips every stage);
3. retrain -- ``roadshift data synth --add-target-batch 6`` (a new labelled target
   batch), then ``roadshift run``: prepare, validate, finetune, scratch and evaluate
   run again (finetune and scratch one after the other), pretrain is skipped.

Each figure is the median over the projects (reruns: over all of them). Targets: cold
< 300 s, unchanged rerun < 30 s, peak memory < 4 GiB PSS. The retrain time and its
ratio to cold (the median of each project's own ratio, its two runs measured one after
the other on the same machine) are printed as information, with no target: the
retrain-under-half-of-cold target is withdrawn.

Peak memory is the largest sum of proportional set sizes (PSS: a page shared by n
processes counts 1/n in each) over the whole process tree (``roadshift run``, the
Prefect temporary server it starts, and each DVC stage's own ``roadshift stage``
process), sampled with psutil; the sum of resident set sizes is printed beside it as an
upper bound: it counts pages that processes share (the same libraries mapped in the
flow process and a stage process) once per process.
A project's first run also warms the page cache for the later ones, as a user's own
reruns would be. ``--profile-rerun`` runs one more rerun in the first project under
cProfile and prints where its time went.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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
    peak_bytes: int  # proportional set size (PSS) summed over the process tree
    peak_rss_bytes: int  # resident set size summed: shared pages count once per process
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


def _tree_members(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_rss(members: list[psutil.Process]) -> int:
    total = 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


def _tree_pss(members: list[psutil.Process]) -> int:
    """Each shared page split among the processes sharing it: what the tree really holds
    (the flow process and a stage process map the same libraries)."""
    total = 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += member.memory_full_info().pss
    return total


def measure(command: list[str], root: Path, env: dict[str, str]) -> Measured:
    """Run ``command`` in ``root``; wall time and the peak memory of its process tree.

    RSS is sampled every 0.2 s; PSS (~6 ms a process to read) every second and whenever
    the RSS sum reaches a new high, so that sampling takes little CPU from the run.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak_rss = peak_pss = 0
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True)
    reader.start()
    watched = psutil.Process(process.pid)
    for sample in itertools.count():
        if process.poll() is not None:
            break
        members = _tree_members(watched)
        rss = _tree_rss(members)
        if rss > peak_rss or sample % 5 == 0:
            peak_pss = max(peak_pss, _tree_pss(members))
        peak_rss = max(peak_rss, rss)
        time.sleep(0.2)
    reader.join()
    seconds = time.perf_counter() - started
    output = "".join(chunks)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return Measured(seconds, peak_pss, peak_rss, output)


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

    # the CLI's main() called in this process, as the `roadshift` script does, so the
    # profile covers the flow (each DVC stage runs in a process of its own)
    script = (
        "import cProfile, sys; from roadshift.cli import main; "
        "cProfile.run('main([\"run\"])', sys.argv[1])"
    )
    command = [sys.executable, "-c", script, str(out)]
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


@dataclass
class ProjectRun:
    """One fresh project's cold run, unchanged reruns and retrain, measured one after another."""

    synth: Measured
    cold: Measured
    reruns: list[Measured]
    retrain: Measured
    profile: list[str]


def measure_project(work: Path, worktree: bool, reruns: int, profile: bool) -> ProjectRun:
    root = fresh_project(work, worktree)
    env = environment(root)
    synth = measure(roadshift("data", "synth", "--if-absent"), root, env)
    pipeline = measure(roadshift("run"), root, env)
    cold = Measured(
        synth.seconds + pipeline.seconds,
        max(synth.peak_bytes, pipeline.peak_bytes),
        max(synth.peak_rss_bytes, pipeline.peak_rss_bytes),
        pipeline.output,
    )
    unchanged = [measure(roadshift("run"), root, env) for _ in range(reruns)]
    shown = profile_rerun(root, env, work / "rerun.prof") if profile else []
    measure(roadshift("data", "synth", "--add-target-batch", "6", "--batch-id", "bench"), root, env)
    retrain = measure(roadshift("run"), root, env)
    return ProjectRun(synth, cold, unchanged, retrain, shown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--projects", type=int, default=3, help="fresh projects, each cold + reruns + retrain"
    )
    parser.add_argument("--reruns", type=int, default=1, help="unchanged reruns per project")
    parser.add_argument("--profile-rerun", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects")
    parser.add_argument(
        "--worktree", action="store_true", help="copy the checkout as it is, not HEAD"
    )
    args = parser.parse_args()

    runs = []
    for index in range(args.projects):
        work = Path(tempfile.mkdtemp(prefix="roadshift-bench-pipeline-"))
        try:
            profile = args.profile_rerun and index == 0
            runs.append(measure_project(work, args.worktree, args.reruns, profile))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"kept {work}")

    def median(values) -> float:
        return statistics.median(list(values))

    cold_s = median(r.cold.seconds for r in runs)
    reruns = [m for r in runs for m in r.reruns]
    rerun_s = median(m.seconds for m in reruns) if reruns else float("nan")
    retrain_s = median(r.retrain.seconds for r in runs)
    ratios = [r.retrain.seconds / r.cold.seconds for r in runs]
    ratio = median(ratios)
    peak = max(
        max(r.cold.peak_bytes, r.retrain.peak_bytes, *(m.peak_bytes for m in r.reruns))
        for r in runs
    )
    n = len(runs)
    print(f"embedded default (params.yaml as committed), {n} fresh projects, {os.cpu_count()} CPUs")
    for index, run in enumerate(runs, 1):
        unchanged = ", ".join(f"{m.seconds:.1f}" for m in run.reruns) or "none"
        print(
            f"  project {index}: cold {run.cold.seconds:.1f} s (synth {run.synth.seconds:.1f} s), "
            f"unchanged rerun {unchanged} s, retrain {run.retrain.seconds:.1f} s, "
            f"retrain / cold {run.retrain.seconds / run.cold.seconds:.3f}"
        )
    first = runs[0]
    print("  stages of project 1, cold:")
    for line in stage_lines(first.cold.output):
        print(f"      {line}")
    print("  stages of project 1, retrain after a new target batch (6 per class):")
    for line in stage_lines(first.retrain.output):
        print(f"      {line}")
    for label, field in (("PSS", "peak_bytes"), ("RSS, an upper bound", "peak_rss_bytes")):
        print(
            f"  peak memory (process tree, {label}): "
            f"cold {gib(max(getattr(r.cold, field) for r in runs))}, "
            f"rerun {gib(max((getattr(m, field) for m in reruns), default=0))}, "
            f"retrain {gib(max(getattr(r.retrain, field) for r in runs))}"
        )
    if first.profile:
        print("  where an unchanged rerun spends its time (cProfile, cumulative, main process):")
        for line in first.profile:
            print(f"    {line}")
    print(
        f"cold pipeline: {cold_s:.0f} s median of {n} (target < {COLD_TARGET_S:.0f} s: "
        f"{verdict(cold_s < COLD_TARGET_S)})"
    )
    print(
        f"unchanged rerun: {rerun_s:.1f} s median of {len(reruns)} (target < "
        f"{RERUN_TARGET_S:.0f} s: {verdict(rerun_s < RERUN_TARGET_S)})"
    )
    print(
        f"retrain after a new target batch: {retrain_s:.0f} s median of {n}, "
        f"{ratio:.2f} of cold (median of each project's ratio; for information, no target)"
    )
    print(
        f"peak memory: {gib(peak)} PSS (target < {PEAK_TARGET_GIB:.0f} GiB: "
        f"{verdict(peak < PEAK_TARGET_GIB * 2**30)})"
    )


if __name__ == "__main__":
    main()
