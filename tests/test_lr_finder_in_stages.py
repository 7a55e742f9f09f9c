"""How a training stage uses the lr finder: train at its suggestion, or keep the configured lr."""

from __future__ import annotations

import torch

from roadshift.config import PretrainSection
from roadshift.train.loaders import make_loader
from roadshift.train.recipe import tune_learning_rate
from tests.helpers import Blobs, loaders, tiny_net

CPU = torch.device("cpu")


def groups_of(model: torch.nn.Module) -> list[dict]:
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    return [{"params": first, "lr": 0.001}, {"params": rest, "lr": 0.01}]


def test_the_suggestion_replaces_each_groups_lr_keeping_their_ratio_and_is_plotted(tmp_path):
    torch.manual_seed(0)
    model = tiny_net()
    section = PretrainSection(lr_finder=True)
    train, _ = loaders()
    choice = tune_learning_rate("pretrain", section, model, groups_of(model), train, CPU, tmp_path)
    low, high = (group["lr"] for group in choice.param_groups)
    assert high == choice.metrics["lr_finder_suggested_lr"]
    assert abs(low / high - 0.1) < 1e-9
    assert [p.name for p in choice.artifacts] == ["pretrain.png"]
    assert choice.artifacts[0].read_bytes()[:4] == b"\x89PNG"


def test_without_a_usable_curve_the_configured_rates_stay_and_the_stage_says_why(tmp_path, capsys):
    model = tiny_net()
    broken = Blobs(64, 1)
    broken.inputs[:] = float("nan")  # every step's loss is NaN: the sweep has nothing to show
    loader = make_loader(broken, 16, shuffle=True, seed=0)
    groups = groups_of(model)
    section = PretrainSection(lr_finder=True)
    choice = tune_learning_rate("pretrain", section, model, groups, loader, CPU, tmp_path)
    assert [g["lr"] for g in choice.param_groups] == [0.001, 0.01]
    assert choice.metrics == {} and choice.artifacts == []
    assert "lr finder gave no suggestion" in capsys.readouterr().out


def test_with_the_finder_off_nothing_runs():
    model = tiny_net()
    groups = groups_of(model)
    train, _ = loaders()
    choice = tune_learning_rate("pretrain", PretrainSection(), model, groups, train, CPU, None)
    assert choice.param_groups is groups and choice.metrics == {}
