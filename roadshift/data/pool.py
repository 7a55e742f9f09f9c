"""The unlabelled target pool as production feeds it and labelling drains it.

``roadshift predict --keep-unlabelled`` copies the images it scored into the pool
(``data.target.unlabeled_path``); ``roadshift data add target`` takes the images a person has
just labelled back out. Both go by content (sha256 of the bytes), never by file name: the same
photo sent twice, or already labelled, is kept once and only where it belongs. Versioning the
folders with DVC is the caller's (``roadshift.data.versioning``).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from roadshift.data.manifest import scan_unlabeled_folder

_HASH_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def images_in(folder: Path, extensions: Iterable[str]) -> list[Path]:
    """Every image under ``folder`` at any depth (hidden files skipped); none if it is absent."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [image.path for image in scan_unlabeled_folder(folder, extensions)]


def hashes_of(paths: Iterable[Path]) -> dict[str, Path]:
    """sha256 -> the first path with those bytes."""
    found: dict[str, Path] = {}
    for path in paths:
        found.setdefault(sha256_of(path), Path(path))
    return found


@dataclass(frozen=True)
class KeptImages:
    """What ``keep_in_pool`` did with each scored file."""

    copied: tuple[Path, ...]  # new files in the pool
    already_in_pool: tuple[Path, ...]  # the incoming files whose bytes the pool already holds
    already_labelled: tuple[Path, ...]  # the incoming files whose bytes a labelled tree holds


def _pool_name(path: Path, sha256: str) -> str:
    """``<original stem>-<sha256[:12]><suffix>``: readable, and two cameras' ``IMG_0001.jpg``
    never collide."""
    stem = _SAFE_NAME.sub("_", path.stem)[:60] or "image"
    return f"{stem}-{sha256[:12]}{path.suffix.lower()}"


def keep_in_pool(
    paths: Sequence[Path],
    pool_dir: Path,
    labelled_dirs: Sequence[Path],
    extensions: Iterable[str],
    batch_name: str,
) -> KeptImages:
    """Copy ``paths`` into ``pool_dir/<batch_name>/``, skipping bytes the pool or a labelled
    tree already holds (and repeats within ``paths``)."""
    extensions = tuple(extensions)
    in_pool = set(hashes_of(images_in(pool_dir, extensions)))
    labelled = {h for folder in labelled_dirs for h in hashes_of(images_in(folder, extensions))}
    copied, duplicates, known = [], [], []
    destination_dir = Path(pool_dir) / batch_name
    for path in paths:
        digest = sha256_of(path)
        if digest in labelled:
            known.append(Path(path))
            continue
        if digest in in_pool:
            duplicates.append(Path(path))
            continue
        destination_dir.mkdir(parents=True, exist_ok=True)
        destination = destination_dir / _pool_name(Path(path), digest)
        shutil.copyfile(path, destination)
        in_pool.add(digest)
        copied.append(destination)
    return KeptImages(tuple(copied), tuple(duplicates), tuple(known))


def remove_labelled_from_pool(
    pool_dir: Path, labelled_dirs: Sequence[Path], extensions: Iterable[str]
) -> tuple[Path, ...]:
    """Delete every pool file whose bytes a labelled tree holds (a person labelled it), and
    any folder that leaves empty; the removed paths."""
    extensions = tuple(extensions)
    labelled = {h for folder in labelled_dirs for h in hashes_of(images_in(folder, extensions))}
    removed = []
    for path in images_in(pool_dir, extensions):
        if sha256_of(path) in labelled:
            path.unlink()
            removed.append(path)
    for folder in sorted({p.parent for p in removed}, key=lambda p: len(p.parts), reverse=True):
        while folder != Path(pool_dir) and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return tuple(removed)


def difference_hash(path: Path) -> int:
    """A 64-bit perceptual difference hash (dHash): brighter-than-right-neighbour bits of a
    9x8 greyscale thumbnail. Resized, recompressed or slightly re-lit copies of a photo land
    within a few bits of each other, where their sha256 differ entirely."""
    import numpy as np
    from PIL import Image

    from roadshift.data.images import to_rgb

    with Image.open(path) as image:
        grey = to_rgb(image).convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))
