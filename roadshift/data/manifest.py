"""Scan an ImageFolder tree into a manifest: one row per image, decoded once to prove it is whole.

Two layouts are understood:

* ``<domain_dir>/<split>/<class>/<file>`` when every top-level folder is a split name;
* ``<domain_dir>/<class>/<file>`` otherwise, and each file's split is drawn from its content
  hash, so a file keeps its split when the dataset grows and byte-identical copies share a split.

Files inside a class folder may sit in sub-folders; the class is always the class folder.
The unlabelled target pool (``data.target.unlabeled_path``) has no class folders: every image
at any depth is listed with an empty label and the split ``unlabeled``.
Hidden files and folders (``.DS_Store``, ``._x.png``, ``.ipynb_checkpoints``) are skipped, as
are files whose extension is not an image extension.

Integrity rules (README, "Bring your own data"): every file is read, hashed and fully decoded.
Empty, truncated and non-image files are rejected; so are pixel modes ``to_rgb`` has no rule
for (``roadshift.data.images``) and files whose real format is not one the configured
extensions stand for. A file whose extension names another accepted format (a JPEG saved as
``.png``) is accepted: Pillow reads the content, not the name, and the ``format`` column
records what the bytes really are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pandas as pd

from roadshift.config import SPLITS, PrepareSection, SplitFractions
from roadshift.data.images import (
    ImageLimits,
    ImageRefusedError,
    decode_image_file,
    file_kind,
)
from roadshift.errors import RoadshiftError

MANIFEST_COLUMNS = (
    "path",
    "domain",
    "label",
    "split",
    "sha256",
    "width",
    "height",
    "mode",
    "format",
    "bytes",
)
INTEGER_COLUMNS = ("width", "height", "bytes")
MANIFEST_DTYPES: dict[str, str] = {
    column: ("int64" if column in INTEGER_COLUMNS else "str") for column in MANIFEST_COLUMNS
}
MAX_DECODE_THREADS = 8
UNLABELED_SPLIT = "unlabeled"
"""The split of every row of the unlabelled pool's manifest (its label is empty)."""


@dataclass(frozen=True)
class ImageProblem:
    path: Path
    reason: str


class CorruptImageError(RoadshiftError, ValueError):
    """Image files that fail the integrity rules; the message lists every one of them."""

    def __init__(self, path: Path, reason: str, more: Sequence[ImageProblem] = ()) -> None:
        self.path = Path(path)
        self.reason = reason
        self.problems: tuple[ImageProblem, ...] = (ImageProblem(self.path, reason), *more)
        super().__init__(_describe_problems(self.problems))

    @classmethod
    def from_problems(cls, problems: Sequence[ImageProblem]) -> CorruptImageError:
        first, *rest = problems
        return cls(first.path, first.reason, rest)


class DatasetLayoutError(RoadshiftError, FileNotFoundError):
    """A data folder that does not hold images in an ImageFolder layout.

    A FileNotFoundError so that callers which treat missing inputs as user errors (the CLI)
    show it as one message rather than a traceback.
    """


class UnsafeFileError(DatasetLayoutError):
    """Links or special files (FIFOs, devices, sockets) inside a data folder, each named.

    Refused before anything is read, copied or versioned: ``dvc add`` replaces a link by a
    copy of what it points to (``/etc/shadow`` included) and hangs on a FIFO, and a linked
    class folder would be trained on without being part of the data version.
    """


def _describe_problems(problems: Sequence[ImageProblem]) -> str:
    count = len(problems)
    noun = "file" if count == 1 else "files"
    header = (
        f"{count} image {noun} failed the integrity check; remove or replace each one "
        "(re-export it from the original), then run the prepare stage again:"
    )
    return "\n".join([header, *(f"  {p.path}: {p.reason}" for p in problems)])


# --- scanning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFile:
    path: Path
    label: str
    split: str | None  # None: assigned from the content hash (flat layout)


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p))


def _image_files(folder: Path, extensions: frozenset[str]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                found.append(Path(dirpath) / name)
    return sorted(found)


def _stray_images(folder: Path, extensions: frozenset[str]) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not _is_hidden(p) and p.suffix.lower() in extensions
    )


def _class_folder_files(
    folder: Path, split: str | None, extensions: frozenset[str]
) -> list[ImageFile]:
    stray = _stray_images(folder, extensions)
    if stray:
        raise DatasetLayoutError(
            f"{stray[0]}: image outside any class folder ({len(stray)} such file(s) in {folder}); "
            "move each image into a folder named after its class"
        )
    class_dirs = _visible_dirs(folder)
    if not class_dirs:
        raise DatasetLayoutError(
            f"{folder}: no class folders; expected {folder}/<class>/<image> "
            f"with one of {sorted(extensions)}"
        )
    files, empty = [], []
    for class_dir in class_dirs:
        images = _image_files(class_dir, extensions)
        if not images:
            empty.append(class_dir)
        files.extend(ImageFile(path, class_dir.name, split) for path in images)
    if empty:
        listed = "\n".join(f"  {d}" for d in empty)
        raise DatasetLayoutError(
            f"{len(empty)} class folder(s) hold no images with one of {sorted(extensions)}; "
            f"add images or remove the folder:\n{listed}"
        )
    return files


def _unsafe_reason(entry: os.DirEntry, root: Path | None) -> str | None:
    if entry.is_symlink():
        target = Path(os.path.realpath(entry.path))
        outside = root is not None and not target.is_relative_to(Path(root).resolve())
        where = " (outside the project)" if outside else ""
        return (
            f"a symbolic link to {target}{where}; links are refused inside data folders (DVC "
            "would version a copy of what it points to, and prepare could read files outside "
            "the data version): replace it with the real file or folder (`cp -rL`) or remove it"
        )
    if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
        return None
    kind = file_kind(entry.stat(follow_symlinks=False).st_mode)
    return f"{kind}, not a regular file or folder; remove it"


def unsafe_entries(folder: Path, root: Path | None = None) -> list[ImageProblem]:
    """Every link and special file under ``folder``, hidden ones too (DVC versions them),
    found by ``lstat`` alone: nothing is opened and no link is followed."""
    problems: list[ImageProblem] = []
    pending = [Path(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                reason = _unsafe_reason(entry, root)
                if reason:
                    problems.append(ImageProblem(Path(entry.path), reason))
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
    return sorted(problems, key=lambda p: p.path)


def refuse_unsafe_entries(folder: Path, root: Path | None = None) -> None:
    """Raise ``UnsafeFileError`` naming every link and special file under ``folder``."""
    problems = unsafe_entries(folder, root)
    if problems:
        lines = "\n".join(f"  {p.path}: {p.reason}" for p in problems)
        raise UnsafeFileError(
            f"{folder}: {len(problems)} link(s) or special file(s) in a data folder; nothing "
            f"was read, copied or versioned:\n{lines}"
        )


def _normalised_extensions(extensions: Iterable[str]) -> frozenset[str]:
    return frozenset(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def scan_image_folder(
    domain_dir: Path, extensions: Iterable[str], root: Path | None = None
) -> list[ImageFile]:
    """List the images of one domain with their class and (split layout only) split; refuse
    links and special files anywhere in it (``root``: the project, named in the message)."""
    wanted = _normalised_extensions(extensions)
    if not domain_dir.is_dir():
        raise DatasetLayoutError(f"{domain_dir}: data folder not found")
    refuse_unsafe_entries(domain_dir, root)
    top = _visible_dirs(domain_dir)
    if not top:
        raise DatasetLayoutError(
            f"{domain_dir}: no images; expected {domain_dir}/<class>/<image> "
            f"or {domain_dir}/<split>/<class>/<image>"
        )
    split_dirs = [d for d in top if d.name in SPLITS]
    if not split_dirs:
        return _class_folder_files(domain_dir, None, wanted)
    if len(split_dirs) != len(top):
        others = ", ".join(d.name for d in top if d.name not in SPLITS)
        raise DatasetLayoutError(
            f"{domain_dir}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with "
            f"other folders ({others}); use either <split>/<class>/<image> for every image "
            "or <class>/<image> for every image"
        )
    files: list[ImageFile] = []
    for split_dir in split_dirs:
        files.extend(_class_folder_files(split_dir, split_dir.name, wanted))
    return files


def scan_unlabeled_folder(
    folder: Path, extensions: Iterable[str], root: Path | None = None
) -> list[ImageFile]:
    """Every image under ``folder`` at any depth, with no label and the split ``unlabeled``.

    Unlabelled images come as they were collected (dash-cam dumps, dated sub-folders), so no
    layout is required and folder names are not read as classes; an empty folder is a valid,
    empty pool. Hidden files and other extensions are skipped as in the labelled trees.
    """
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder}: unlabelled image folder not found")
    refuse_unsafe_entries(folder, root)
    wanted = _normalised_extensions(extensions)
    return [ImageFile(path, "", UNLABELED_SPLIT) for path in _image_files(folder, wanted)]


# --- hashing, decoding, splitting ------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    width: int
    height: int
    mode: str
    format: str
    bytes: int


def inspect_image(
    path: Path, accepted_formats: frozenset[str] | None = None, limits: ImageLimits | None = None
) -> ImageFacts | ImageProblem:
    """Check, hash and fully decode one file (``decode_image_file``, the one guarded decode);
    a problem instead of an exception. ``limits`` default to params.yaml's defaults."""
    limits = limits or ImageLimits()
    if accepted_formats is not None:
        limits = replace(limits, accepted_formats=accepted_formats)
    try:
        facts = decode_image_file(path, limits)
    except ImageRefusedError as refused:
        return ImageProblem(path, refused.reason)
    image = facts.image
    return ImageFacts(
        facts.sha256, image.width, image.height, image.mode, image.format, facts.bytes
    )


def split_for_content(sha256: str, fractions: SplitFractions) -> str:
    """Map a content hash to a split: stable as the dataset grows, identical bytes alike."""
    position = int(sha256[:16], 16) / 16**16
    if position < fractions.train:
        return "train"
    if position < fractions.train + fractions.val:
        return "val"
    return "test"


def inspect_images(
    paths: Sequence[Path],
    accepted_formats: frozenset[str] | None = None,
    limits: ImageLimits | None = None,
) -> list[ImageFacts | ImageProblem]:
    """``inspect_image`` over many files; decoders release the GIL, so threads scale."""
    inspect = partial(inspect_image, accepted_formats=accepted_formats, limits=limits)
    workers = max(1, min(MAX_DECODE_THREADS, os.cpu_count() or 1, len(paths)))
    if workers == 1:
        return [inspect(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="manifest") as pool:
        return list(pool.map(inspect, paths))


def _relative_posix(path: Path, root: Path) -> str:
    absolute = path.absolute()
    try:
        return absolute.relative_to(root.absolute()).as_posix()
    except ValueError:
        return absolute.as_posix()


def build_manifest(domain_dir: Path, domain: str, cfg: PrepareSection, root: Path) -> pd.DataFrame:
    """One row per image of ``domain_dir``; raises CorruptImageError listing every bad file."""
    frame, problems = build_manifest_with_problems(domain_dir, domain, cfg, root)
    if problems:
        raise CorruptImageError.from_problems(problems)
    return frame


def build_manifest_with_problems(
    domain_dir: Path, domain: str, cfg: PrepareSection, root: Path
) -> tuple[pd.DataFrame, list[ImageProblem]]:
    """The manifest of the files that pass the integrity rules, and a problem per other file."""
    files = scan_image_folder(domain_dir, cfg.extensions, root)
    return manifest_of_files(files, domain, cfg, root)


def build_unlabeled_manifest(
    folder: Path, cfg: PrepareSection, root: Path, domain: str = "target"
) -> pd.DataFrame:
    """One row per unlabelled image under ``folder``, under the labelled trees' integrity
    rules; raises CorruptImageError listing every bad file, as ``build_manifest`` does."""
    files = scan_unlabeled_folder(folder, cfg.extensions, root)
    frame, problems = manifest_of_files(files, domain, cfg, root)
    if problems:
        raise CorruptImageError.from_problems(problems)
    return frame


def manifest_of_files(
    files: Sequence[ImageFile], domain: str, cfg: PrepareSection, root: Path
) -> tuple[pd.DataFrame, list[ImageProblem]]:
    """Hash and decode ``files`` (threads): rows of those that pass, a problem per other one."""
    limits = ImageLimits.for_files(cfg.image_limits, cfg.extensions)
    results = inspect_images([f.path for f in files], limits=limits)
    problems = [r for r in results if isinstance(r, ImageProblem)]
    rows = []
    for file, facts in zip(files, results, strict=True):
        if isinstance(facts, ImageProblem):
            continue
        split = file.split or split_for_content(facts.sha256, cfg.split_fractions)
        rows.append(
            {
                "path": _relative_posix(file.path, root),
                "domain": domain,
                "label": file.label,
                "split": split,
                "sha256": facts.sha256,
                "width": facts.width,
                "height": facts.height,
                "mode": facts.mode,
                "format": facts.format,
                "bytes": facts.bytes,
            }
        )
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).astype(MANIFEST_DTYPES)
    return frame.sort_values("path", ignore_index=True), problems


def empty_manifest() -> pd.DataFrame:
    """No rows, every column: what prepare writes for an absent pool, so DVC's outs stay fixed."""
    return pd.DataFrame(columns=list(MANIFEST_COLUMNS)).astype(MANIFEST_DTYPES)


def drop_labelled_copies(
    pool: pd.DataFrame, labelled: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(kept, dropped)``: the pool without images byte-identical to a labelled one.

    Such an image is labelled already; kept in the pool it would be trained on twice, once
    with a guessed label, and a copy of a test image would let self-training see the test split.
    """
    copies = pool["sha256"].isin(set(labelled["sha256"]))
    return pool[~copies].reset_index(drop=True), pool[copies].reset_index(drop=True)


# --- files -----------------------------------------------------------------------------------


def write_manifest(df: pd.DataFrame, path: Path) -> Path:
    """Write atomically, so a crash never leaves a half-written manifest for DVC to cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.loc[:, list(MANIFEST_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")
    tmp.replace(path)
    return path


def read_manifest(path: Path, *, strict: bool = True) -> pd.DataFrame:
    """Read a manifest with its dtypes; ``strict=False`` lets validation report missing columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found; run the prepare stage first")
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if strict and missing:
        raise ValueError(
            f"{path}: manifest lacks column(s) {', '.join(missing)}; run the prepare stage again"
        )
    if strict:
        return pd.read_csv(path, dtype=MANIFEST_DTYPES, keep_default_na=False, na_values=[""])
    text_columns = {c: "str" for c in header if c not in INTEGER_COLUMNS}
    frame = pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values=[""])
    for column in INTEGER_COLUMNS:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def read_unlabeled_manifest(path: Path) -> pd.DataFrame:
    """The unlabelled target pool's manifest (``Layout.validated_unlabeled_manifest`` for
    training): one row per image, ``path`` relative to the project root, label missing (NaN).

    Zero rows when no pool is configured. Refuses a file holding labelled rows, so a labelled
    manifest passed by mistake cannot feed labelled images in as unlabelled ones.
    """
    frame = read_manifest(path)
    stray = frame[frame["split"] != UNLABELED_SPLIT]
    if len(stray):
        raise ValueError(
            f"{path}: not an unlabelled manifest: {len(stray)} row(s) with a split other than "
            f"{UNLABELED_SPLIT!r}, e.g. {stray['path'].iloc[0]}; read it with read_manifest"
        )
    return frame


def class_names(df: pd.DataFrame) -> tuple[str, ...]:
    return tuple(sorted(df["label"].dropna().unique()))
