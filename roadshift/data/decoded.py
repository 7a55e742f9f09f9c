"""Decode each image once: a cached uint8 array per manifest split, memory-mapped on reuse.

Every training epoch, every evaluation and every stage used to decode the same PNGs
again with Pillow. Here a split's images are decoded (and resized to the model's input
size, as the eval transform would) once into an ``(N, size, size, 3)`` uint8 ``.npy``
under ``.roadshift/cache/decoded/`` -- outside DVC's outputs, which DVC deletes before
a stage runs. The file's name holds a key over the split's rows (path and content
sha256 from the manifest), the image size and the resize method, so a changed manifest
or size is a cache miss, never a stale hit.

A cache file is trusted only if its sidecar ``.json`` (written after it) names the same
key, shape and the sha256 of the array's bytes: a truncated or damaged file, or one
left by a crash between the two writes, is decoded again. Both files are written to a
temporary name and renamed into place, so readers never see a half-written file, and
two processes building the same entry at once both end with a correct one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from roadshift.data.images import ImageLimits, decode_image_file

CACHE_FORMAT = 2  # 2: images over REDUCED_SIDE decode reduced (roadshift.data.images)
RESIZE_METHOD = "cv2.INTER_AREA"  # albumentations' Resize in create_eval_transform
KEEP_PER_SPLIT = 3  # older entries of a (domain, split) beyond these are removed
MAX_DECODE_THREADS = 8


def load_rgb(path: Path, limits: ImageLimits | None = None) -> np.ndarray:
    """Decode to HxWx3 uint8 through the guarded decode and its per-mode rule
    (``roadshift.data.images``), as predict and the served model do."""
    return decode_image_file(Path(path), limits or ImageLimits()).image.rgb


def manifest_limits(frame: pd.DataFrame) -> ImageLimits:
    """Limits for re-reading files prepare already vetted under params.yaml's limits: the
    defaults, raised to the largest file and image the manifest records, so training never
    refuses what prepare accepted, and a file swapped for a bigger one since is refused."""
    limits = ImageLimits()
    if frame.empty or not {"bytes", "width", "height"} <= set(frame.columns):
        return limits
    pixels = int((frame["width"].astype("int64") * frame["height"].astype("int64")).max())
    return ImageLimits(
        max_file_bytes=max(limits.max_file_bytes, int(frame["bytes"].max())),
        max_pixels=max(limits.max_pixels, pixels),
    )


def decode_resized(path: Path, image_size: int, limits: ImageLimits | None = None) -> np.ndarray:
    """One image as the eval transform sees it before normalising: RGB, size x size."""
    image = load_rgb(path, limits)
    if image.shape[:2] != (image_size, image_size):
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return image


def decode_all(paths: list[Path], image_size: int, limits: ImageLimits | None = None) -> np.ndarray:
    """Decode in threads (Pillow and OpenCV release the GIL) into one uint8 array."""
    images = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)

    def fill(i: int) -> None:
        images[i] = decode_resized(paths[i], image_size, limits)

    threads = max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fill, range(len(paths))))
    return images


def cache_key(frame: pd.DataFrame, image_size: int) -> str:
    """What the decoded array depends on: each row's path and content hash, the size and
    the resize rule. Without a ``sha256`` column (a hand-made frame) the file's size and
    mtime stand in for its content."""
    if "sha256" in frame.columns:
        contents = list(frame["sha256"].astype(str))
    else:
        contents = [_stat_signature(Path(p)) for p in frame["path"]]
    payload = {
        "format": CACHE_FORMAT,
        "image_size": image_size,
        "resize": RESIZE_METHOD,
        "rows": [[str(p), c] for p, c in zip(frame["path"], contents, strict=True)],
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _stat_signature(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _label(frame: pd.DataFrame) -> str:
    """Human-readable prefix of an entry: ``<domain>-<split>`` where the frame has one."""
    parts = []
    for column in ("domain", "split"):
        values = frame[column].unique() if column in frame.columns else []
        parts.append(str(values[0]) if len(values) == 1 else "mixed")
    return "-".join(part for part in parts if part.replace("_", "").isalnum()) or "images"


def _array_digest(images: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(images)).cast("B")).hexdigest()


def _atomic_write(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _load_trusted(array_path: Path, meta_path: Path, key: str, count: int) -> np.ndarray | None:
    """The memory-mapped array if its sidecar vouches for every byte of it, else None."""
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    expected_shape = [count, *images.shape[1:]] if images.ndim == 4 else None
    if (
        meta.get("key") != key
        or images.dtype != np.uint8
        or list(images.shape) != meta.get("shape")
        or list(images.shape) != expected_shape
        or _array_digest(images) != meta.get("sha256")
    ):
        return None
    return images


def _prune(directory: Path, label: str, keep: Path) -> None:
    """Keep the newest few entries of one (domain, split); old manifests' arrays go."""
    entries = sorted(
        (p for p in directory.glob(f"{label}-*.npy") if p != keep),
        key=lambda p: p.stat().st_mtime if p.exists() else 0.0,
        reverse=True,
    )
    for stale in entries[KEEP_PER_SPLIT - 1 :]:
        stale.unlink(missing_ok=True)
        stale.with_suffix(".json").unlink(missing_ok=True)


def decoded_images(
    frame: pd.DataFrame, root: Path, image_size: int, cache_dir: Path | None
) -> np.ndarray:
    """The split's images as uint8 ``(N, size, size, 3)``, rows in ``frame`` order.

    With ``cache_dir`` the array comes from (or goes to) the cache; with ``None`` the
    images are decoded in memory and nothing is written.
    """
    paths = [Path(root) / p for p in frame["path"]]
    limits = manifest_limits(frame)
    if cache_dir is None:
        return decode_all(paths, image_size, limits)
    key = cache_key(frame, image_size)
    label = _label(frame)
    array_path = Path(cache_dir) / f"{label}-{image_size}px-{key[:20]}.npy"
    meta_path = array_path.with_suffix(".json")
    cached = _load_trusted(array_path, meta_path, key, len(paths))
    if cached is not None:
        os.utime(array_path)  # recently used: kept by _prune
        return cached
    images = decode_all(paths, image_size, limits)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(array_path, lambda handle: np.save(handle, images, allow_pickle=False))
    meta = {"key": key, "shape": list(images.shape), "sha256": _array_digest(images)}
    _atomic_write(meta_path, lambda handle: handle.write(json.dumps(meta).encode()))
    _prune(array_path.parent, f"{label}-{image_size}px", array_path)
    return images
