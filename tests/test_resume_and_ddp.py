"""Training as users run it: a killed stage resumes to the same weights; torchrun shares work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from roadshift.cli import main
from roadshift.layout import Layout
from tests.helpers import PROJECT_ROOT, TINY_PARAMS, make_project, venv_environment

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# An epoch of the tiny data takes tens of milliseconds, so the kill below must land in a
# window many epochs wide: with 6 epochs a busy machine let the whole run finish (and
# clear its checkpoint) between the test seeing epoch 2 and its SIGKILL arriving.
PRETRAIN_EPOCHS = 40


@pytest.fixture(scope="module")
def validated_project(tmp_path_factory) -> Path:
    pretrain = {"epochs": PRETRAIN_EPOCHS, "checkpoint_every_seconds": 0}
    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], **pretrain}}
    root = make_project(tmp_path_factory.mktemp("resume"), params)
    for stage in ("prepare", "validate"):
        assert main(["--root", str(root), "stage", stage]) == 0
    return root


def stage_command(root: Path, stage: str) -> list[str]:
    return [sys.executable, "-m", "roadshift", "--root", str(root), "stage", stage]


def run_to_completion(command: list[str]) -> str:
    done = subprocess.run(
        command, env=venv_environment(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def last_checkpointed_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


def test_a_killed_training_stage_resumes_on_rerun_and_ends_with_identical_weights(
    validated_project,
):
    root, layout = validated_project, Layout(validated_project)
    weights = layout.model_dir("source") / "weights.safetensors"
    run_to_completion(stage_command(root, "pretrain"))
    uninterrupted = weights.read_bytes()
    weights.unlink()

    checkpoint = layout.checkpoint_dir("pretrain") / "last.pt"
    process = subprocess.Popen(
        stage_command(root, "pretrain"),
        env=venv_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while last_checkpointed_epoch(checkpoint) < 2 and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the stage finished before it could be killed"
    killed_after = last_checkpointed_epoch(checkpoint)
    assert 2 <= killed_after < PRETRAIN_EPOCHS and not weights.exists()

    output = run_to_completion(stage_command(root, "pretrain"))
    assert f"resuming after epoch {killed_after}" in output
    assert weights.read_bytes() == uninterrupted
    assert not checkpoint.exists()


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *args,
    ]


def test_two_cpu_processes_train_disjoint_shards_into_one_identical_model(tmp_path):
    env = venv_environment()
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    done = subprocess.run(
        torchrun(str(PROJECT_ROOT / "tests" / "ddp_fit_worker.py"), str(tmp_path)),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    shards = [set(rank["indices"].tolist()) for rank in ranks]
    assert shards[0].isdisjoint(shards[1])
    assert shards[0] | shards[1] == set(range(ranks[0]["dataset_size"]))
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["val_accuracy"] >= 0.8


def test_torchrun_runs_a_pipeline_stage_and_only_rank_zero_writes(validated_project):
    root, layout = validated_project, Layout(validated_project)
    output = run_to_completion(torchrun("-m", "roadshift", "--root", str(root), "stage", "scratch"))
    assert "data-parallel on 2 processes" in output
    assert (layout.model_dir("scratch") / "weights.safetensors").is_file()
    assert layout.metrics("scratch").is_file()


def test_an_environment_switch_runs_a_stage_data_parallel_without_changing_its_command(
    validated_project,
):
    """How a work pool sends a DVC stage to several processes: ROADSHIFT_TRAIN_PROCESSES."""
    root, layout = validated_project, Layout(validated_project)
    env = {**venv_environment(), "ROADSHIFT_TRAIN_PROCESSES": "2"}
    done = subprocess.run(
        stage_command(root, "scratch"), env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data-parallel on 2 processes" in done.stdout + done.stderr
    assert (layout.model_dir("scratch") / "weights.safetensors").is_file()

    env["ROADSHIFT_TRAIN_PROCESSES"] = "many"
    refused = subprocess.run(
        stage_command(root, "scratch"), env=env, capture_output=True, text=True, timeout=600
    )
    assert refused.returncode == 2
    assert "ROADSHIFT_TRAIN_PROCESSES='many'" in refused.stderr
