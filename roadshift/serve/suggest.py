"""``roadshift label suggest``: the unlabelled pool ranked by the champion, ready to sort.

The ranking is ``roadshift.transfer.suggest`` (uncertainty x diversity, spread over the
predicted classes, never a labelled image or a near-duplicate of one). This module feeds it
the champion's view of the pool and of the labelled target tree, and writes what a person
needs: the chosen files in one folder with an empty ``<class>/`` folder per class to sort them
into, ``suggestions.csv`` (why each was chosen) and ``contact_sheet.png``. Sorting done,
``roadshift data add target <folder>`` versions the labels and takes them out of the pool.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from roadshift.config import Params
from roadshift.data.contact_sheet import draw_numbered_sheet
from roadshift.data.pool import difference_hash, images_in, sha256_of
from roadshift.errors import RoadshiftError
from roadshift.serve.features import LoadedModel, features_of
from roadshift.transfer.suggest import Suggestion, exclusions, rank_for_labelling

CSV_NAME = "suggestions.csv"
SHEET_NAME = "contact_sheet.png"
README_NAME = "HOW-TO-LABEL.txt"
CSV_COLUMNS = (
    "rank",
    "file",
    "pool_path",
    "predicted_label",
    "confidence",
    "uncertainty",
    "distance",
    "why_chosen",
)


class SuggestError(RoadshiftError):
    """Nothing to suggest from, or nowhere to write the suggestions."""


@dataclass(frozen=True)
class SuggestResult:
    out_dir: Path
    csv: Path
    sheet: Path
    chosen: tuple[Suggestion, ...]
    files: tuple[Path, ...]  # the copies in out_dir, in rank order
    pool_images: int
    excluded: dict[str, int]  # why -> how many pool images were never candidates


def _folder(configured: Path | None, root: Path) -> Path | None:
    if configured is None:
        return None
    return configured if configured.is_absolute() else root / configured


def _pool_paths(params: Params, root: Path) -> list[Path]:
    pool = _folder(params.data.target.unlabeled_path, root)
    if pool is None or not pool.is_dir():
        raise SuggestError(
            f"data.target.unlabeled_path: {params.data.target.unlabeled_path} is not a folder; "
            "keep production images in the pool with `roadshift predict <folder> "
            "--keep-unlabelled` or point the key at your unlabelled images"
        )
    paths = images_in(pool, params.prepare.extensions)
    if not paths:
        raise SuggestError(
            f"{pool}: the unlabelled pool holds no images; keep production images in it with "
            "`roadshift predict <folder> --keep-unlabelled`"
        )
    return paths


def _empty_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SuggestError(
            f"{out_dir}: exists and is not empty; pass a new --out folder (a labelling batch "
            "is one folder, so two batches never mix)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _copy_name(path: Path, digest: str) -> str:
    """Unique by content, so it never clashes with a file already in the target tree."""
    stem = path.stem if path.stem.endswith(digest[:12]) else f"{path.stem}-{digest[:12]}"
    return f"{stem}{path.suffix.lower()}"


def _hashes(paths: list[Path]) -> np.ndarray:
    return np.array([difference_hash(p) for p in paths], dtype=np.uint64)


def suggest_for_labelling(
    loaded: LoadedModel, params: Params, root: Path, n: int, out_dir: Path
) -> SuggestResult:
    """Rank the pool with ``loaded`` and write the ``n`` chosen images to ``out_dir``."""
    root = Path(root)
    pool_paths = _pool_paths(params, root)
    target = _folder(params.data.target.path, root)
    labelled_paths = images_in(target, params.prepare.extensions) if target else []
    out_dir = _empty_out_dir(Path(out_dir))
    digests = [sha256_of(p) for p in pool_paths]
    labelled_digests = {sha256_of(p) for p in labelled_paths}
    pool = features_of(loaded, pool_paths)
    labelled = features_of(loaded, labelled_paths)
    cfg = params.suggest
    skip = exclusions(
        pool.embeddings.numpy(),
        labelled.embeddings.numpy(),
        _hashes(pool_paths),
        _hashes(labelled_paths),
        np.array([d in labelled_digests for d in digests]),
        cfg.near_duplicate_cosine,
        cfg.near_duplicate_hash_bits,
    )
    chosen = rank_for_labelling(
        pool.embeddings.numpy(),
        pool.probabilities,
        loaded.spec.class_names,
        labelled.embeddings.numpy(),
        n,
        uncertainty=cfg.uncertainty,
        uncertainty_weight=cfg.uncertainty_weight,
        excluded=skip.mask,
    )
    for class_name in loaded.spec.class_names:
        (out_dir / class_name).mkdir(exist_ok=True)
    files = []
    for suggestion in chosen:
        source = pool_paths[suggestion.index]
        destination = out_dir / _copy_name(source, digests[suggestion.index])
        shutil.copyfile(source, destination)
        files.append(destination)
    csv_path = _write_csv(out_dir / CSV_NAME, chosen, files, pool_paths, root)
    sheet = _write_sheet(out_dir / SHEET_NAME, chosen, files)
    (out_dir / README_NAME).write_text(_how_to(out_dir, loaded.spec.class_names))
    why: dict[str, int] = {}
    for reason in skip.reasons.values():
        key = reason.split(" (")[0]
        why[key] = why.get(key, 0) + 1
    return SuggestResult(
        out_dir, csv_path, sheet, tuple(chosen), tuple(files), len(pool_paths), why
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _write_csv(
    out: Path, chosen: list[Suggestion], files: list[Path], pool: list[Path], root: Path
) -> Path:
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for suggestion, file in zip(chosen, files, strict=True):
            writer.writerow(
                (
                    suggestion.rank,
                    file.name,
                    _relative(pool[suggestion.index], root),
                    suggestion.label,
                    f"{suggestion.confidence:.4f}",
                    f"{suggestion.uncertainty:.4f}",
                    f"{suggestion.distance:.4f}",
                    suggestion.reason,
                )
            )
    return out


def _write_sheet(out: Path, chosen: list[Suggestion], files: list[Path]) -> Path:
    """Grouped by the predicted label, so a person confirms runs of one class at a time."""
    order = sorted(range(len(chosen)), key=lambda k: (chosen[k].label, chosen[k].rank))
    items = [
        (files[k], f"#{chosen[k].rank} {chosen[k].label}\np={chosen[k].confidence:.2f}")
        for k in order
    ]
    return draw_numbered_sheet(items, out)


def _how_to(out_dir: Path, class_names: tuple[str, ...]) -> str:
    return (
        "Labelling batch suggested by `roadshift label suggest`.\n\n"
        "1. Look at contact_sheet.png (numbers = rank in suggestions.csv; the label shown is\n"
        "   the model's guess, not the truth).\n"
        "2. Move each image into the folder of its true class: "
        + ", ".join(class_names)
        + ".\n   Leave an image here if you cannot tell; it stays in the unlabelled pool.\n"
        f"3. roadshift data add target {out_dir}\n"
        "   (a new data version; the labelled images leave the unlabelled pool)\n"
        "4. roadshift run\n"
    )
