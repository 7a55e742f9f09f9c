"""Batch prediction from the model registry: image files in, one row of probabilities per file.

The model is whatever the registry holds (``models:/<name>@champion`` by default): a pyfunc
that carries its own resize and normalisation (``roadshift.registry.pyfunc.RoadSignClassifier``).
So this module never imports torch or the training code: it finds files, decodes each one by
the training loader's colour rule (``roadshift.data.images.to_rgb``) and hands the model raw
uint8 batches. What the model sees is exactly what a serving client would send it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from roadshift.config import Params
from roadshift.data.images import ImageLimits, ImageRefusedError, decode_image_file
from roadshift.errors import RoadshiftError

# The alias the register stage promotes to. roadshift.registry.tags holds constants only: it
# pulls in neither torch nor the model code, which prediction never needs.
from roadshift.registry.tags import CHAMPION as CHAMPION_ALIAS

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_BATCH_SIZE = 64
PATH_COLUMN = "path"
LABEL_COLUMN = "label"
CONFIDENCE_COLUMN = "confidence"
OUTPUT_FORMATS = {".csv": "csv", ".json": "json"}

OnSkip = Callable[[Path, str], None]
OnBatch = Callable[[int], None]


class PredictError(RoadshiftError):
    """A prediction request that cannot be served; the message says what to do about it."""


class UnreadableImageError(PredictError):
    """An input file that does not decode to an RGB image; names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"{path}: {reason} (fix or remove the file, or pass --skip-bad to skip such files)"
        )


class ModelNotFoundError(PredictError):
    """The model URI names nothing in the registry (typically: no champion yet)."""


# --------------------------------------------------------------------------- inputs


def champion_uri(model_name: str) -> str:
    return f"models:/{model_name}@{CHAMPION_ALIAS}"


def _normalised_extensions(extensions: Iterable[str]) -> frozenset[str]:
    return frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def _images_under(folder: Path, extensions: frozenset[str]) -> list[Path]:
    """Recursive and sorted, so output rows come out in the same order run to run.

    Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped, as the
    manifest scan skips them.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath) / name
            for name in filenames
            if not name.startswith(".") and Path(name).suffix.lower() in extensions
        )
    return sorted(found)


def find_images(
    inputs: Sequence[Path], extensions: Iterable[str] = DEFAULT_EXTENSIONS
) -> list[Path]:
    """The files to predict: files as named (any extension), folders scanned recursively.

    A missing path or a folder without images is an error rather than zero rows: a typo
    would otherwise look like a successful run. A file reached twice is predicted once.
    """
    wanted = _normalised_extensions(extensions)
    paths: list[Path] = []
    for given in inputs:
        given = Path(given)
        if given.is_dir():
            found = _images_under(given, wanted)
            if not found:
                raise PredictError(
                    f"{given}: no image files in this folder or below "
                    f"(extensions {', '.join(sorted(wanted))})"
                )
            paths.extend(found)
        elif os.path.lexists(given):  # a file, or a FIFO or link the decode refuses by name
            paths.append(given)
        else:
            raise PredictError(f"{given}: no such file or folder")
    if not paths:
        raise PredictError("no images given: pass image files or folders")
    return _first_occurrences(paths)


def _first_occurrences(paths: Sequence[Path]) -> list[Path]:
    """Drop files already listed (a folder and a file inside it), keeping the given order."""
    seen: set[Path] = set()
    unique = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def decode_image(path: Path, limits: ImageLimits | None = None) -> np.ndarray:
    """HxWx3 uint8 through training's guarded decode and per-mode rule (no train/serve skew):
    a regular file within ``prepare.image_limits``, of an accepted format, with sides within
    ``validate``'s (``ImageLimits.for_prediction``; params.yaml's defaults when None)."""
    limits = limits or ImageLimits.for_prediction(Params())
    try:
        return decode_image_file(Path(path), limits).image.rgb
    except ImageRefusedError as refused:
        raise UnreadableImageError(path, refused.reason) from None


# --------------------------------------------------------------------------- prediction


def load_registry_model(model_uri: str) -> Any:
    """The model at ``model_uri``, its files checked first (``roadshift.registry.safe_load``:
    nothing from the artifact store is unpickled or run unless it is roadshift's own), with a
    message that says what to do when nothing is there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from roadshift.registry.safe_load import load_checked_model

    try:
        with warnings.catch_warnings(record=True) as caught:
            # record=True: MLflow's loader installs its own "once" filter, ahead of any we add.
            warnings.simplefilter("default")
            model = load_checked_model(model_uri)
    except MlflowException as error:
        store = mlflow.get_tracking_uri()
        hint = (
            "no version has been promoted to champion yet: run the pipeline "
            "(`roadshift run`) or pass --model models:/<name>/<version>"
            if model_uri.endswith(f"@{CHAMPION_ALIAS}")
            else "check the name, version or alias, or pass another --model"
        )
        raise ModelNotFoundError(
            f"cannot load {model_uri} from {store}: {error.message}; {hint}"
        ) from None
    _show_warnings(caught)
    return model


def _show_warnings(caught: Iterable[warnings.WarningMessage]) -> None:
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _predict_images(model: Any, images: Sequence[np.ndarray]) -> pd.DataFrame:
    """One model call per image size in the batch: the pyfunc takes (N, H, W, 3) arrays."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(index)
    frames = []
    for indices in by_shape.values():
        frame = model.predict(np.stack([images[i] for i in indices]))
        frames.append(frame.set_axis(indices, axis=0))
    return pd.concat(frames).sort_index()


def _decoded_batch(
    paths: Sequence[Path], on_skip: OnSkip | None, limits: ImageLimits | None
) -> tuple[list[Path], list[np.ndarray]]:
    kept, images = [], []
    for path in paths:
        try:
            images.append(decode_image(path, limits))
        except UnreadableImageError as error:
            if on_skip is None:
                raise
            on_skip(path, error.reason)
            continue
        kept.append(path)
    return kept, images


def result_frame(paths: Sequence[Path], predictions: pd.DataFrame) -> pd.DataFrame:
    """path, label, confidence (the label's probability), then the model's probability columns."""
    probabilities = predictions.drop(columns=[LABEL_COLUMN])
    frame = pd.DataFrame(
        {
            PATH_COLUMN: [str(p) for p in paths],
            LABEL_COLUMN: predictions[LABEL_COLUMN].to_numpy(),
            CONFIDENCE_COLUMN: probabilities.max(axis=1).to_numpy(),
        }
    )
    return pd.concat([frame, probabilities.reset_index(drop=True)], axis=1)


def predict_paths(
    model: Any,
    paths: Sequence[Path],
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    on_skip: OnSkip | None = None,
    on_batch: OnBatch | None = None,
    limits: ImageLimits | None = None,
) -> pd.DataFrame:
    """Predict every file with a pyfunc model, ``batch_size`` files per model call.

    Decoding happens batch by batch, so memory stays at one batch of images. An unreadable
    file raises ``UnreadableImageError`` naming it, unless ``on_skip`` is given: then it is
    reported there and left out. ``on_batch`` receives the number of files each batch
    handled (for a progress bar). ``limits``: what a file may be (``decode_image``).
    """
    if batch_size < 1:
        raise PredictError(f"batch size must be at least 1, got {batch_size}")
    kept: list[Path] = []
    frames: list[pd.DataFrame] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch_paths, images = _decoded_batch(chunk, on_skip, limits)
        if images:
            kept.extend(batch_paths)
            frames.append(_predict_images(model, images))
        if on_batch is not None:
            on_batch(len(chunk))
    if not frames:
        return pd.DataFrame(columns=[PATH_COLUMN, LABEL_COLUMN, CONFIDENCE_COLUMN])
    return result_frame(kept, pd.concat(frames, ignore_index=True))


# --------------------------------------------------------------------------- outputs


def output_format(out: Path) -> str:
    """``csv`` or ``json`` from the suffix; checked before any work so a typo costs nothing."""
    fmt = OUTPUT_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise PredictError(f"--out {out}: the file name must end in .csv or .json")
    return fmt


def write_predictions(frame: pd.DataFrame, out: Path) -> Path:
    """CSV with a header row, or JSON as a list of one object per file (same keys as the CSV)."""
    out = Path(out)
    fmt = output_format(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(out, index=False)
    else:
        out.write_text(json.dumps(frame.to_dict(orient="records"), indent=2) + "\n")
    return out


def format_table(frame: pd.DataFrame) -> str:
    """Plain aligned text for a terminal or a pipe; --out gives machine-readable files."""
    return frame.to_string(index=False, float_format=lambda value: f"{value:.4f}")


@contextmanager
def batch_progress(total: int, enabled: bool) -> Iterator[OnBatch | None]:
    """A rich bar on stderr counting files; ``None`` when disabled, so callers pass it through."""
    if not enabled:
        yield None
        return
    from roadshift.train.progress import stderr_progress

    with stderr_progress() as progress:
        task = progress.add_task("predict", total=total)
        yield lambda count: progress.update(task, advance=count)
