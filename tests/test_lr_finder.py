"""The learning-rate range test on a tiny, linearly separable problem (CPU, < 1 s per test)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from roadshift.train.lr_finder import LrRangeResult, lr_range_test, plot_lr_range, suggest_lr

CPU = torch.device("cpu")
START_LR, END_LR = 1e-6, 1.0


def blobs(seed: int = 0, per_class: int = 128) -> TensorDataset:
    """Two well separated Gaussian blobs: any sane lr should reach ~100% accuracy."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(per_class, 2, generator=gen) * 0.7 + torch.tensor([-2.0, -2.0])
    x1 = torch.randn(per_class, 2, generator=gen) * 0.7 + torch.tensor([2.0, 2.0])
    labels = torch.cat([torch.zeros(per_class), torch.ones(per_class)]).long()
    return TensorDataset(torch.cat([x0, x1]), labels)


def tiny_net(dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2)
    )


def loader_for(dataset: TensorDataset, seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def run(model: nn.Module, loader, **kwargs) -> LrRangeResult:
    groups = kwargs.pop("groups", None) or [{"params": model.parameters(), "lr": 1e-2}]
    kwargs.setdefault("start_lr", START_LR)
    kwargs.setdefault("end_lr", END_LR)
    return lr_range_test(model, groups, loader, CPU, loss_fn=nn.CrossEntropyLoss(), **kwargs)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_tensors(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


class BnWatch:
    """Forward hook on a BatchNorm: its train flag and running mean at every call."""

    def __init__(self, bn: nn.BatchNorm1d) -> None:
        self.training: list[bool] = []
        self.last_mean = bn.running_mean.clone()
        bn.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.training.append(module.training)
        self.last_mean = module.running_mean.clone()


def test_suggestion_is_inside_the_range_and_trains_to_high_accuracy():
    torch.manual_seed(0)
    model, data = tiny_net(), blobs()
    loader = loader_for(data)
    result = run(model, loader)

    assert START_LR < result.suggested_lr < END_LR
    assert len(result.lrs) == len(result.losses) == len(result.smoothed) == 100
    assert "steepest descent" in result.reason
    assert min(result.smoothed) < result.smoothed[0]

    optimizer = torch.optim.AdamW(model.parameters(), lr=result.suggested_lr)
    for _ in range(3):
        model.train()
        for inputs, targets in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    model.eval()
    inputs, targets = data.tensors
    with torch.no_grad():
        accuracy = (model(inputs).argmax(dim=1) == targets).float().mean().item()
    assert accuracy >= 0.95


def test_weights_buffers_grads_flags_and_requires_grad_are_restored_exactly():
    torch.manual_seed(0)
    model = tiny_net()
    model[0].bias.requires_grad_(False)
    model[4].weight.grad = torch.full_like(model[4].weight, 0.5)
    model.eval()
    watch = BnWatch(model[1])
    before, initial_mean = snapshot(model), model[1].running_mean.clone()

    run(model, loader_for(blobs()))

    assert all(watch.training), "without prepare the sweep trains in train mode"
    assert not torch.equal(watch.last_mean, initial_mean), "the sweep did move the BN stats"
    assert_same_tensors(before, snapshot(model))
    assert int(model[1].num_batches_tracked) == 0
    assert not model[0].bias.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "0.bias")
    assert torch.equal(model[4].weight.grad, torch.full_like(model[4].weight, 0.5))
    assert model[0].weight.grad is None
    assert not any(module.training for module in model.modules())


def test_prepare_replaces_train_mode_and_its_changes_are_undone():
    torch.manual_seed(0)
    model = tiny_net()
    watch = BnWatch(model[1])
    first_weight = model[0].weight.detach().clone()

    def freeze_first_layer(net: nn.Module) -> None:
        net.train()
        net[1].eval()
        net[0].requires_grad_(False)

    run(model, loader_for(blobs()), prepare=freeze_first_layer)

    assert watch.training and not any(watch.training), "BN stayed in eval mode"
    assert all(p.requires_grad for p in model.parameters())
    assert all(module.training for module in model.modules())
    assert torch.equal(model[0].weight, first_weight)


def test_group_lr_ratios_are_kept_and_the_largest_group_is_the_reference():
    torch.manual_seed(0)
    model = tiny_net()
    backbone = [*model[0].parameters(), *model[1].parameters()]
    groups = [{"params": backbone, "lr": 1e-3}, {"params": model[4].parameters(), "lr": 1e-2}]

    result = run(model, loader_for(blobs()), groups=groups, num_steps=60)

    assert result.lrs[0] == pytest.approx(START_LR)
    ratio = (END_LR / START_LR) ** (1 / 59)
    steps = [later / earlier for earlier, later in zip(result.lrs, result.lrs[1:], strict=False)]
    assert steps == pytest.approx([ratio] * 59)
    if not result.stopped_early:
        assert result.lrs[-1] == pytest.approx(END_LR)
    backbone_lr, head_lr = result.final_group_lrs
    assert head_lr == pytest.approx(result.lrs[-1])
    assert backbone_lr / head_lr == pytest.approx(0.1)
    assert result.suggested_group_lrs == pytest.approx(
        [result.suggested_lr * 0.1, result.suggested_lr]
    )
    assert [group["lr"] for group in groups] == [1e-3, 1e-2], "caller's groups untouched"
    assert all(set(group) == {"params", "lr"} for group in groups)


def test_a_divergent_sweep_stops_before_num_steps():
    torch.manual_seed(0)
    result = run(tiny_net(), loader_for(blobs()), start_lr=1e-4, end_lr=1e4, num_steps=200)

    assert result.stopped_early
    assert len(result.lrs) < 200
    assert "stopped early" in result.reason
    assert result.smoothed[-1] > 4.0 * min(result.smoothed)
    assert result.suggested_lr < result.lrs[-1]


class NanAfter(nn.Module):
    """Cross-entropy that turns NaN from a given call on, like an fp16 overflow would."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls, self.seen = calls, 0

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        self.seen += 1
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * math.nan if self.seen > self.calls else loss


def test_a_non_finite_loss_stops_the_sweep_and_is_not_recorded():
    torch.manual_seed(0)
    model = tiny_net()
    groups = [{"params": model.parameters(), "lr": 1e-2}]
    result = lr_range_test(
        model, groups, loader_for(blobs()), CPU, loss_fn=NanAfter(80), start_lr=1e-6
    )

    assert len(result.lrs) == 80
    assert all(math.isfinite(loss) for loss in result.losses)
    assert "nan" in result.reason


def test_too_few_points_raise_a_clear_error():
    with pytest.raises(ValueError, match=r"start_lr.*num_steps"):
        run(tiny_net(), loader_for(blobs()), start_lr=1e3, end_lr=1e6)
    with pytest.raises(ValueError, match="num_steps=5"):
        run(tiny_net(), loader_for(blobs()), num_steps=5)


def test_same_seed_gives_identical_results_and_leaves_the_global_rng_alone():
    def seeded_run() -> LrRangeResult:
        torch.manual_seed(0)
        model = tiny_net(dropout=0.2)
        loader = DataLoader(blobs(), batch_size=32, shuffle=True)  # shuffles from global RNG
        return run(model, loader, num_steps=40)

    assert seeded_run() == seeded_run()

    model, loader = tiny_net(dropout=0.2), DataLoader(blobs(), batch_size=32, shuffle=True)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    run(model, loader, num_steps=40)
    assert torch.equal(torch.rand(4), expected)


def test_the_loader_is_cycled_for_more_steps_than_batches():
    torch.manual_seed(0)
    loader = DataLoader(blobs(per_class=16), batch_size=16)  # 2 batches
    assert len(run(tiny_net(), loader, num_steps=25).lrs) == 25


def test_suggestion_is_capped_at_half_the_lr_of_the_minimum():
    lrs = [1e-4 * 10 ** (4 * i / 99) for i in range(100)]
    smoothed = [1.0] * 90 + [1.0 - 0.1 * k**2 for k in range(1, 11)]

    suggested, reason = suggest_lr(lrs, smoothed, 1e-4, 100)

    assert suggested == pytest.approx(lrs[-1] / 2)
    assert "cap" in reason


def test_a_curve_without_descent_is_refused():
    lrs = [1e-4 * 10 ** (4 * i / 49) for i in range(50)]
    with pytest.raises(ValueError, match="lower start_lr"):
        suggest_lr(lrs, [1.0 + i for i in range(50)], 1e-4, 50)


def test_plot_writes_a_png(tmp_path: Path):
    torch.manual_seed(0)
    result = run(tiny_net(), loader_for(blobs()), num_steps=40)

    path = plot_lr_range(result, tmp_path / "plots" / "lr_range.png")

    assert path == tmp_path / "plots" / "lr_range.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
