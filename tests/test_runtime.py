"""How many threads a training stage uses (the CPUs it may run on, or the configured count)
and how they wait."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from roadshift.config import BaseSection
from roadshift.train.loop import configure_runtime
from roadshift.train.runtime import (
    cgroup_cpu_quota,
    others_cpu_load,
    torch_threads,
    usable_cpus,
)


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


def stage_wait_policy(root, env: dict[str, str]) -> list[str]:
    """The OMP_WAIT_POLICY a `roadshift stage pretrain` leaves in its environment, and its
    usable CPUs, run on CPU 0 only (the stage itself stops at once: ``root`` has no params)."""
    probe = "import os, sys\nfrom roadshift import cli\n"
    probe += f"cli.main(['--root', {str(root)!r}, 'stage', 'pretrain'])\n"
    probe += "from roadshift.train.runtime import usable_cpus\n"
    probe += "print(os.environ.get('OMP_WAIT_POLICY'), usable_cpus())\n"
    done = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return done.stdout.split()[-2:]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs util-linux's taskset")
def test_a_stage_on_cpus_another_job_keeps_busy_lets_its_openmp_threads_sleep(tmp_path):
    """Decided before torch loads libgomp, which reads the policy once; a policy already set
    in the environment is kept. (Alone, the stage leaves libgomp's spinning default: not
    asserted here, since a shared test machine is never known to be idle.)"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    busy = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert stage_wait_policy(tmp_path, env) == ["PASSIVE", "1"]
        assert stage_wait_policy(tmp_path, {**env, "OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "1"]
    finally:
        busy.kill()
        busy.wait()


def test_other_processes_cpu_load_counts_a_busy_loop_and_not_this_process():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert others_cpu_load(0.5) >= 0.5
    finally:
        busy.kill()
        busy.wait()
