"""The training loop: schedules, mixing, early stopping, divergence, checkpoints and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from roadshift.train.checkpoints import Checkpointing
from roadshift.train.loaders import EpochBatchSampler
from roadshift.train.loop import (
    FitOptions,
    TrainingDivergedError,
    _clip_gradients,
    create_scheduler,
    fit,
    mix_batch,
)
from tests.helpers import loaders, tiny_net

CPU = torch.device("cpu")


def train(options: FitOptions, **kwargs) -> tuple[nn.Module, object]:
    model = tiny_net()
    train_loader, val_loader = loaders(options.seed)
    groups = [{"params": list(model.parameters()), "lr": 0.05}]
    result = fit(model, groups, train_loader, val_loader, options, device=CPU, **kwargs)
    return model, result


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if "per_second" not in k} for record in history]


def test_the_loop_learns_and_keeps_the_best_validation_epoch():
    _, result = train(FitOptions(epochs=6, seed=3))
    assert len(result.history) == 6
    assert result.best_val_accuracy >= 0.9
    assert result.best_val_accuracy == max(r["val_accuracy"] for r in result.history)
    assert {"train_loss", "val_loss", "lr", "train_images_per_second"} <= set(result.history[0])


def test_two_runs_with_one_seed_give_identical_weights():
    first, _ = train(FitOptions(epochs=3, seed=5, mix="mixup", mix_probability=1.0))
    second, _ = train(FitOptions(epochs=3, seed=5, mix="mixup", mix_probability=1.0))
    assert states_equal(first, second)


class CrashAfter(Exception):
    pass


def test_a_crashed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    options = FitOptions(epochs=5, seed=11, mix="cutmix", schedule="cosine")
    reference, reference_result = train(options)

    checkpoint = Checkpointing(tmp_path / "ckpt", fingerprint="same inputs")

    def crash_after_epoch_3(record, epoch):
        if epoch == 3:
            raise CrashAfter

    with pytest.raises(CrashAfter):
        train(options, checkpoint=checkpoint, on_epoch_end=crash_after_epoch_3)
    # the crash came after epoch 3's callback, before its checkpoint: epoch 2 is the last one
    assert torch.load(checkpoint.path, weights_only=True)["epoch"] == 2
    replayed: list[int] = []
    resumed, result = train(
        options, checkpoint=checkpoint, on_epoch_end=lambda record, epoch: replayed.append(epoch)
    )
    assert result.resumed_from_epoch == 2
    assert replayed == [1, 2, 3, 4, 5]  # tracking sees every epoch, restored ones first
    assert states_equal(resumed, reference)
    assert without_timing(result.history) == without_timing(reference_result.history)
    assert not checkpoint.path.exists()  # a finished run leaves no checkpoint behind


def test_checkpoints_are_spaced_in_time_not_written_every_epoch(tmp_path):
    options = FitOptions(epochs=5, seed=11)
    hourly = Checkpointing(tmp_path / "hourly", fingerprint="inputs", every_seconds=3600)

    def crash_after_epoch_4(record, epoch):
        if epoch == 4:
            raise CrashAfter

    with pytest.raises(CrashAfter):
        train(options, checkpoint=hourly, on_epoch_end=crash_after_epoch_4)
    assert not hourly.path.exists()  # four quick epochs: none worth the cost of a save

    hourly.save({"epoch": 1})
    assert not hourly.due()  # the interval restarts at each save
    assert Checkpointing(tmp_path / "every", fingerprint="inputs").due()  # 0 s: every epoch


def test_a_checkpoint_from_other_inputs_is_ignored(tmp_path, capsys):
    options = FitOptions(epochs=2, seed=1)
    stale = Checkpointing(tmp_path, fingerprint="old data")
    stale.save({"epoch": 1})
    _, result = train(options, checkpoint=Checkpointing(tmp_path, fingerprint="new data"))
    assert result.resumed_from_epoch == 0
    assert "from other inputs or params" in capsys.readouterr().out


def test_a_nan_loss_stops_the_run_naming_the_epoch():
    model = tiny_net()
    train_loader, _ = loaders(poison=True)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan in epoch 1"):
        fit(
            model,
            [{"params": list(model.parameters()), "lr": 0.01}],
            train_loader,
            None,
            FitOptions(epochs=2),
            device=CPU,
        )


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement():
    model = tiny_net(batchnorm=False)
    train_loader, val_loader = loaders()
    frozen_lr = [{"params": list(model.parameters()), "lr": 0.0}]
    result = fit(
        model,
        frozen_lr,
        train_loader,
        val_loader,
        FitOptions(epochs=10, early_stopping_patience=2, schedule="constant"),
        device=CPU,
    )
    assert result.stopped_early_at == 3
    assert len(result.history) == 3 and result.best_epoch == 1


def test_prepare_epoch_runs_every_epoch_after_train_mode():
    seen: list[tuple[int, bool]] = []
    train(FitOptions(epochs=3), prepare_epoch=lambda m, epoch: seen.append((epoch, m.training)))
    # once before the loop too, so the trainable set is fixed before DDP wraps the model
    assert [epoch for epoch, _ in seen] == [1, 1, 2, 3]
    assert all(training for _, training in seen[-3:])


@pytest.mark.parametrize("schedule", ["one_cycle", "cosine", "constant"])
def test_schedules_warm_up_then_follow_their_shape(schedule):
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [parameter], "lr": 1.0}])
    options = FitOptions(epochs=1, schedule=schedule, warmup_fraction=0.2)
    scheduler = create_scheduler(optimizer, options, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < 0.2 and max(lrs) == pytest.approx(1.0, abs=0.05)
    assert np.argmax(lrs) in range(15, 25) if schedule == "one_cycle" else lrs[25] > 0.9
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < 0.01


def test_mixup_blends_and_cutmix_pastes_with_the_matching_weight():
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    targets = torch.tensor([0, 1])
    rng = np.random.default_rng(0)
    mixup = FitOptions(1, mix="mixup", mix_probability=1.0)
    mixed, partner, lam = mix_batch(images, targets, mixup, rng)
    # image i is filled with its label, so the blend of sample 0 is (1 - lam) * partner label
    assert 0 < lam < 1
    assert torch.allclose(mixed[0], torch.full((3, 8, 8), (1 - lam) * float(partner[0])))
    rng = np.random.default_rng(1)
    options = FitOptions(1, mix="cutmix", mix_probability=1.0)
    for _ in range(10):
        mixed, partner, lam = mix_batch(images, targets, options, rng)
        pasted = (mixed[0] != images[0]).float().mean().item()
        expected = (1 - lam) if partner[0] == 1 else 0.0
        assert pasted == pytest.approx(expected)
    untouched, same, lam = mix_batch(images, targets, FitOptions(1), rng)
    assert lam == 1.0 and untouched is images and same is targets


def test_batches_depend_only_on_seed_and_epoch_and_are_sharded_across_ranks():
    sampler = EpochBatchSampler(10, 4, shuffle=True, seed=1, seeded_batches=True)
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(1)
    sampler.set_epoch(3)
    assert list(sampler) == first
    assert sorted(i for batch in first for i in batch.indices) == list(range(10))
    assert all(len(batch.indices) > 1 for batch in first)  # no batch of one for BatchNorm
    shards = [
        EpochBatchSampler(10, 4, shuffle=True, seed=1, seeded_batches=False, rank=r, world_size=2)
        for r in (0, 1)
    ]
    for shard in shards:
        shard.set_epoch(3)
    seen = [sorted(i for batch in shard for i in batch) for shard in shards]
    assert len(seen[0]) == len(seen[1]) == 5
    assert sorted(seen[0] + seen[1]) == list(range(10))


def test_auto_workers_leave_a_small_cpu_only_machine_to_the_training_threads(monkeypatch):
    from roadshift.train import loaders
    from roadshift.train.loaders import resolve_num_workers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 2)
    assert resolve_num_workers("auto") == 0
    monkeypatch.setattr(loaders, "usable_cpus", lambda: 32)
    assert resolve_num_workers("auto") == 4
    assert resolve_num_workers(3) == 3


@pytest.mark.parametrize("max_norm", [0.01, 1e6], ids=["over the limit", "under the limit"])
def test_gradient_clipping_gives_exactly_what_clip_grad_norm_gives(max_norm):
    def gradients_after(clip) -> list[torch.Tensor]:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        model(torch.randn(32, 8)).pow(2).sum().backward()
        clip(list(model.parameters()), max_norm)
        return [p.grad.clone() for p in model.parameters()]

    ours, torchs = gradients_after(_clip_gradients), gradients_after(nn.utils.clip_grad_norm_)
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs, strict=True))
