"""Backbones by name, a head sized from the label set, and a safe on-disk format.

A trained model is a folder: ``weights.safetensors`` (tensors only, so loading
never unpickles code) and ``model.json`` (architecture, class names and the
preprocessing it was trained with), which is everything needed to rebuild and
call it without the training code's configuration.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from roadshift.errors import RoadshiftError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCHNORM_MOMENTUM = 0.1

# The module that holds the classification head, per backbone family.
_HEAD_MODULE = {
    "mobilenet_v3_small": "classifier",
    "mobilenet_v3_large": "classifier",
    "efficientnet_b0": "classifier",
    "convnext_tiny": "classifier",
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
}

# Total downsampling from the input to the last feature map: (standard stem, small-input stem).
# The small-input stem removes the stem's downsampling (ResNets: stride-2 conv and max-pool,
# 32 -> 8) or halves it (MobileNetV3/EfficientNet: first conv, ConvNeXt: patchify conv, 32 -> 16).
_TOTAL_STRIDE = {
    "mobilenet_v3_small": (32, 16),
    "mobilenet_v3_large": (32, 16),
    "efficientnet_b0": (32, 16),
    "convnext_tiny": (32, 16),
    "resnet18": (32, 8),
    "resnet34": (32, 8),
    "resnet50": (32, 8),
}
# "auto" picks the small stem when the last feature map would be smaller than this per side.
_MIN_FEATURE_MAP_SIDE = 2

# the public batch-norm layers (torch has no public base class for them)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class WeightsError(RoadshiftError, RuntimeError):
    """Initial weights that cannot be found or do not fit the backbone."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    class_names: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict[str, str] = field(default_factory=dict)
    small_input_stem: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        raw = json.loads(text)
        return cls(
            architecture=raw["architecture"],
            class_names=tuple(raw["class_names"]),
            image_size=int(raw["image_size"]),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            extra=dict(raw.get("extra", {})),
            small_input_stem=_json_bool(raw, "small_input_stem", default=False),
        )


def _json_bool(raw: dict, key: str, default: bool) -> bool:
    """A strict boolean from model.json: ``bool("false")`` would silently flip the stem."""
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"model.json: {key} must be true or false, got {value!r}")
    return value


def head_module_name(architecture: str) -> str:
    try:
        return _HEAD_MODULE[architecture]
    except KeyError:
        raise ValueError(
            f"model.architecture: unsupported backbone {architecture!r}; "
            f"choose one of {sorted(_HEAD_MODULE)}"
        ) from None


def total_stride(architecture: str, small_input_stem: bool = False) -> int:
    """How much the backbone shrinks the input before global pooling.

    ``image_size // total_stride(...)`` is the side of the last feature map, which is
    what decides whether an image is too small for the standard stem.
    """
    head_module_name(architecture)
    standard, small = _TOTAL_STRIDE[architecture]
    return small if small_input_stem else standard


def resolve_small_input_stem(setting: bool | str, architecture: str, image_size: int) -> bool:
    """Turn ``model.small_input_stem`` (true, false or "auto") into a decision for one model.

    "auto" keeps the ImageNet stem unless the last feature map would be under 2x2 (for
    example 32 px road signs through a stride-32 backbone end at 1x1), where pooling one
    position throws away all spatial layout.
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"model.small_input_stem: expected true, false or 'auto', got {setting!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return image_size // total_stride(architecture) < _MIN_FEATURE_MAP_SIDE


def apply_small_input_stem(model: nn.Module, architecture: str) -> nn.Module:
    """Reduce the stem's downsampling in place, keeping every parameter's name and shape.

    Only strides/padding change and parameter-free pooling is dropped, so ImageNet
    weights and saved state dicts still load into the modified model.
    """
    head_module_name(architecture)
    if architecture.startswith("resnet"):
        _stem_conv(model.conv1, architecture).stride = (1, 1)
        model.maxpool = nn.Identity()
    elif architecture.startswith("convnext"):
        # Patchify conv 4x4/4 -> 4x4/2; padding 1 makes it exactly halve even sizes.
        conv = _stem_conv(model.features[0][0], architecture)
        conv.stride, conv.padding = (2, 2), (1, 1)
    else:
        _stem_conv(model.features[0][0], architecture).stride = (1, 1)
    return model


def _stem_conv(module: nn.Module, architecture: str) -> nn.Conv2d:
    """The stem convolution, checked so a changed torchvision layout fails loudly."""
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"{architecture}: expected the stem to be nn.Conv2d, got {module!r}")
    return module


def _final_linear(module: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The last nn.Linear inside the head module, with its parent, to replace it."""
    parent, name, linear = None, "", None
    for parent_candidate in module.modules():
        for child_name, child in parent_candidate.named_children():
            if isinstance(child, nn.Linear):
                parent, name, linear = parent_candidate, child_name, child
    if linear is None or parent is None:
        raise ValueError("backbone head has no nn.Linear to resize")
    return parent, name, linear


def replace_head(model: nn.Module, architecture: str, num_classes: int) -> nn.Module:
    head_name = head_module_name(architecture)
    head = getattr(model, head_name)
    if isinstance(head, nn.Linear):
        setattr(model, head_name, nn.Linear(head.in_features, num_classes))
        return model
    parent, name, linear = _final_linear(head)
    setattr(parent, name, nn.Linear(linear.in_features, num_classes))
    return model


def head_parameters(model: nn.Module, architecture: str) -> list[nn.Parameter]:
    return list(getattr(model, head_module_name(architecture)).parameters())


def backbone_parameters(model: nn.Module, architecture: str) -> list[nn.Parameter]:
    head_ids = {id(p) for p in head_parameters(model, architecture)}
    return [p for p in model.parameters() if id(p) not in head_ids]


def backbone_blocks(model: nn.Module, architecture: str) -> list[nn.Module]:
    """The backbone as an ordered list of blocks, input side first.

    Layer-wise learning rates and (progressive) unfreezing work on these units:
    torchvision's ``features`` children for MobileNet/EfficientNet/ConvNeXt, and
    the stem plus ``layer1..4`` for ResNets. Together with the head they hold every
    parameter exactly once.
    """
    head_module_name(architecture)
    if architecture.startswith("resnet"):
        stem = nn.ModuleList([model.conv1, model.bn1])
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    return list(model.features.children())


def _torchvision_weights(architecture: str, name: str):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(architecture)
        return enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        available = ", ".join(w.name for w in torchvision.models.get_model_weights(architecture))
        raise WeightsError(
            f"model.weights: {name!r} is neither a file nor a weights name of {architecture} "
            f"(available: {available})"
        ) from None


def _cached_weights_path(weights) -> Path:
    hub_dir = Path(torch.hub.get_dir())
    return hub_dir / "checkpoints" / os.path.basename(weights.url)


def _build_with_torchvision_weights(architecture: str, weights_name: str) -> nn.Module:
    import torchvision

    weights = _torchvision_weights(architecture, weights_name)
    cached = _cached_weights_path(weights)
    if not cached.is_file():
        raise WeightsError(
            f"model.weights: {architecture} {weights.name} is not in the torch cache and this "
            f"machine may be offline. Download {weights.url} and place it at {cached} "
            f"(set TORCH_HOME to move the cache), or set model.weights to a local file or null."
        )
    state_dict = torch.load(cached, map_location="cpu", weights_only=True)
    model = torchvision.models.get_model(architecture, weights=None)
    model.load_state_dict(state_dict)
    return model


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def create_model(
    architecture: str,
    num_classes: int,
    weights: str | None = None,
    dropout: float = 0.2,
    *,
    small_input_stem: bool = False,
) -> nn.Module:
    """Build a torchvision backbone with a fresh ``num_classes`` head.

    ``weights`` is None, a torchvision weights enum name (loaded from the torch
    hub cache, never downloaded implicitly) or a local state-dict file whose
    head, if its size differs, is dropped. ``small_input_stem`` reduces the stem's
    downsampling for small images (see ``apply_small_input_stem``); the weights fit
    either way because no parameter changes name or shape.
    """
    import torchvision

    head_module_name(architecture)
    if weights and Path(weights).suffix in {".safetensors", ".pt", ".pth", ".bin"}:
        model = torchvision.models.get_model(architecture, weights=None)
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"model.weights: file {path} does not exist")
        state_dict = _load_state_dict_file(path)
        own = model.state_dict()
        fitting = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
        if not fitting:
            raise WeightsError(f"model.weights: {path} holds no tensors that fit {architecture}")
        model.load_state_dict(fitting, strict=False)
    elif weights:
        model = _build_with_torchvision_weights(architecture, weights)
    else:
        model = torchvision.models.get_model(architecture, weights=None)
    _set_dropout(model, dropout)
    _set_batchnorm_momentum(model, BATCHNORM_MOMENTUM)
    if small_input_stem:
        apply_small_input_stem(model, architecture)
    return replace_head(model, architecture, num_classes)


def _set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def _set_batchnorm_momentum(model: nn.Module, momentum: float) -> None:
    """torchvision's MobileNetV3/EfficientNet use momentum 0.01, tuned for 600 ImageNet epochs.

    On a few hundred steps the running statistics stay near their initial values
    and the model in eval mode predicts one class; 0.1 lets them converge.
    """
    for module in model.modules():
        if isinstance(module, BATCHNORM_TYPES):
            module.momentum = momentum


def save_model_dir(model: nn.Module, spec: ModelSpec, directory: Path) -> Path:
    """Write weights and spec atomically enough: a half-written folder is never left named."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "weights.safetensors"))
    (tmp / "model.json").write_text(spec.to_json() + "\n")
    if directory.exists():
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()
    tmp.rename(directory)
    return directory


def load_model_dir(
    directory: Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelSpec]:
    directory = Path(directory)
    spec_path = directory / "model.json"
    weights_path = directory / "weights.safetensors"
    for required in (spec_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required}: missing; is {directory} a roadshift model folder?"
            )
    spec = ModelSpec.from_json(spec_path.read_text())
    model = create_model(
        spec.architecture, spec.num_classes, small_input_stem=spec.small_input_stem
    )
    model.load_state_dict(load_file(str(weights_path), device="cpu"))
    return model.to(device).eval(), spec
