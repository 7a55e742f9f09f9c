"""Backbones, heads, the safe model folder format and the initial-weights paths."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from roadshift.train.models import (
    ModelSpec,
    WeightsError,
    backbone_parameters,
    create_model,
    head_parameters,
    load_model_dir,
    save_model_dir,
)

ARCH = "mobilenet_v3_small"


@pytest.mark.parametrize("architecture", ["mobilenet_v3_small", "resnet18"])
def test_head_is_sized_from_the_label_set(architecture):
    model = create_model(architecture, num_classes=5)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_head_and_backbone_partition_the_parameters():
    model = create_model(ARCH, 4)
    head, backbone = head_parameters(model, ARCH), backbone_parameters(model, ARCH)
    assert {id(p) for p in head}.isdisjoint({id(p) for p in backbone})
    assert len(head) + len(backbone) == len(list(model.parameters()))


def test_model_folder_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    model = create_model(ARCH, 3).eval()
    spec = ModelSpec(ARCH, ("a", "b", "c"), image_size=32)
    save_model_dir(model, spec, tmp_path / "model")
    loaded, loaded_spec = load_model_dir(tmp_path / "model")
    batch = torch.randn(2, 3, 32, 32)
    assert loaded_spec == spec
    assert torch.equal(model(batch), loaded(batch))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "model.json",
        "weights.safetensors",
    ]


@pytest.mark.parametrize("architecture", [ARCH, "resnet18"])
def test_small_stem_model_folder_round_trip_gives_identical_predictions(tmp_path, architecture):
    torch.manual_seed(0)
    model = create_model(architecture, 3, small_input_stem=True).eval()
    spec = ModelSpec(architecture, ("a", "b", "c"), image_size=32, small_input_stem=True)
    save_model_dir(model, spec, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["small_input_stem"] is True
    loaded, loaded_spec = load_model_dir(tmp_path / "model")
    batch = torch.randn(2, 3, 32, 32)
    assert loaded_spec == spec
    with torch.no_grad():
        assert torch.equal(model(batch), loaded(batch))
        # The standard stem on the same weights is a different function, so the flag matters.
        standard = create_model(architecture, 3).eval()
        standard.load_state_dict(model.state_dict())
        assert not torch.equal(standard(batch), loaded(batch))


def test_model_json_without_the_stem_key_loads_as_the_standard_stem():
    raw = json.loads(ModelSpec(ARCH, ("a", "b"), image_size=32).to_json())
    del raw["small_input_stem"]
    assert ModelSpec.from_json(json.dumps(raw)).small_input_stem is False


def test_model_json_with_a_non_boolean_stem_is_refused():
    raw = json.loads(ModelSpec(ARCH, ("a", "b"), image_size=32).to_json())
    raw["small_input_stem"] = "false"
    with pytest.raises(ValueError, match="small_input_stem"):
        ModelSpec.from_json(json.dumps(raw))


def test_saving_over_an_existing_model_leaves_no_temporary_folder(tmp_path):
    spec = ModelSpec(ARCH, ("a", "b"), image_size=32)
    for _ in range(2):
        save_model_dir(create_model(ARCH, 2), spec, tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_local_state_dict_file_initialises_the_backbone_but_not_a_mismatched_head(tmp_path):
    donor = create_model(ARCH, 10)
    path = tmp_path / "donor.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    model = create_model(ARCH, 3, weights=str(path))
    first_conv = "features.0.0.weight"
    assert torch.equal(model.state_dict()[first_conv], donor.state_dict()[first_conv])
    assert model.classifier[-1].out_features == 3


def test_missing_local_weights_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match=r"does_not_exist\.pt"):
        create_model(ARCH, 3, weights=str(tmp_path / "does_not_exist.pt"))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_torchvision_weights_load_from_the_hub_cache_offline(torch_home):
    import torchvision

    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    reference = torchvision.models.mobilenet_v3_small(weights=None)
    torch.save(reference.state_dict(), cached)
    model = create_model(ARCH, 3, weights="IMAGENET1K_V1")
    first_conv = "features.0.0.weight"
    assert torch.equal(model.state_dict()[first_conv], reference.state_dict()[first_conv])


def test_missing_torchvision_weights_say_what_to_download_and_where(torch_home):
    with pytest.raises(WeightsError, match=r"Download https://.*mobilenet_v3_small.*place it at"):
        create_model(ARCH, 3, weights="IMAGENET1K_V1")


def test_unknown_weights_name_lists_the_available_ones():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        create_model(ARCH, 3, weights="IMAGENET_BEST")


def test_cached_weights_are_never_unpickled_as_objects(torch_home):
    import torchvision

    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.save({"payload": object()}, cached)
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported"):
        create_model(ARCH, 3, weights="IMAGENET1K_V1")
