"""The MLflow model registry: a self-contained pyfunc model, its model card, and registration.

A registered version is a pyfunc whose artifact is the roadshift model folder
and whose code is this package, so ``models:/<name>@champion`` loads and predicts
from raw RGB images anywhere, with the same resize and normalisation as
evaluation used (``create_eval_transform``): no train/serve skew.

Registration logs the model, registers it as a new version (``challenger``), writes a
model card beside it, and hands the champion decision to ``roadshift.registry.promotion``: gates
against the champion as re-read under the promotion lock.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from roadshift.config import RegisterSection
from roadshift.registry.lineage import directory_digest, sha256_file
from roadshift.registry.promotion import (
    CHALLENGER,
    CHAMPION,
    CHAMPION_GATE_METRIC,
    DECISION_TAG,
    DEFAULT_LOCK_TIMEOUT_S,
    GATE_METRIC,
    LOW_RECALL,
    METRIC_TAG_PREFIX,
    PREVIOUS_CHAMPION,
    REASON_TAG,
    EvaluationSet,
    GateResult,
    PromotionDecision,
    PromotionOutcome,
    Scores,
    VersionScorer,
    champion_version,
    current_user,
    decide_promotion,
    promote_under_lock,
    promotion_lock,
    recall_tags,
    registered_model,
    scores_from_metrics,
)
from roadshift.train.models import ModelSpec

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "CHAMPION_GATE_METRIC",
    "GATE_METRIC",
    "PREVIOUS_CHAMPION",
    "DataSummary",
    "PromotionDecision",
    "RegistrationResult",
    "RoadSignClassifier",
    "champion_version",
    "decide_promotion",
    "load_champion",
    "log_pyfunc_model",
    "register_model_dir",
    "render_model_card",
]

WEIGHTS_TAG = "weights.sha256"
MODEL_DIR_TAG = "model_dir.sha256"
MODEL_CARD_TAG = "model_card.uri"
IMAGE_COLUMN = "image"
LOGGED_MODEL_NAME = "model"
_PREDICT_BATCH = 256

# What the pyfunc imports when it loads and predicts (roadshift itself travels as code).
_SERVING_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "albumentations",
    "opencv-python-headless",
    "pydantic",
    "pyyaml",
)


# --------------------------------------------------------------------------- pyfunc


class RoadSignClassifier(mlflow.pyfunc.PythonModel):
    """Raw RGB images in, a label and one probability per class out.

    Accepts a uint8 array ``(N, H, W, 3)`` (or one ``(H, W, 3)`` image) of any
    size, or a DataFrame whose ``image`` column holds encoded PNG/JPEG bytes
    (or their base64 text, as JSON serving sends them).
    """

    def load_context(self, context) -> None:
        # albumentations asks the network for updates on import unless told not to.
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from roadshift.data.transforms import create_eval_transform
        from roadshift.train.models import load_model_dir

        self.model, self.spec = load_model_dir(Path(context.artifacts["model_dir"]))
        self.transform = create_eval_transform(self.spec.image_size, self.spec.mean, self.spec.std)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = images_from_input(model_input)
        chunks = [
            self._probabilities(images[start : start + _PREDICT_BATCH])
            for start in range(0, len(images), _PREDICT_BATCH)
        ]
        probabilities = np.concatenate(chunks) if chunks else np.zeros((0, self.spec.num_classes))
        return predictions_frame(probabilities, self.spec.class_names)

    def _probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        batch = torch.stack([self.transform(image=image)["image"] for image in images])
        with torch.inference_mode():
            # channels_last: the CPU convolutions of these backbones run ~1.4x faster on it,
            # with identical outputs (what the bare-model benchmark compares against)
            batch = batch.contiguous(memory_format=torch.channels_last)
            return torch.softmax(self.model(batch), dim=1).numpy()


def images_from_input(model_input: Any) -> list[np.ndarray]:
    """HxWx3 uint8 images from an array batch or a DataFrame of encoded images."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(
                f"expected a DataFrame with an {IMAGE_COLUMN!r} column of PNG/JPEG bytes, "
                f"got columns {list(model_input.columns)}"
            )
        return [_decode_image(cell, row) for row, cell in enumerate(model_input[IMAGE_COLUMN])]
    if isinstance(model_input, np.ndarray):
        return list(_as_uint8_batch(model_input))
    raise TypeError(
        "expected a uint8 array (N, H, W, 3) of RGB images or a DataFrame with an "
        f"{IMAGE_COLUMN!r} column of encoded images, got {type(model_input).__name__}"
    )


def _as_uint8_batch(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        array = array[np.newaxis]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected RGB images shaped (N, H, W, 3), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    # JSON serving turns pixel values into int64; accept them if they are pixel values.
    if (
        np.issubdtype(array.dtype, np.integer)
        and array.size
        and 0 <= array.min() <= array.max() <= 255
    ):
        return array.astype(np.uint8)
    raise ValueError(
        "expected raw uint8 pixel values 0..255 (the model normalises itself), "
        f"got dtype {array.dtype}"
    )


def _decode_image(cell: Any, row: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if isinstance(cell, str):
        try:
            cell = base64.b64decode(cell, validate=True)
        except binascii.Error:
            raise ValueError(
                f"row {row}: {IMAGE_COLUMN} text is not base64-encoded image bytes"
            ) from None
    if not isinstance(cell, bytes | bytearray | memoryview):
        raise ValueError(f"row {row}: expected encoded image bytes, got {type(cell).__name__}")
    from roadshift.data.images import to_rgb

    try:
        with Image.open(io.BytesIO(bytes(cell))) as image:
            return np.asarray(to_rgb(image))  # the training loader's rule: no train/serve skew
    except UnidentifiedImageError:
        raise ValueError(f"row {row}: bytes are not an image Pillow can decode") from None
    except ValueError as error:
        raise ValueError(f"row {row}: {error}") from None


def probability_column(class_name: str) -> str:
    return f"prob_{class_name}"


def predictions_frame(probabilities: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    frame = pd.DataFrame(
        probabilities.astype(np.float64), columns=[probability_column(c) for c in class_names]
    )
    labels = [class_names[i] for i in probabilities.argmax(axis=1)] if len(probabilities) else []
    frame.insert(0, "label", pd.Series(labels, dtype=object))
    return frame


def model_signature(spec: ModelSpec) -> ModelSignature:
    """Outputs only.

    MLflow enforces an input schema before ``predict`` and a schema describes one input
    form; this model takes two (an array, or a DataFrame of bytes) and checks them itself.
    """
    outputs = Schema(
        [ColSpec("string", "label")]
        + [ColSpec("double", probability_column(c)) for c in spec.class_names]
    )
    return ModelSignature(outputs=outputs)


def serving_requirements() -> list[str]:
    """Pinned from this environment; cheaper and more exact than MLflow's inference."""
    pins = []
    for distribution in _SERVING_DISTRIBUTIONS:
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{distribution}=={version.split('+')[0]}")
    return pins


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def read_model_spec(model_dir: Path) -> ModelSpec:
    spec_path = Path(model_dir) / "model.json"
    weights_path = Path(model_dir) / "weights.safetensors"
    for required in (spec_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required}: missing; is {model_dir} a roadshift model folder?"
            )
    return ModelSpec.from_json(spec_path.read_text())


def log_pyfunc_model(
    model_dir: Path, name: str = LOGGED_MODEL_NAME
) -> mlflow.models.model.ModelInfo:
    """Log the model folder as a pyfunc to the active run."""
    spec = read_model_spec(model_dir)
    example = np.zeros((1, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=RoadSignClassifier(),
        artifacts={"model_dir": str(Path(model_dir).resolve())},
        code_paths=[str(_package_dir())],
        signature=model_signature(spec),
        input_example=example,
        pip_requirements=serving_requirements(),
    )


# --------------------------------------------------------------------------- model card


@dataclass(frozen=True)
class DataSummary:
    """What the model card says about one domain's data, read from its validated manifest."""

    domain: str
    description: str
    path: str
    version: str  # the DVC md5 of the domain's folder
    images_per_split: dict[str, int]
    classes: tuple[str, ...]
    synthetic: bool = False  # the embedded generated set, judged by its file names


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _data_section(data: Sequence[DataSummary]) -> list[str]:
    if not data:
        return ["No manifests were available when this version was registered."]
    known = ("train", "val", "test")
    present = {s for d in data for s in d.images_per_split}
    splits = [s for s in known if s in present] + sorted(present - set(known))
    lines = [
        "| domain | description | data version (DVC md5) | "
        + " | ".join(f"{s} images" for s in splits)
        + " | classes |",
        "|---|---|---|" + "---|" * len(splits) + "---|",
    ]
    for d in data:
        counts = " | ".join(str(d.images_per_split.get(s, 0)) for s in splits)
        lines.append(
            f"| {d.domain} | {d.description} | `{d.version}` | {counts} | {len(d.classes)} |"
        )
    lines.append("")
    lines.append(f"Classes: {', '.join(data[0].classes)}.")
    return lines


def _per_class_section(per_class: Mapping[str, Mapping[str, float]]) -> list[str]:
    lines = ["| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for name, row in sorted(per_class.items()):
        lines.append(
            f"| {name} | {row.get('precision', float('nan')):.3f} | "
            f"{row.get('recall', float('nan')):.3f} | {row.get('f1', float('nan')):.3f} | "
            f"{int(row.get('support', 0))} |"
        )
    return lines


def _limits(
    metrics: Mapping[str, float],
    per_class: Mapping[str, Mapping[str, float]],
    data: Sequence[DataSummary],
) -> list[str]:
    limits = []
    synthetic = [d.domain for d in data if d.synthetic]
    if synthetic:
        limits.append(
            f"- **Synthetic data** ({', '.join(synthetic)}): the images are generated "
            "(`roadshift data synth`); the figures measure the synthetic task and say nothing "
            "about photographs of real roads."
        )
    if "domain_gap_accuracy" in metrics:
        limits.append(
            "- **Domain gap**: the source-only model loses "
            f"{metrics['domain_gap_accuracy']:.3f} accuracy from the source to the target test "
            f"split; this model's target accuracy is {_fmt(metrics.get('target_accuracy', '?'))}. "
            "Signs, scenes or cameras unlike the target data will widen the gap again."
        )
    low = sorted(
        (row["recall"], name)
        for name, row in per_class.items()
        if row.get("recall", 1) < LOW_RECALL
    )
    if low:
        limits.append(
            f"- **Classes with low recall** (below {LOW_RECALL}): "
            + ", ".join(f"{name} {recall:.2f}" for recall, name in low)
            + ". Expect these signs to be missed often."
        )
    elif per_class:
        limits.append(f"- No class's recall is below {LOW_RECALL} on the target test split.")
    supports = [int(row.get("support", 0)) for row in per_class.values()]
    if supports and min(supports) < 30:
        limits.append(
            f"- **Small test split**: as few as {min(supports)} test images per class; one image "
            f"moves that class's recall by {1 / max(min(supports), 1):.2f}."
        )
    target = next((d for d in data if d.domain == "target"), None)
    if target is not None and target.classes:
        per_class_train = target.images_per_split.get("train", 0) / len(target.classes)
        limits.append(
            f"- **Few target labels**: about {per_class_train:.0f} target training images per "
            "class."
        )
    return limits or ["- None recorded."]


def render_model_card(
    name: str,
    version: str,
    metrics: Mapping[str, float],
    per_class: Mapping[str, Mapping[str, float]] | None,
    tags: Mapping[str, str],
    data: Sequence[DataSummary],
    cfg: RegisterSection,
    decision: PromotionDecision | None = None,
    class_names: Sequence[str] = (),
) -> str:
    """The model card as Markdown: what the model is for, what it was made from, how well it
    does and where it fails. Pure, so it is tested without a registry."""
    per_class = per_class or {}
    classes = list(class_names) or (list(data[0].classes) if data else sorted(per_class))
    target = next((d for d in data if d.domain == "target"), None)
    where = target.description if target else "the target domain"
    lines = [
        f"# Model card: {name} version {version}",
        "",
        "## Intended use",
        "",
        f"Classify one cropped road-sign image from {where} into one of {len(classes)} classes "
        f"({', '.join(classes)}). Input: raw RGB uint8 images shaped (N, H, W, 3), any size, "
        "or PNG/JPEG bytes in an `image` column; the model resizes and normalises them itself. "
        "Output: a `label` and one `prob_<class>` column per class.",
        "",
        "Not for: finding signs in whole scenes (it expects a crop), signs outside these "
        "classes (it will still name one of them), or any safety-critical decision.",
        "",
        "## Data",
        "",
        *_data_section(data),
        "",
        "## Metrics (target test split)",
        "",
        f"Gate metric `{GATE_METRIC}`: **{_fmt(metrics.get(GATE_METRIC, 'missing'))}**. "
        f"Promotion gates: floor `register.min_macro_f1={cfg.min_macro_f1}`, margin over the "
        f"champion `register.min_improvement={cfg.min_improvement}`, no class's recall falling "
        f"by more than `register.max_class_recall_drop={cfg.max_class_recall_drop}`.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {_fmt(float(value))} |" for key, value in sorted(metrics.items())),
        "",
    ]
    if per_class:
        lines += [*_per_class_section(per_class), ""]
    if decision is not None:
        lines += [
            "## Promotion at registration",
            "",
            f"**{decision.label}**",
            "",
            *(f"- {gate.name}: {gate.status}: {gate.reason}" for gate in decision.gates),
            "",
            "Later decisions (`roadshift promote`, `roadshift rollback`) are tags on the version.",
            "",
        ]
    lines += ["## Limits", "", *_limits(metrics, per_class, data), "", "## Lineage", ""]
    lines += ["| tag | value |", "|---|---|"]
    lines += [f"| {key} | `{value}` |" for key, value in sorted(tags.items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: str
    aliases: tuple[str, ...]
    decision: str  # "promoted" | "refused"
    reason: str
    already_registered: bool
    weights_sha256: str
    model_uri: str
    champion_before: str | None = None  # the champion decided against
    champion_scores: Scores | None = None  # its scores the gates used, and their source
    challenger_scores: Scores | None = None
    gates: tuple[GateResult, ...] = ()
    model_card_uri: str | None = None
    lock: str = ""
    registry_aliases: dict[str, str] = field(default_factory=dict)  # every alias, afterwards

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def load_champion(name: str) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def version_with_weights(
    client: MlflowClient, name: str, weights_sha256: str
) -> ModelVersion | None:
    """The oldest version of ``name`` registered from exactly these weights, if any."""
    if registered_model(client, name) is None:
        return None
    versions = client.search_model_versions(
        f"name = {_quoted(name)} AND tags.`{WEIGHTS_TAG}` = {_quoted(weights_sha256)}"
    )
    matching = [v for v in versions if v.tags.get(WEIGHTS_TAG) == weights_sha256]
    return min(matching, key=lambda v: int(v.version), default=None)


def _version_tags(
    metrics: Mapping[str, float],
    per_class: Mapping[str, Mapping[str, float]] | None,
    tags: Mapping[str, str],
    weights_sha256: str,
    model_dir: Path,
) -> dict[str, str]:
    return {
        **{key: str(value) for key, value in tags.items()},
        **{METRIC_TAG_PREFIX + key: repr(float(value)) for key, value in metrics.items()},
        **recall_tags(per_class),
        WEIGHTS_TAG: weights_sha256,
        MODEL_DIR_TAG: directory_digest(model_dir),
    }


def _already_registered(
    client: MlflowClient, existing: ModelVersion, weights_sha256: str
) -> RegistrationResult:
    current = client.get_model_version(existing.name, existing.version)
    decision = current.tags.get(DECISION_TAG, "unknown")
    return RegistrationResult(
        name=current.name,
        version=str(current.version),
        aliases=tuple(sorted(current.aliases)),
        decision=decision,
        reason=f"weights already registered as version {current.version}; nothing registered "
        f"(its promotion then: {decision}: {current.tags.get(REASON_TAG, 'no reason recorded')})",
        already_registered=True,
        weights_sha256=weights_sha256,
        model_uri=f"models:/{current.name}/{current.version}",
        model_card_uri=current.tags.get(MODEL_CARD_TAG),
    )


def _log_model_card(client: MlflowClient, name: str, version: str, card: str) -> str:
    """Log the card to the active run (the run the model was logged with); tag its location."""
    run_id = mlflow.active_run().info.run_id
    artifact_file = f"model_card/{name}/v{version}/model_card.md"
    mlflow.log_text(card, artifact_file)
    uri = f"runs:/{run_id}/{artifact_file}"
    client.set_model_version_tag(name, version, MODEL_CARD_TAG, uri)
    return uri


def register_model_dir(
    model_dir: Path,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    cfg: RegisterSection,
    *,
    per_class: Mapping[str, Mapping[str, float]] | None = None,
    evaluation: EvaluationSet | None = None,
    data: Sequence[DataSummary] = (),
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> RegistrationResult:
    """Register the model folder as a new version of ``cfg.model_name``, unless its weights
    already are one; alias it ``challenger`` and promote it to ``champion`` if the gates pass.

    ``per_class`` is the evaluate stage's per-class table (its recall feeds the class-recall
    gate and becomes ``metrics.recall.<class>`` tags). ``evaluation`` is the current target
    test split: the champion is scored on it, so both sides are compared on the same data;
    without it the champion's stored tags stand in. ``data`` feeds the model card.

    Call inside an active MLflow run: the pyfunc model and the model card are logged to it.
    """
    model_dir = Path(model_dir)
    spec = read_model_spec(model_dir)
    client = MlflowClient()
    name = cfg.model_name
    weights_sha256 = sha256_file(model_dir / "weights.safetensors")
    existing = version_with_weights(client, name, weights_sha256)
    if existing is not None and DECISION_TAG in existing.tags:
        return _already_registered(client, existing, weights_sha256)

    if GATE_METRIC not in metrics:
        raise ValueError(
            f"metrics lack {GATE_METRIC!r}, the promotion gate; got {sorted(metrics)} "
            "(run the evaluate stage first)"
        )
    if mlflow.active_run() is None:
        raise RuntimeError("register_model_dir: no active MLflow run to log the model to")

    challenger = scores_from_metrics(
        metrics, per_class, "the evaluate stage on the target test split"
    )
    hint = metrics.get(CHAMPION_GATE_METRIC)
    scorer = VersionScorer(
        name, evaluation, macro_f1_hint=float(hint) if hint is not None else None
    )
    champion = champion_version(client, name)
    if champion is not None:
        scorer(champion)  # the slow part (load + predict) before the lock; redone only if moved
    model_info = log_pyfunc_model(model_dir) if existing is None else None

    store_uri = mlflow.get_registry_uri()
    with promotion_lock(store_uri, name, lock_timeout):
        # Again inside the lock: a concurrent run may have registered these weights meanwhile.
        existing = version_with_weights(client, name, weights_sha256)
        if existing is not None and DECISION_TAG in existing.tags:
            return _already_registered(client, existing, weights_sha256)
        if existing is None:
            registered = mlflow.register_model(
                model_info.model_uri,
                name,
                tags=_version_tags(metrics, per_class, tags, weights_sha256, model_dir),
            )
            version = str(registered.version)
        else:  # registered by an earlier attempt that stopped before deciding: decide now
            version = str(existing.version)
        client.set_registered_model_alias(name, CHALLENGER, version)
        outcome: PromotionOutcome = promote_under_lock(
            client,
            name,
            version,
            challenger,
            cfg,
            scorer,
            store_uri=store_uri,
            mode="pipeline",
            user=current_user(),
            lock_timeout=lock_timeout,
        )

    card = render_model_card(
        name,
        version,
        metrics,
        per_class,
        {**tags, WEIGHTS_TAG: weights_sha256, MODEL_DIR_TAG: directory_digest(model_dir)},
        data,
        cfg,
        outcome.decision,
        spec.class_names,
    )
    card_uri = _log_model_card(client, name, version, card)
    return RegistrationResult(
        name=name,
        version=version,
        aliases=tuple(sorted(a for a, v in outcome.aliases.items() if v == version)),
        decision=outcome.decision.label,
        reason=outcome.decision.reason,
        already_registered=False,
        weights_sha256=weights_sha256,
        model_uri=f"models:/{name}/{version}",
        champion_before=outcome.champion_before,
        champion_scores=outcome.champion_scores,
        challenger_scores=outcome.challenger_scores,
        gates=outcome.decision.gates,
        model_card_uri=card_uri,
        lock=outcome.lock,
        registry_aliases=outcome.aliases,
    )
