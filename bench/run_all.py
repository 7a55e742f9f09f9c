"""Run every benchmark in bench/ and write bench/RESULTS.md.

    make bench        (or .venv/bin/python bench/run_all.py [--only transfer predict])

Each benchmark script prints its own figures (medians of repeated, interleaved
runs where it times something) and a line per target saying ``met`` or ``NOT met``.
This runner records the machine and library versions, runs the scripts one after
another (never in parallel: they would measure each other), and copies each
one's output and its target lines into RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
NOTES = BENCH / "NOTES.md"  # what profiling showed and what changed, kept by hand
TOTAL_TARGET_S = 15 * 60
SCRIPTS = {
    "validation": "bench_validation.py",
    "training_loop": "bench_training_loop.py",
    "transfer": "bench_transfer.py",
    "predict": "bench_predict.py",
    "pipeline": "bench_pipeline.py",
}
ARGUMENTS = {"pipeline": ["--profile-rerun"]}
PACKAGES = ("torch", "torchvision", "mlflow", "prefect", "dvc", "great_expectations")
_NOISE = re.compile(r"(INFO|WARNING|UserWarning|color_warning|━)")
_TARGET = re.compile(r"target\b.*\b(met|NOT met)\b", re.IGNORECASE)


def machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 2**20:.0f} GiB memory"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    versions = ", ".join(f"{name} {version(name.replace('_', '-'))}" for name in PACKAGES)
    return [
        f"- Machine: {cpu}, {os.cpu_count()} cores{memory}, {gpu}",
        f"- Python {platform.python_version()}; {versions}",
    ]


def run(name: str, script: str) -> tuple[str, float, int]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *ARGUMENTS.get(name, [])],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(BENCH.parent)},
    )
    output = "\n".join(
        line for line in (done.stdout + done.stderr).splitlines() if not _NOISE.search(line)
    )
    return output.strip(), time.perf_counter() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), default=sorted(SCRIPTS))
    args = parser.parse_args()
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
    ]
    lines += machine()
    summary, sections = [], []
    started = time.perf_counter()
    for name in [n for n in SCRIPTS if n in args.only]:
        print(f"running {SCRIPTS[name]} ...", flush=True)
        output, seconds, code = run(name, SCRIPTS[name])
        status = "" if code == 0 else f" (exit {code})"
        sections += [
            f"## {name} (`bench/{SCRIPTS[name]}`, {seconds:.0f} s{status})",
            "",
            "```",
            output,
            "```",
            "",
        ]
        summary += [
            f"| {name} | {line.strip()} |" for line in output.splitlines() if _TARGET.search(line)
        ]
        print(output.splitlines()[-1] if output else "(no output)", flush=True)
    total = time.perf_counter() - started
    met = "met" if total < TOTAL_TARGET_S else "NOT met"
    summary.append(
        f"| all | every benchmark: {total / 60:.1f} min (target < {TOTAL_TARGET_S // 60} min "
        f"after the venv is installed: {met}) |"
    )
    lines += ["", "## Targets", "", "| benchmark | figure and target |", "|---|---|", *summary, ""]
    notes = [NOTES.read_text().strip(), ""] if NOTES.is_file() else []
    RESULTS.write_text("\n".join(lines + notes + sections) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
