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
from roadshift.train.runtime import cgroup_cpu_quota, torch_threads, usable_cpus


@pytest.fixture
def restores_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_follow_the_cpus_the_process_may_use():
    quota = cgroup_cpu_quota()
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus() == (min(affinity, quota) if quota else affinity)
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


def cgroup_files(tmp_path, files: dict[str, str], own: str):
    """A fake ``/sys/fs/cgroup`` tree and ``/proc/self/cgroup`` text under ``tmp_path``."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    own_file = tmp_path / "self-cgroup"
    own_file.write_text(own)
    return root, own_file


def test_a_cgroup_v2_quota_is_rounded_up_to_whole_cpus(tmp_path):
    root, own = cgroup_files(tmp_path, {"pod/cpu.max": "150000 100000\n"}, "0::/pod\n")
    assert cgroup_cpu_quota(root, own) == 2


def test_a_parent_cgroups_quota_binds_its_children(tmp_path):
    files = {"cpu.max": "max 100000\n", "a/cpu.max": "100000 100000\n", "a/b/cpu.max": "max 1"}
    root, own = cgroup_files(tmp_path, files, "0::/a/b\n")
    assert cgroup_cpu_quota(root, own) == 1


def test_no_quota_means_no_limit(tmp_path):
    root, own = cgroup_files(tmp_path, {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cgroup_cpu_quota(root, own) is None
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "missing-self") is None


def test_a_cgroup_v1_cfs_quota_counts_and_minus_one_is_no_limit(tmp_path):
    files = {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/job/cpu.cfs_quota_us": "250000\n",
        "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
    }
    root, own = cgroup_files(tmp_path, files, "5:memory:/job\n4:cpu,cpuacct:/job\n")
    assert cgroup_cpu_quota(root, own) == 3
    root, own = cgroup_files(tmp_path, files, "4:cpu,cpuacct:/\n")
    assert cgroup_cpu_quota(root, own) is None


def test_a_tiny_quota_still_leaves_one_thread(tmp_path):
    root, own = cgroup_files(tmp_path, {"cpu.max": "10000 100000\n"}, "0::/\n")
    assert cgroup_cpu_quota(root, own) == 1


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs util-linux's taskset")
def test_the_roadshift_command_sets_passive_openmp_waits_before_torch_loads():
    """Set in the command's environment, the wait policy also reaches DVC's stage processes,
    and reaches libgomp, which reads it when torch loads it."""
    probe = "import os, sys; sys.argv = ['roadshift', '--help']\nfrom roadshift import cli\n"
    probe += "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
    probe += "from roadshift.train.runtime import usable_cpus\n"
    probe += "print(os.environ['OMP_WAIT_POLICY'], usable_cpus())\n"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert done.stdout.split()[-2:] == ["PASSIVE", "1"]
