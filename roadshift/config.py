"""One typed configuration for the whole pipeline, loaded from params.yaml.

Every stage reads its own section; DVC lists the same keys under each stage's
``params`` so a change to one section re-runs only the stages that read it.
Unknown keys, wrong types and out-of-range values fail on load, before any work,
with the offending key spelled out (``finetune.lr``) and the file named.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from roadshift.errors import RoadshiftError

DOMAINS: tuple[str, str] = ("source", "target")
Domain = Literal["source", "target"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, str, str] = ("train", "val", "test")


class ConfigError(RoadshiftError, ValueError):
    """A params file that cannot be used, with every problem named by its key."""


class _Section(BaseModel):
    """Strict: ``true``/``yes``/``on`` are not 1 and ``1``/``0`` are not booleans, so a typo
    cannot become one epoch. Integers still count as floats (``lr: 1``), and a float written
    in e-notation, which YAML 1.1 reads as text (``lr: 1e-3``), is read as the number it is.
    Paths and lists keep their lax forms (YAML has no path or tuple type)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _e_notation_floats(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, str) and field is not None and field.annotation in _FLOAT_TYPES:
            try:
                return float(value)
            except ValueError:
                return value
        return value


_FLOAT_TYPES = (float, float | None)


class BaseSection(_Section):
    seed: int = Field(42, ge=0)
    image_size: int = Field(64, ge=16, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads; 0 = one per CPU this process may use",
    )
    deterministic: bool = True
    progress_bars: bool | Literal["auto"] = Field(
        "auto", description="rich progress bars while training; auto = when stderr is a terminal"
    )


class SynthSection(_Section):
    """The embedded synthetic US -> India road-sign dataset."""

    source_per_class: int = Field(220, ge=3, description="source images per class, all splits")
    target_train_per_class: int = Field(12, ge=1)
    target_val_per_class: int = Field(6, ge=1)
    target_test_per_class: int = Field(40, ge=1)
    target_unlabeled_per_class: int = Field(
        60,
        ge=0,
        description="unlabelled target images per class, drawn like the target train images and "
        "written without their class (the pool self-training learns from); 0 = an empty pool",
    )
    image_size: int = Field(64, ge=16, le=512)


UNLABELED_POOL = "target_unlabeled"
"""The unlabelled target images' name in manifests, reports, data versions and lineage tags."""


class DomainData(_Section):
    path: Path = Field(strict=False)
    description: str = ""


class TargetDomainData(DomainData):
    """The target domain, the one that can also have a pool of unlabelled images: target
    labels are what is scarce, and unlabelled target images are what self-training adapts to
    (the source is labelled by definition, so it has no such key)."""

    unlabeled_path: Path | None = Field(
        None,
        strict=False,
        description="folder of unlabelled target images, any depth, no labels (prepare scans "
        "it into data/prepared/target_unlabeled.csv); None = no pool",
    )


class DataSection(_Section):
    source: DomainData = DomainData(path=Path("data/raw/source"), description="US roads (MUTCD)")
    target: TargetDomainData = TargetDomainData(
        path=Path("data/raw/target"), description="Indian roads (IRC:67)"
    )

    def domain(self, name: str) -> DomainData:
        return getattr(self, name)


class SplitFractions(_Section):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


DEFAULT_MAX_IMAGE_FILE_BYTES = 50_000_000
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


class ImageLimitsSection(_Section):
    """What an image file may be before roadshift decodes it, wherever it does (prepare,
    ``data validate``, ``data add``, ``predict``, the served model): bounds on the bytes read
    and on the pixels the header declares, so a decompression bomb (a small file declaring a
    huge image) is refused before any pixel memory is allocated."""

    max_file_bytes: int = Field(
        DEFAULT_MAX_IMAGE_FILE_BYTES, ge=1, description="largest image file read, in bytes"
    )
    max_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="largest width x height an image may declare (50 MP: every camera "
        "photo; a 12000 x 12000 image is refused)",
    )


class PrepareSection(_Section):
    extensions: tuple[str, ...] = Field((".jpg", ".jpeg", ".png", ".bmp", ".webp"), strict=False)
    split_fractions: SplitFractions = SplitFractions()
    image_limits: ImageLimitsSection = ImageLimitsSection()


class FractionRange(_Section):
    min: float = Field(0.0, ge=0, le=1)
    max: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> FractionRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min:g}) must not exceed max ({self.max:g})")
        return self


class SplitFractionBounds(_Section):
    """Share of a domain's images each split may hold; catches a test set that went missing
    or swallowed the training data.

    One set of bounds for both domains, wide enough for a few-label target (10 labelled train
    images a class beside a test split of 80-95 % of its images), still failing a split that is
    empty or holds all but a sliver of the images. An empty train or test split also fails
    ``require_splits``, and too few train images per class ``min_images_per_class``."""

    train: FractionRange = FractionRange(min=0.01, max=0.98)
    val: FractionRange = FractionRange(min=0.0, max=0.5)
    test: FractionRange = FractionRange(min=0.02, max=0.97)


class ValidateSection(_Section):
    min_images_per_class: int = Field(3, ge=1)
    max_imbalance_ratio: float = Field(20.0, ge=1.0, description="largest / smallest class count")
    min_image_side: int = Field(16, ge=1)
    max_image_side: int = Field(8192, ge=1)
    require_splits: tuple[Split, ...] = Field(("train", "test"), strict=False)
    split_fractions: SplitFractionBounds = SplitFractionBounds()


class ModelSection(_Section):
    architecture: Literal[
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "resnet18",
        "resnet34",
        "resnet50",
        "efficientnet_b0",
        "convnext_tiny",
    ] = "mobilenet_v3_small"
    weights: str | None = Field(
        None,
        description="None (random init), a torchvision weights enum name such as "
        "IMAGENET1K_V1, or a path to a local state-dict (.safetensors/.pt)",
    )
    dropout: float = Field(0.2, ge=0, lt=1)
    small_input_stem: bool | Literal["auto"] = Field(
        "auto",
        description="halve the stem's stride so small images keep spatial detail; "
        "auto = when the last feature map would be smaller than 2x2",
    )


class AugmentSection(_Section):
    enabled: bool = True
    scale_min: float = Field(0.7, gt=0, le=1)
    rotate_limit: int = Field(12, ge=0, le=180)
    brightness_contrast: float = Field(0.25, ge=0, le=1)
    hue_saturation: int = Field(10, ge=0, le=180)
    blur_probability: float = Field(0.2, ge=0, le=1)
    noise_probability: float = Field(0.2, ge=0, le=1)
    # Widening: changes a source domain never shows but a target may (a new colour scheme,
    # a textured background). Off by default; pretrain turns them on in params.yaml.
    tint_probability: float = Field(
        0.0, ge=0, le=1, description="share of images whose channels get random gains/offsets"
    )
    invert_probability: float = Field(0.0, ge=0, le=1, description="share of images inverted")
    grayscale_probability: float = Field(0.0, ge=0, le=1, description="share made grayscale")
    texture_blend_probability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of images difference-blended with a random smooth colour texture",
    )


class StrongAugmentSection(AugmentSection):
    """The strong view of self-training: the train augmentations at wider ranges, plus colour
    inversion, grayscale and cutout. The model must give it the class its weak view was
    pseudo-labelled with, which teaches invariance to changes the source data never showed
    (a new colour scheme, lighting, occlusion) -- the shift self-training has to bridge."""

    scale_min: float = Field(0.5, gt=0, le=1)
    rotate_limit: int = Field(20, ge=0, le=180)
    brightness_contrast: float = Field(0.5, ge=0, le=1)
    hue_saturation: int = Field(45, ge=0, le=180)
    blur_probability: float = Field(0.3, ge=0, le=1)
    noise_probability: float = Field(0.3, ge=0, le=1)
    invert_probability: float = Field(0.2, ge=0, le=1, description="share of images inverted")
    grayscale_probability: float = Field(0.2, ge=0, le=1, description="share made grayscale")
    cutout_fraction: float = Field(
        0.5, ge=0, lt=1, description="erase a grey square of up to this share of the side"
    )


class TrainSection(_Section):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip_norm: float | None = Field(None, gt=0)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes; auto: several on a GPU machine, none on a "
        "small CPU-only one, where workers would steal cores from the training threads",
    )
    schedule: Literal["one_cycle", "cosine", "constant"] = "one_cycle"
    warmup_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of the steps spent warming the lr up"
    )
    lr_finder: bool = Field(
        False, description="run a learning-rate range test first and train at its suggestion"
    )
    mix: Literal["none", "mixup", "cutmix"] = "none"
    mix_alpha: float = Field(0.4, gt=0, description="Beta(alpha, alpha) of mixup/cutmix")
    mix_probability: float = Field(0.5, ge=0, le=1, description="share of batches mixed")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val score"
    )
    checkpoint: bool = Field(
        True, description="checkpoint at epoch ends and resume from it after a crash"
    )
    checkpoint_every_seconds: float = Field(
        10.0,
        ge=0,
        description="save at the first epoch end this long after the last save (0 = every "
        "epoch): a crash loses at most this much training plus one epoch",
    )
    augment: AugmentSection = AugmentSection()


class PretrainSection(TrainSection):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, le=10)


class AutoStrategySection(_Section):
    """How ``strategy: auto`` chooses: both strategies are cross-validated on the target train
    split and the better mean held-out macro-F1 wins (``roadshift.transfer.selection``).
    Thresholds on data size and domain distance, tuned on synthetic data, picked the worse
    strategy by 16 points on a real pair; the target's own labels are the evidence that
    transfers. The proxy A-distance is still measured, for information."""

    folds: int = Field(
        3,
        ge=2,
        le=20,
        description="k of the stratified k-fold over the target train split; at most the "
        "image count of the smallest class that has two or more",
    )
    epochs_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="each fold trains for this share of finetune.epochs (rounded up): a "
        "shortened schedule that ranks the strategies at a fraction of the cost; at 0.25 "
        "the folds under-trained fine-tuning and ranked it below feature extraction on the "
        "embedded data, where its full schedule wins by 11 points",
    )
    sample_size: int = Field(
        400, ge=10, description="images per domain embedded to measure the distance"
    )


class SelfTrainingSection(_Section):
    """Semi-supervised adaptation on unlabelled target images after fine-tuning (AdaBN, then
    FixMatch/AdaMatch-style pseudo-labelling; ``roadshift.transfer.self_training``)."""

    enabled: bool | Literal["auto"] = Field(
        "auto",
        description="auto: with unlabelled target images, when the backbone trains (strategy "
        "fine_tune); true: also on the target train images alone",
    )
    epochs: int = Field(60, ge=1, description="passes over the larger of labelled/unlabelled")
    lr: float = Field(3e-3, gt=0, le=10, description="peak lr of every trainable parameter")
    confidence_threshold: float = Field(
        0.9, gt=0, le=1, description="pseudo-labels only above this confidence"
    )
    relative_threshold: bool = Field(
        True,
        description="AdaMatch: threshold = confidence_threshold x the mean confidence on "
        "the labelled batch, so it follows how sure the model is on data it knows",
    )
    unlabeled_weight: float = Field(1.0, ge=0, description="weight of the pseudo-label loss")
    unlabeled_batch_ratio: int = Field(
        3, ge=1, description="mu: unlabelled images per labelled image in a step"
    )
    ema_decay: float | None = Field(
        None, ge=0, lt=1, description="pseudo-labels from an EMA teacher; null = the student"
    )
    distribution_alignment: bool = Field(
        True,
        description="scale the predicted class distribution on unlabelled images towards the "
        "labelled one before thresholding (AdaMatch)",
    )
    strong_augment: StrongAugmentSection = StrongAugmentSection()


class FinetuneSection(TrainSection):
    strategy: Literal["auto", "feature_extraction", "fine_tune"] = "fine_tune"
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, le=10)
    backbone_lr_factor: float = Field(
        0.1, gt=0, le=1, description="lr of the backbone's last block = lr * factor (fine_tune)"
    )
    layer_lr_decay: float = Field(
        1.0, gt=0, le=1, description="each earlier backbone block trains at this times the next"
    )
    unfreeze_blocks: int | Literal["all"] = Field(
        "all", description="fine_tune: how many of the backbone's last blocks train"
    )
    progressive_unfreeze_epochs: int = Field(
        0, ge=0, description="fine_tune: unfreeze one more block every N epochs (0 = all at once)"
    )
    batchnorm: Literal["adapt", "frozen", "reestimate"] = Field(
        "adapt",
        description="adapt: trainable blocks update BN statistics on target batches; frozen: "
        "keep the source statistics; reestimate: recompute them on the target train split first",
    )
    reinit_head: bool = Field(
        False, description="start from a new head instead of the source model's"
    )
    embedding_cache: bool = Field(
        True, description="feature_extraction: embed the train split once, then train the head"
    )
    embedding_views: int = Field(
        4, ge=1, description="embedding cache: views per train image (1 = unaugmented only)"
    )
    auto: AutoStrategySection = AutoStrategySection()
    self_training: SelfTrainingSection = SelfTrainingSection()

    @model_validator(mode="after")
    def _unfreeze_blocks_positive(self) -> FinetuneSection:
        if isinstance(self.unfreeze_blocks, int) and self.unfreeze_blocks < 0:
            raise ValueError("unfreeze_blocks must be 'all' or a number >= 0")
        return self


class EvaluateSection(_Section):
    batch_size: int = Field(128, ge=1)
    scratch_baseline: bool = Field(
        True, description="train the scratch-on-target baseline (scratch stage) and report it"
    )
    bootstrap_samples: int = Field(
        1000, ge=0, description="bootstrap resamples of the test split for confidence intervals"
    )
    confidence_level: float = Field(0.95, gt=0, lt=1)
    calibration_bins: int = Field(15, ge=2, description="bins of the ECE / reliability diagram")
    worst_mistakes: int = Field(16, ge=0, description="most confident errors shown in the report")


class RegisterSection(_Section):
    model_name: str = Field("roadshift-road-signs", min_length=1)
    min_macro_f1: float = Field(0.0, ge=0, le=1, description="absolute floor to become champion")
    min_improvement: float = Field(
        0.0, ge=0, le=1, description="macro-F1 margin over the current champion"
    )
    max_class_recall_drop: float = Field(
        0.1,
        ge=0,
        le=1,
        description="no class's target recall may fall by more than this against the champion",
    )
    require_beats_baselines: bool = Field(
        True,
        description="the challenger's target macro-F1 must exceed its own run's source-only "
        "baseline and, when trained, its scratch baseline",
    )
    max_source_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="largest allowed fall in source test accuracy from the source-only model "
        "to the fine-tuned one (forgetting the source); None = off",
    )


class RetrainSection(_Section):
    """The scheduled retraining deployment (``roadshift serve-schedule``, prefect.yaml)."""

    cron: str = Field("0 3 * * 1", description="when to check for new data (default Mon 03:00)")
    timezone: str = Field("UTC", min_length=1)
    deployment: str = Field("scheduled-retraining", min_length=1)
    notify_webhook_block: str | None = Field(
        None, description="name of a Prefect Webhook block called on promotion and on failure"
    )

    @model_validator(mode="after")
    def _five_field_cron(self) -> RetrainSection:
        if len(self.cron.split()) not in (5, 6):
            raise ValueError(f"cron {self.cron!r}: expected 5 fields, e.g. '0 3 * * 1'")
        return self


class MonitorSection(_Section):
    """Shift of production inputs (``roadshift predict --keep-unlabelled`` or ``--shift``): a
    batch whose figures pass a limit here is flagged shifted, notified and listed for labelling."""

    max_domain_distance: float | None = Field(
        1.0,
        ge=0,
        le=2,
        description="largest proxy A-distance (0..2) between the batch and the target train "
        "images, on the champion's embeddings; None = not checked",
    )
    max_confidence_drop: float | None = Field(
        0.15,
        ge=0,
        le=1,
        description="largest fall of the mean top probability from the target test split to "
        "the batch; None = not checked",
    )
    max_confidence_ks: float | None = Field(
        None,
        ge=0,
        le=1,
        description="largest Kolmogorov-Smirnov statistic between the two confidence "
        "distributions; None = reported, not checked",
    )
    min_batch_size: int = Field(
        8, ge=2, description="fewer images than this: figures reported, never flagged (noise)"
    )
    reference_sample_size: int = Field(
        400, ge=2, description="at most this many target train/test images as the reference"
    )


class SuggestSection(_Section):
    """``roadshift label suggest``: which unlabelled images are most worth labelling next."""

    uncertainty: Literal["margin", "entropy"] = Field(
        "margin", description="margin: 1 - (top1 - top2); entropy: normalised predictive entropy"
    )
    uncertainty_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="0: pure diversity (k-center greedy), 1: pure uncertainty; between: "
        "distance x (weight x uncertainty + 1 - weight)",
    )
    near_duplicate_cosine: float = Field(
        0.02,
        ge=0,
        le=1,
        description="an image this close (cosine distance of embeddings) to a labelled one is a "
        "near-duplicate, never suggested",
    )
    near_duplicate_hash_bits: int = Field(
        4,
        ge=0,
        le=64,
        description="or its 64-bit difference hash differs from a labelled one's in at most "
        "this many bits",
    )


class TrackingSection(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; env MLFLOW_TRACKING_URI wins; default: local SQLite"
    )
    experiment: str = Field("roadshift", min_length=1)
    request_retries: int = Field(
        3, ge=0, le=20, description="retries of a failed call to a tracking server, then give up"
    )
    request_backoff_seconds: int = Field(
        1, ge=0, le=60, description="first wait between retries; doubles on each retry"
    )
    request_timeout_seconds: int = Field(
        30, gt=0, le=600, description="one request's time limit against a tracking server"
    )


# Section names follow dvc.yaml's stages; two of them ("validate", "register") shadow
# deprecated BaseModel classmethods, which pydantic warns about and which we never use.
warnings.filterwarnings("ignore", message='Field name "(validate|register)"', category=UserWarning)


class Params(_Section):
    base: BaseSection = BaseSection()
    synth: SynthSection = SynthSection()
    data: DataSection = DataSection()
    prepare: PrepareSection = PrepareSection()
    validate: ValidateSection = ValidateSection()
    model: ModelSection = ModelSection()
    pretrain: PretrainSection = PretrainSection()
    finetune: FinetuneSection = FinetuneSection()
    evaluate: EvaluateSection = EvaluateSection()
    register: RegisterSection = RegisterSection()
    retrain: RetrainSection = RetrainSection()
    monitor: MonitorSection = MonitorSection()
    suggest: SuggestSection = SuggestSection()
    tracking: TrackingSection = TrackingSection()


def _setting_key(loc: tuple) -> str:
    """The dotted key, without the union-member tags pydantic appends (``int``,
    ``literal['auto']``, ``constrained-int``) when a value fits none of a union's types."""
    parts = [str(part) for part in loc if not _is_union_tag(str(part))]
    return ".".join(parts) or "<root>"


def _is_union_tag(part: str) -> bool:
    return part in {"int", "float", "bool", "str"} or "[" in part or "-" in part


def _format_errors(source: str, error: ValidationError) -> str:
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        key = _setting_key(item["loc"])
        if item["type"] == "extra_forbidden":
            problems.setdefault(key, []).append(
                "unknown key (not a roadshift setting; check the spelling)"
            )
            continue
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        problems.setdefault(key, []).append(f"{item['msg']}{shown}")
    lines = [f"{source}: invalid configuration"]
    lines += [f"  {key}: {'; or: '.join(messages)}" for key, messages in problems.items()]
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML scalars."""
    merged: dict[str, Any] = _deep_copy(raw)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. finetune.lr=0.01")
        dotted, value = override.split("=", 1)
        node = merged
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return merged


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict) or not raw:
        found = "nothing (an empty file)" if raw is None or raw == {} else type(raw).__name__
        raise ConfigError(
            f"{path}: expected a mapping of sections (base:, data:, prepare:, ...) at the top "
            f"level, found {found}; restore it from git (`git checkout -- {path.name}`)"
        )
    return parse_params(apply_overrides(raw, overrides or []), source=str(path))


def params_to_dict(params: Params) -> dict[str, Any]:
    return params.model_dump(mode="json")
