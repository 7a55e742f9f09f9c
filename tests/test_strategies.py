"""Fine-tuning plans on a real mobilenet_v3_small (8 classes, 32 px): which parameters train
at which epoch and rate, what BatchNorm does with target batches, and the embedding cache.

mobilenet_v3_small's backbone has 13 blocks (``features[0..12]``); its head is
``classifier``. Everything runs on the CPU in a second or two.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from roadshift.config import FinetuneSection
from roadshift.train.loop import FitOptions, fit, make_loader
from roadshift.train.models import ModelSpec, backbone_blocks, create_model, head_parameters
from roadshift.transfer.embeddings import fit_head_on_embeddings, fit_head_with_embedding_cache
from roadshift.transfer.strategies import plan_finetune, reestimate_batchnorm

ARCH = "mobilenet_v3_small"
BLOCKS = 13
CPU = torch.device("cpu")


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model(ARCH, 8)


def section(**values) -> FinetuneSection:
    return FinetuneSection(**values)


def ids(parameters) -> set[int]:
    return {id(p) for p in parameters}


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def block_ids(model: nn.Module, *indices: int) -> set[int]:
    blocks = backbone_blocks(model, ARCH)
    return {id(p) for i in indices for p in blocks[i].parameters()}


def batchnorms_in_train_mode(model: nn.Module) -> set[int]:
    """Indices of the backbone blocks holding a BatchNorm that is in train mode."""
    return {
        i
        for i, block in enumerate(backbone_blocks(model, ARCH))
        for m in block.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    }


def start_epoch(model: nn.Module, plan, epoch: int) -> None:
    """What fit() does at an epoch start."""
    model.train()
    plan.prepare_epoch(model, epoch)


def images(n: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator) + shift


# --- which parameters train ------------------------------------------------------------------


def test_feature_extraction_trains_exactly_the_head_with_backbone_batchnorm_frozen(model):
    plan = plan_finetune(model, ARCH, section(), "feature_extraction")
    head = ids(head_parameters(model, ARCH))
    assert [g["name"] for g in plan.param_groups] == ["head"]
    assert ids(plan.param_groups[0]["params"]) == head
    assert plan.param_groups[0]["lr"] == section().lr
    assert trainable_ids(model) == head
    start_epoch(model, plan, 1)
    assert batchnorms_in_train_mode(model) == set()
    assert model.classifier.training
    assert plan.trainable_parameter_count(1) == sum(
        p.numel() for p in model.classifier.parameters()
    )


def test_fine_tune_all_blocks_trains_every_parameter_once(model):
    plan = plan_finetune(model, ARCH, section(unfreeze_blocks="all"), "fine_tune")
    names = [g["name"] for g in plan.param_groups]
    assert names == ["head"] + [f"block_{i}" for i in reversed(range(BLOCKS))]
    grouped = [id(p) for g in plan.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(ids(model.parameters()))  # each exactly once
    assert trainable_ids(model) == ids(model.parameters())
    assert plan.trainable_parameter_count(1) == sum(p.numel() for p in model.parameters())


def test_fine_tune_last_two_blocks_freezes_the_rest(model):
    plan = plan_finetune(model, ARCH, section(unfreeze_blocks=2), "fine_tune")
    assert [g["name"] for g in plan.param_groups] == ["head", "block_12", "block_11"]
    expected = ids(head_parameters(model, ARCH)) | block_ids(model, 11, 12)
    assert trainable_ids(model) == expected
    start_epoch(model, plan, 1)
    assert batchnorms_in_train_mode(model) == {11, 12}  # batchnorm: adapt (the default)
    assert not backbone_blocks(model, ARCH)[10].training


def test_layer_wise_learning_rates_decay_from_the_top_block_down(model):
    config = section(lr=1e-2, backbone_lr_factor=0.1, layer_lr_decay=0.5, unfreeze_blocks=3)
    plan = plan_finetune(model, ARCH, config, "fine_tune")
    rates = {g["name"]: g["lr"] for g in plan.param_groups}
    assert rates == pytest.approx(
        {"head": 1e-2, "block_12": 1e-3, "block_11": 5e-4, "block_10": 2.5e-4}
    )


def test_progressive_unfreezing_adds_one_block_from_the_top_every_k_epochs(model):
    k = 2
    config = section(unfreeze_blocks=3, progressive_unfreeze_epochs=k)
    plan = plan_finetune(model, ARCH, config, "fine_tune")
    # Every group exists from the start, so the optimiser is built once.
    assert [g["name"] for g in plan.param_groups] == ["head", "block_12", "block_11", "block_10"]
    head = ids(head_parameters(model, ARCH))
    expected = {
        1: head,
        k: head,
        k + 1: head | block_ids(model, 12),
        2 * k + 1: head | block_ids(model, 11, 12),
        3 * k + 1: head | block_ids(model, 10, 11, 12),
        10 * k: head | block_ids(model, 10, 11, 12),  # no more than unfreeze_blocks
    }
    sizes = {}
    for epoch, trainable in expected.items():
        start_epoch(model, plan, epoch)
        assert trainable_ids(model) == trainable, epoch
        sizes[epoch] = plan.trainable_parameter_count(epoch)
        assert sizes[epoch] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sizes[1] < sizes[k + 1] < sizes[2 * k + 1] < sizes[3 * k + 1]
    start_epoch(model, plan, 1)  # a pure function of the epoch: going back works too
    assert trainable_ids(model) == head
    assert batchnorms_in_train_mode(model) == set()


def test_reinit_head_replaces_the_final_linear_only(model):
    old_first, old_last = model.classifier[0].weight, model.classifier[3].weight
    plan = plan_finetune(model, ARCH, section(reinit_head=True), "feature_extraction")
    assert model.classifier[0].weight is old_first
    assert model.classifier[3].weight is not old_last
    assert model.classifier[3].out_features == 8
    assert ids(plan.param_groups[0]["params"]) == ids(model.classifier.parameters())


def test_strategy_auto_is_not_a_plan(model):
    with pytest.raises(ValueError, match="strategy"):
        plan_finetune(model, ARCH, section(), "auto")  # type: ignore[arg-type]


# --- BatchNorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"), [("adapt", {10, 11, 12}), ("frozen", set()), ("reestimate", set())]
)
def test_batchnorm_modes_decide_which_statistics_follow_target_batches(model, mode, expected):
    plan = plan_finetune(model, ARCH, section(unfreeze_blocks=3, batchnorm=mode), "fine_tune")
    start_epoch(model, plan, 1)
    assert batchnorms_in_train_mode(model) == expected
    # Frozen statistics still leave the BN affine weights of trainable blocks training.
    bn = next(
        m for m in backbone_blocks(model, ARCH)[12].modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert bn.weight.requires_grad


def test_reestimate_replaces_running_stats_with_the_target_data_and_then_keeps_them(model):
    target = images(16, shift=2.0)
    loader = DataLoader(TensorDataset(target, torch.zeros(16, dtype=torch.long)), batch_size=8)
    first_conv, first_bn = model.features[0][0], model.features[0][1]
    model.train()
    assert reestimate_batchnorm(model, loader, CPU) == 16
    with torch.no_grad():
        conv_out = first_conv(target)
    assert torch.allclose(first_bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-4)
    assert first_bn.momentum == pytest.approx(0.1)  # restored
    assert model.training and first_bn.training  # modes restored
    plan = plan_finetune(model, ARCH, section(batchnorm="reestimate"), "fine_tune")
    start_epoch(model, plan, 1)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(images(8, shift=-3.0, seed=1))  # a training-mode forward pass on other data
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def changed_blocks(before: dict, model: nn.Module) -> set[str]:
    """``features.<i>`` indices and "classifier" whose tensors (incl. BN statistics) moved."""
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    return {k.split(".")[1] if k.startswith("features.") else k.split(".")[0] for k in moved}


def test_a_fit_with_the_plan_leaves_frozen_blocks_bitwise_untouched(model):
    config = section(lr=1e-2, unfreeze_blocks=1, progressive_unfreeze_epochs=1)
    plan = plan_finetune(model, ARCH, config, "fine_tune")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed: dict[int, set[str]] = {}
    data = TensorDataset(images(16), torch.arange(16) % 8)
    fit(
        model,
        plan.param_groups,
        make_loader(data, 8, shuffle=True, seed=0),
        None,
        FitOptions(epochs=2, schedule="constant", warmup_fraction=0.0),
        device=CPU,
        prepare_epoch=plan.prepare_epoch,
        on_epoch_end=lambda record, epoch: changed.update({epoch: changed_blocks(before, model)}),
    )
    assert changed == {1: {"classifier"}, 2: {"classifier", "12"}}


# --- feature extraction on cached embeddings -------------------------------------------------


def separable_embeddings(n_per_class: int, seed: int) -> TensorDataset:
    """Four classes, each a tight cluster around its own axis in 576 dimensions."""
    rng = np.random.default_rng(seed)
    centres = np.eye(4, 576) * 6.0
    labels = np.repeat(np.arange(4), n_per_class)
    features = centres[labels] + rng.normal(scale=0.25, size=(len(labels), 576))
    return TensorDataset(torch.tensor(features, dtype=torch.float32), torch.tensor(labels))


def head_accuracy(head: nn.Module, data: TensorDataset) -> float:
    features, labels = data.tensors
    with torch.no_grad():
        return (head.eval()(features).argmax(1) == labels).float().mean().item()


def test_head_training_on_cached_embeddings_learns_a_separable_set():
    torch.manual_seed(0)
    model = create_model(ARCH, 4)
    plan = plan_finetune(model, ARCH, section(reinit_head=True), "feature_extraction")
    train, val = separable_embeddings(8, seed=0), separable_embeddings(4, seed=1)
    backbone_before = {
        k: v.clone() for k, v in model.state_dict().items() if k.startswith("features")
    }
    before = head_accuracy(model.classifier, val)
    result = fit_head_on_embeddings(
        model,
        ARCH,
        plan.param_groups,
        train,
        val,
        FitOptions(epochs=10, seed=0, mix="cutmix"),
        batch_size=8,
        device=CPU,
    )
    assert head_accuracy(model.classifier, val) == 1.0 > before
    assert result.best_val_accuracy == 1.0
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in backbone_before.items())


def test_head_training_refuses_parameters_outside_the_head(model):
    groups = [{"params": list(model.features[0].parameters()), "lr": 1e-3, "name": "block_0"}]
    data = separable_embeddings(2, seed=0)
    with pytest.raises(ValueError, match="outside the head"):
        fit_head_on_embeddings(
            model, ARCH, groups, data, None, FitOptions(epochs=1), batch_size=4, device=CPU
        )


def write_colour_signs(root, per_class: dict[str, int]) -> pd.DataFrame:
    """Solid-colour 32 px images with a little noise: four trivially separable classes."""
    colours = {
        "red": (220, 30, 30),
        "green": (30, 200, 40),
        "blue": (30, 40, 220),
        "white": (240, 240, 240),
    }
    rng = np.random.default_rng(0)
    rows = []
    for split, count in per_class.items():
        for label, colour in colours.items():
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 12, (32, 32, 3)), 0, 255)
                path = f"{split}/{label}/{i}.png"
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(root / path)
                rows.append({"path": path, "label": label, "split": split})
    return pd.DataFrame(rows)


def test_embedding_cache_trains_the_model_head_from_image_files(tmp_path):
    manifest = write_colour_signs(tmp_path, {"train": 4, "val": 3})
    spec = ModelSpec(ARCH, ("blue", "green", "red", "white"), image_size=32)
    torch.manual_seed(0)
    model = create_model(ARCH, 4, small_input_stem=True)
    # A random backbone with its initial BN statistics (mean 0, var 1) outputs ~1e-9
    # everywhere; statistics of the data themselves (AdaBN) make its features usable.
    train_images = _images(manifest, tmp_path, spec, "train")
    reestimate_batchnorm(model, make_loader(train_images, 16, shuffle=False, seed=0), CPU)
    config = section(reinit_head=True, embedding_views=3, batch_size=8, lr=1e-2)
    plan = plan_finetune(model, ARCH, config, "feature_extraction")
    seen: list[int] = []
    result = fit_head_with_embedding_cache(
        model,
        spec,
        manifest,
        tmp_path,
        config,
        plan.param_groups,
        FitOptions(epochs=15, seed=0),
        device=CPU,
        on_epoch_end=lambda record, epoch: seen.append(epoch),
    )
    assert seen == list(range(1, 16))
    assert result.best_val_accuracy >= 0.75  # chance: 0.25
    val = make_loader(_images(manifest, tmp_path, spec, "val"), 16, shuffle=False, seed=0)
    logits = torch.cat([model.eval()(x) for x, _ in val])
    labels = torch.cat([y for _, y in val])
    # The full model (images in, backbone + the trained head) scores what the head scored.
    full_model = (logits.argmax(1) == labels).float().mean().item()
    assert full_model == pytest.approx(result.best_val_accuracy)


def _images(manifest: pd.DataFrame, root, spec: ModelSpec, split: str):
    from roadshift.data.batch_transforms import create_batch_transform
    from roadshift.data.dataset import ManifestDataset, split_frame

    transform = create_batch_transform(spec.image_size, spec.mean, spec.std)
    return ManifestDataset(split_frame(manifest, split), root, spec.class_names, transform)
