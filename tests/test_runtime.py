"""How many threads a training stage uses: the CPUs it may run on, or the configured count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from roadshift.config import BaseSection
from roadshift.train.loop import configure_runtime
from roadshift.train.runtime import torch_threads, usable_cpus


@pytest.fixture
def restores_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_follow_the_cpus_the_process_may_use():
    assert usable_cpus() == len(os.sched_getaffinity(0))
    assert torch_threads(BaseSection()) == usable_cpus()


def test_an_explicit_thread_count_wins():
    assert torch_threads(BaseSection(num_threads=3)) == 3


def test_a_training_stage_runs_with_that_many_threads(restores_torch_threads):
    configure_runtime(BaseSection(device="cpu", num_threads=1))
    assert torch.get_num_threads() == 1


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs util-linux's taskset")
def test_a_process_pinned_to_one_cpu_trains_on_one_thread():
    probe = (
        "from roadshift.config import BaseSection\n"
        "from roadshift.train.loop import configure_runtime\n"
        "import torch\n"
        "configure_runtime(BaseSection(device='cpu'))\n"
        "print(torch.get_num_threads())\n"
    )
    done = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "1"
