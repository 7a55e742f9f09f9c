"""How many CPU threads a training stage uses.

Thread counts follow the CPUs this process may actually use: its affinity mask (``taskset``,
a container pinned to a few cores) and its cgroup CPU quota (a Kubernetes pod limited to 2
CPUs on a 64-core node, ``docker run --cpus``, ``systemd-run -p CPUQuota=``). A thread per
core the process cannot use only makes the threads queue behind each other.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import psutil

from roadshift.config import BaseSection

CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUPS = Path("/proc/self/cgroup")


def _quota_v2(folder: Path) -> float | None:
    """``cpu.max`` holds ``<quota> <period>`` in microseconds, or ``max <period>``."""
    try:
        fields = (folder / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    return int(fields[0]) / int(fields[1])


def _quota_v1(folder: Path) -> float | None:
    """``cpu.cfs_quota_us`` is -1 for no limit; ``cpu.cfs_period_us`` the period."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _folders_up(base: Path, relative: str) -> list[Path]:
    """``base/relative`` and each parent up to ``base``: a parent's quota binds its children."""
    folder = base / relative.strip("/")
    found = [folder]
    while folder != base:
        folder = folder.parent
        found.append(folder)
    return found


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = OWN_CGROUPS
) -> int | None:
    """CPUs the cgroup quota allows this process (quota / period rounded up, at least 1), or
    None where no quota is set.

    ``own_cgroups`` is ``/proc/self/cgroup``: ``0::/path`` for cgroup v2, and for v1 one line
    per hierarchy such as ``4:cpu,cpuacct:/path``. Inside a container the path may not exist
    under the mounted root (the root *is* the container's cgroup), so the root counts too.
    """
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        lines = []
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            limits += [q for f in _folders_up(cgroup_root, path) if (q := _quota_v2(f))]
        elif "cpu" in controllers.split(","):
            for mount in {cgroup_root / "cpu", cgroup_root / controllers}:
                limits += [q for f in _folders_up(mount, path) if (q := _quota_v1(f))]
    if not lines:  # no /proc: the root alone
        limits += [q for q in (_quota_v2(cgroup_root), _quota_v1(cgroup_root / "cpu")) if q]
    return max(1, math.ceil(min(limits))) if limits else None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity (else every CPU), capped by the cgroup quota."""
    if hasattr(os, "sched_getaffinity"):
        cpus = max(1, len(os.sched_getaffinity(0)))
    else:
        cpus = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return min(cpus, quota) if quota is not None else cpus


def torch_threads(base: BaseSection) -> int:
    """``base.num_threads``, or else one per usable CPU.

    The thread count changes a CPU run's floating-point sums; it is part of what makes a
    run repeatable, so it comes from the config or the machine, never from scheduling.
    """
    return base.num_threads or usable_cpus()


# --- how idle OpenMP threads wait -------------------------------------------------------------

SHARED_CPU_LOAD = 0.5
"""CPUs' worth of work by other processes (on this process's CPUs) from which they count as
shared."""


def others_cpu_load(window: float = 0.3) -> float:
    """CPUs' worth of time that processes other than this one spent, over ``window`` seconds,
    on the CPUs this process may run on (its affinity; time stolen by a hypervisor counts)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    me = psutil.Process()

    def busy_seconds() -> tuple[float, float]:
        per_cpu = psutil.cpu_times(percpu=True)
        chosen = [per_cpu[i] for i in cpus if i < len(per_cpu)] if cpus else per_cpu
        fields = ("user", "nice", "system", "irq", "softirq", "steal")
        busy = sum(getattr(times, field, 0.0) for times in chosen for field in fields)
        own = me.cpu_times()
        return busy, own.user + own.system

    busy_before, own_before = busy_seconds()
    time.sleep(window)
    busy_after, own_after = busy_seconds()
    return max(0.0, (busy_after - busy_before) - (own_after - own_before)) / window


def choose_openmp_wait_policy(window: float = 0.3) -> str | None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when other processes keep this process's CPUs busy;
    the policy in force afterwards (None: libgomp's default).

    libgomp reads the policy once, when torch loads it, so this runs before torch is imported.
    Alone, OpenMP threads that spin briefly at each barrier before sleeping (the default) ran
    the embedded pipeline 1.42x faster than sleeping threads (PASSIVE). Next to another busy
    job, spinning threads burn the CPU time the thread they wait for needs: pretraining fell
    about 50x. A policy already set in the environment is the user's choice and is kept. The
    choice is made at stage start: a job that starts later on the same CPUs meets spinning
    threads until the stage ends (docs/pipeline.md: set PASSIVE yourself for such machines).
    The wait policy never changes the numbers a run computes, only how threads wait.
    """
    if "OMP_WAIT_POLICY" not in os.environ and others_cpu_load(window) >= SHARED_CPU_LOAD:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY")
