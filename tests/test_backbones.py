"""Every supported backbone: head sizing, block partition, small-input stems, weights paths.

Inputs are 32 px with batch 2 so the seven architectures stay cheap; forward passes run in
eval mode under no_grad. The weights-file paths are checked on resnet18 (mobilenet's are in
test_models.py), the only light model whose stem is a bare ``conv1`` rather than ``features``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import get_args

import pytest
import torch
import torchvision
from torch import nn

from roadshift.config import ModelSection
from roadshift.train.models import (
    WeightsError,
    backbone_blocks,
    create_model,
    head_parameters,
    resolve_small_input_stem,
    total_stride,
)

# every backbone params.yaml accepts
ARCHITECTURES = get_args(ModelSection.model_fields["architecture"].annotation)
SIZE = 32
RESNET = "resnet18"


def _forward(model: nn.Module, size: int = SIZE) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.zeros(2, 3, size, size))


def _last_feature_map_side(model: nn.Module, architecture: str, size: int = SIZE) -> int:
    """Spatial side of the last backbone block's output, i.e. what global pooling sees."""
    shapes: list[torch.Size] = []
    hook = backbone_blocks(model, architecture)[-1].register_forward_hook(
        lambda _module, _inputs, output: shapes.append(output.shape)
    )
    try:
        _forward(model, size)
    finally:
        hook.remove()
    height, width = shapes[-1][-2:]
    assert height == width
    return int(height)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("small_input_stem", [False, True], ids=["standard", "small"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_new_head_is_sized_from_the_label_set(architecture, small_input_stem):
    model = create_model(architecture, num_classes=5, small_input_stem=small_input_stem)
    assert _forward(model).shape == (2, 5)


@pytest.mark.parametrize("small_input_stem", [False, True], ids=["standard", "small"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_blocks_and_head_hold_every_parameter_exactly_once(architecture, small_input_stem):
    model = create_model(architecture, 4, small_input_stem=small_input_stem)
    grouped = [p for block in backbone_blocks(model, architecture) for p in block.parameters()]
    grouped += head_parameters(model, architecture)
    counts = Counter(id(p) for p in grouped)
    assert set(counts) == {id(p) for p in model.parameters()}
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_small_input_stem_keeps_every_parameter_name_and_shape(architecture):
    standard = create_model(architecture, 3)
    small = create_model(architecture, 3, small_input_stem=True)
    assert _shapes(small) == _shapes(standard)
    small.load_state_dict(standard.state_dict())  # strict: ImageNet weights fit as they are


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_small_input_stem_enlarges_the_last_feature_map(architecture):
    standard = _last_feature_map_side(create_model(architecture, 3), architecture)
    small = _last_feature_map_side(
        create_model(architecture, 3, small_input_stem=True), architecture
    )
    assert standard == SIZE // total_stride(architecture)
    assert small == SIZE // total_stride(architecture, small_input_stem=True)
    assert small > standard


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_auto_stem_is_small_for_32px_and_standard_for_224px(architecture):
    assert resolve_small_input_stem("auto", architecture, 32) is True
    assert resolve_small_input_stem("auto", architecture, 224) is False


@pytest.mark.parametrize("setting", [True, False])
def test_explicit_stem_setting_is_kept_whatever_the_image_size(setting):
    for size in (32, 224):
        assert resolve_small_input_stem(setting, RESNET, size) is setting


def test_auto_stem_switches_where_the_feature_map_reaches_2x2():
    assert resolve_small_input_stem("auto", RESNET, 63) is True
    assert resolve_small_input_stem("auto", RESNET, 64) is False


def test_unknown_stem_setting_names_the_key():
    with pytest.raises(ValueError, match=r"model\.small_input_stem.*'yes'"):
        resolve_small_input_stem("yes", RESNET, 32)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="resnet18"):
        total_stride("vgg16")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _resnet_weights():
    return torchvision.models.get_model_weights(RESNET).IMAGENET1K_V1


def _cache_path(weights) -> Path:
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / os.path.basename(weights.url)


def _assert_backbone_equal(model: nn.Module, reference: nn.Module) -> None:
    """Every tensor but the (resized) head came from the reference weights."""
    own = model.state_dict()
    backbone = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert backbone and all(torch.equal(own[k], v) for k, v in backbone.items())
    assert model.fc.out_features == 3


@pytest.mark.parametrize("small_input_stem", [False, True], ids=["standard", "small"])
def test_resnet_torchvision_weights_load_from_the_hub_cache(torch_home, small_input_stem):
    cached = _cache_path(_resnet_weights())
    cached.parent.mkdir(parents=True)
    reference = torchvision.models.get_model(RESNET, weights=None)
    torch.save(reference.state_dict(), cached)
    model = create_model(RESNET, 3, weights="IMAGENET1K_V1", small_input_stem=small_input_stem)
    _assert_backbone_equal(model, reference)


@pytest.mark.parametrize("small_input_stem", [False, True], ids=["standard", "small"])
def test_resnet_local_pt_file_initialises_the_backbone(tmp_path, small_input_stem):
    reference = torchvision.models.get_model(RESNET, weights=None)
    path = tmp_path / "donor.pt"
    torch.save(reference.state_dict(), path)
    model = create_model(RESNET, 3, weights=str(path), small_input_stem=small_input_stem)
    _assert_backbone_equal(model, reference)


def test_missing_resnet_weights_name_the_url_and_the_destination(torch_home):
    weights = _resnet_weights()
    message = rf"{re.escape(weights.url)}.*{re.escape(str(_cache_path(weights)))}"
    with pytest.raises(WeightsError, match=message):
        create_model(RESNET, 3, weights="IMAGENET1K_V1")
