"""The registered model: an MLflow pyfunc logged as "models from code", and logging it.

A registered version holds data files only: the roadshift model folder (safetensors weights,
``model.json``), MLflow's YAML/JSON metadata and ``model_code.py``, which names this module's
``RoadSignClassifier`` from the installed roadshift. Nothing is pickled and no copy of the
package travels, so loading a version runs no code taken from the artifact store (roadshift's
loader checks that file is its own first: ``roadshift.registry.safe_load``).
``models:/<name>@champion`` predicts from raw RGB images with the same resize and
normalisation as evaluation used (``create_eval_transform``): no train/serve skew.

Registering it as a version is ``roadshift.registry.register``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.types import ColSpec, Schema

from roadshift.registry.tags import MODEL_CODE_FILE_NAME, MODEL_DIR_ARTIFACT
from roadshift.train.models import ModelSpec

IMAGE_COLUMN = "image"
LOGGED_MODEL_NAME = "model"
# The file MLflow runs to build the model; logged beside the weights as itself.
MODEL_CODE_FILE = Path(__file__).with_name(MODEL_CODE_FILE_NAME)
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

        self.model, self.spec = load_model_dir(Path(context.artifacts[MODEL_DIR_ARTIFACT]))
        self.transform = create_eval_transform(self.spec.image_size, self.spec.mean, self.spec.std)

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        """``model_input``: the array batch, or a DataFrame of encoded images.

        The ``np.ndarray`` hint is one MLflow infers no schema from, so it converts and checks
        nothing (this method does, for both forms). A bad input is an ``MlflowException``
        (HTTP 400 from the scoring server) with the model's own message and no traceback,
        so an error body carries no server file paths.
        """
        try:
            images = images_from_input(model_input)
        except (ValueError, TypeError) as error:
            raise MlflowException(str(error), error_code=BAD_REQUEST) from None
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
    """One request row through training's guarded decode (``roadshift.data.images``): the
    byte and pixel limits, accepted formats and image sides of params.yaml's defaults are
    checked before any pixel is decoded, large images decode reduced, and the colour rule is
    the training loader's. A refused row raises a ValueError naming the row."""
    if isinstance(cell, str):
        try:
            cell = base64.b64decode(cell, validate=True)
        except binascii.Error:
            raise ValueError(
                f"row {row}: {IMAGE_COLUMN} text is not base64-encoded image bytes"
            ) from None
    if not isinstance(cell, bytes | bytearray | memoryview):
        raise ValueError(f"row {row}: expected encoded image bytes, got {type(cell).__name__}")
    from roadshift.config import Params
    from roadshift.data.images import ImageLimits, decode_image_bytes

    limits = ImageLimits.for_prediction(Params())
    return decode_image_bytes(bytes(cell), f"row {row}", limits).rgb


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
    """Log the model folder as a models-from-code pyfunc to the active run.

    No ``code_paths``: the model imports the installed roadshift wherever it is loaded or
    served (``serving_requirements`` pins what it needs besides), so nothing importable
    travels in the artifact store.
    """
    spec = read_model_spec(model_dir)
    example = np.zeros((1, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE_FILE),
        artifacts={MODEL_DIR_ARTIFACT: str(Path(model_dir).resolve())},
        signature=model_signature(spec),
        input_example=example,
        pip_requirements=serving_requirements(),
    )
