"""The MLflow model registry: a self-contained pyfunc model and the promotion gates.

A registered version is a pyfunc whose artifact is the roadshift model folder
and whose code is this package, so ``models:/<name>@champion`` loads and predicts
from raw RGB images anywhere, with the same resize and normalisation as
evaluation used (``create_eval_transform``): no train/serve skew.

Promotion is decided here, once: the new version always becomes ``challenger``
and becomes ``champion`` only through the gates in ``RegisterSection``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.types import ColSpec, Schema

from roadshift.config import RegisterSection
from roadshift.lineage import directory_digest, sha256_file
from roadshift.models import ModelSpec

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
GATE_METRIC = "target_macro_f1"
# Set by an evaluate stage that scored the current champion on the same test set
# as the challenger; preferred over the champion's stored score when present.
CHAMPION_GATE_METRIC = f"champion_{GATE_METRIC}"
WEIGHTS_TAG = "weights.sha256"
MODEL_DIR_TAG = "model_dir.sha256"
METRIC_TAG_PREFIX = "metrics."
DECISION_TAG = "promotion.decision"
REASON_TAG = "promotion.reason"
IMAGE_COLUMN = "image"
LOGGED_MODEL_NAME = "model"
_PREDICT_BATCH = 256
_FLOAT_SLACK = 1e-12

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
        from roadshift.models import load_model_dir

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


# --------------------------------------------------------------------------- registry


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

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel | None:
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    registered = _registered_model(client, name)
    if registered is None or CHAMPION not in registered.aliases:
        return None
    return client.get_model_version(name, registered.aliases[CHAMPION])


def load_champion(name: str) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def version_with_weights(
    client: MlflowClient, name: str, weights_sha256: str
) -> ModelVersion | None:
    """The oldest version of ``name`` registered from exactly these weights, if any."""
    if _registered_model(client, name) is None:
        return None
    versions = client.search_model_versions(
        f"name = {_quoted(name)} AND tags.`{WEIGHTS_TAG}` = {_quoted(weights_sha256)}"
    )
    matching = [v for v in versions if v.tags.get(WEIGHTS_TAG) == weights_sha256]
    return min(matching, key=lambda v: int(v.version), default=None)


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "refused"


def decide_promotion(
    challenger_score: float,
    champion_score: float | None,
    champion_label: str | None,
    cfg: RegisterSection,
) -> PromotionDecision:
    """The gates: an absolute floor, then a margin over the champion. A tie keeps the champion."""
    if challenger_score + _FLOAT_SLACK < cfg.min_macro_f1:
        return PromotionDecision(
            False,
            f"{GATE_METRIC} {challenger_score:.4f} is below the floor "
            f"register.min_macro_f1={cfg.min_macro_f1:.4f}",
        )
    if champion_label is None:
        return PromotionDecision(
            True, f"no champion yet; {GATE_METRIC} {challenger_score:.4f} passes the floor"
        )
    if champion_score is None:
        return PromotionDecision(
            False,
            f"champion {champion_label} has no recorded {GATE_METRIC} to compare against; "
            "promote by hand if intended",
        )
    gain = challenger_score - champion_score
    if gain <= 0 or gain + _FLOAT_SLACK < cfg.min_improvement:
        return PromotionDecision(
            False,
            f"{GATE_METRIC} {challenger_score:.4f} vs champion {champion_label} "
            f"{champion_score:.4f}: gain {gain:+.4f} is not above "
            f"register.min_improvement={cfg.min_improvement:.4f}",
        )
    return PromotionDecision(
        True,
        f"{GATE_METRIC} {challenger_score:.4f} beats champion {champion_label} "
        f"{champion_score:.4f} by {gain:+.4f} (register.min_improvement={cfg.min_improvement:.4f})",
    )


def _champion_score(champion: ModelVersion, metrics: Mapping[str, float]) -> float | None:
    if CHAMPION_GATE_METRIC in metrics:
        return float(metrics[CHAMPION_GATE_METRIC])
    stored = champion.tags.get(METRIC_TAG_PREFIX + GATE_METRIC)
    return float(stored) if stored is not None else None


def _version_tags(
    metrics: Mapping[str, float], tags: Mapping[str, str], weights_sha256: str, model_dir: Path
) -> dict[str, str]:
    return {
        **{key: str(value) for key, value in tags.items()},
        **{METRIC_TAG_PREFIX + key: repr(float(value)) for key, value in metrics.items()},
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
    )


def _promote(client: MlflowClient, name: str, version: str, champion: ModelVersion | None) -> None:
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion.version)
    client.set_registered_model_alias(name, CHAMPION, version)


def register_model_dir(
    model_dir: Path,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    cfg: RegisterSection,
) -> RegistrationResult:
    """Register the model folder as a new version of ``cfg.model_name``, unless its weights
    already are one; alias it ``challenger`` and promote it to ``champion`` if the gates pass.

    Call inside an active MLflow run: the pyfunc model is logged to it.
    """
    model_dir = Path(model_dir)
    read_model_spec(model_dir)
    client = MlflowClient()
    weights_sha256 = sha256_file(model_dir / "weights.safetensors")
    existing = version_with_weights(client, cfg.model_name, weights_sha256)
    if existing is not None:
        return _already_registered(client, existing, weights_sha256)

    if GATE_METRIC not in metrics:
        raise ValueError(
            f"metrics lack {GATE_METRIC!r}, the promotion gate; got {sorted(metrics)} "
            "(run the evaluate stage first)"
        )
    if mlflow.active_run() is None:
        raise RuntimeError("register_model_dir: no active MLflow run to log the model to")

    model_info = log_pyfunc_model(model_dir)
    registered = mlflow.register_model(
        model_info.model_uri,
        cfg.model_name,
        tags=_version_tags(metrics, tags, weights_sha256, model_dir),
    )
    name, version = registered.name, str(registered.version)
    client.set_registered_model_alias(name, CHALLENGER, version)

    champion = champion_version(client, name)
    decision = decide_promotion(
        float(metrics[GATE_METRIC]),
        _champion_score(champion, metrics) if champion else None,
        f"v{champion.version}" if champion else None,
        cfg,
    )
    client.set_model_version_tag(name, version, DECISION_TAG, decision.label)
    client.set_model_version_tag(name, version, REASON_TAG, decision.reason)
    if decision.promote:
        _promote(client, name, version, champion)

    return RegistrationResult(
        name=name,
        version=version,
        aliases=tuple(sorted(client.get_model_version(name, version).aliases)),
        decision=decision.label,
        reason=decision.reason,
        already_registered=False,
        weights_sha256=weights_sha256,
        model_uri=f"models:/{name}/{version}",
    )
