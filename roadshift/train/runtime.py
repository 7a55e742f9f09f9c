"""How many CPU threads a training stage uses.

Thread counts follow the CPUs this process may actually run on (its affinity mask), not
every core of the machine: a stage started under ``taskset`` or in a container pinned to a
few cores must not start a thread per core it cannot use.
"""

from __future__ import annotations

import os

from roadshift.config import BaseSection


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity where the OS reports one, else all."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def torch_threads(base: BaseSection) -> int:
    """``base.num_threads``, or else one per usable CPU.

    The thread count changes a CPU run's floating-point sums; it is part of what makes a
    run repeatable, so it comes from the config or the machine, never from scheduling.
    """
    return base.num_threads or usable_cpus()
