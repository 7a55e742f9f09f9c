"""How the training stages share the CPU cores: each takes its share whether or not the
pipeline runs them side by side, so the schedule never changes the weights."""

from __future__ import annotations

import os

import pytest
import torch

from roadshift.config import BaseSection
from roadshift.cores import TRAINED_SIDE_BY_SIDE, side_by_side_refusal, torch_threads
from roadshift.distributed import TRAIN_PROCESSES_ENV
from roadshift.training import configure_runtime


@pytest.fixture
def cores(monkeypatch):
    def machine_with(count: int) -> None:
        monkeypatch.setattr(os, "cpu_count", lambda: count)

    return machine_with


@pytest.fixture
def restores_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_stages_sharing_the_machine_each_get_an_equal_share_of_its_cores(cores):
    cores(8)
    assert torch_threads(BaseSection()) == 8
    assert torch_threads(BaseSection(), sharing=len(TRAINED_SIDE_BY_SIDE)) == 4


def test_a_share_is_at_least_one_thread(cores):
    cores(1)
    assert torch_threads(BaseSection(), sharing=2) == 1


def test_an_explicit_thread_count_wins_whatever_the_sharing(cores):
    cores(8)
    assert torch_threads(BaseSection(num_threads=3), sharing=2) == 3


def test_a_training_stage_runs_with_its_share(cores, restores_torch_threads):
    cores(4)
    configure_runtime(BaseSection(device="cpu"), sharing=2)
    assert torch.get_num_threads() == 2


def test_finetune_and_scratch_share_a_cpu_machine_with_cores_enough(cores, monkeypatch):
    monkeypatch.delenv(TRAIN_PROCESSES_ENV, raising=False)
    cores(2)
    assert side_by_side_refusal(BaseSection(device="cpu")) is None
    assert side_by_side_refusal(BaseSection(device="cpu", num_threads=1)) is None


def test_more_threads_than_the_cores_hold_train_them_one_after_the_other(cores):
    cores(4)
    refusal = side_by_side_refusal(BaseSection(device="cpu", num_threads=3))
    assert refusal is not None and "base.num_threads=3" in refusal and "4 cores" in refusal
    cores(1)
    assert side_by_side_refusal(BaseSection(device="cpu")) is not None


def test_torchrun_groups_and_gpus_train_them_one_after_the_other(cores, monkeypatch):
    cores(16)
    assert "GPU" in side_by_side_refusal(BaseSection(device="cuda"))
    monkeypatch.setenv(TRAIN_PROCESSES_ENV, "2")
    assert TRAIN_PROCESSES_ENV in side_by_side_refusal(BaseSection(device="cpu"))
