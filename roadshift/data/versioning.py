"""Add labelled images to a domain and record the result as a new DVC data version.

New labels arrive as ``<incoming>/<class>/<image>``; they join the domain's
ImageFolder tree (under ``train/`` when the domain uses split folders, so the
fixed test split never changes) and ``dvc add`` turns the folder into a new
version, the md5 the pipeline records as ``data.<domain>.version``.

Nothing becomes a data version unchecked: ``verify_data_folders`` runs prepare's own scan
(layout, no links or special files, every image decoded within ``prepare.image_limits``) on
each folder before ``dvc add``, so a refused tree leaves the previous ``.dvc`` pointer as it
was; ``data add`` checks every incoming file the same way and copies nothing unless all pass.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from roadshift.config import DOMAINS, SPLITS, UNLABELED_POOL, Params
from roadshift.data.dvc_repo import domain_folders, dvc_data_version, open_repo
from roadshift.data.images import ImageLimits
from roadshift.data.manifest import (
    ImageProblem,
    build_manifest,
    build_unlabeled_manifest,
    inspect_images,
    refuse_unsafe_entries,
)
from roadshift.errors import RoadshiftError
from roadshift.layout import Layout


class DataAddError(RoadshiftError, ValueError):
    """Incoming images that cannot be added as they are; the message says which and why."""


class UnknownClassError(DataAddError):
    """Incoming images name classes the domain does not have."""


class NameClashError(RoadshiftError, FileExistsError):
    """An incoming file would overwrite an image already in the domain."""


class DataVersionRefusedError(RoadshiftError, ValueError):
    """A data folder that fails prepare's checks and so is not recorded as a data version."""


@dataclass(frozen=True)
class DataAddResult:
    domain_dir: Path
    copied: tuple[Path, ...]
    old_version: str | None
    new_version: str | None
    # target only: pool images now labelled, removed from the pool in the same data version
    removed_from_pool: tuple[Path, ...] = ()
    pool_versions: tuple[str | None, str | None] | None = None


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def uses_split_folders(domain_dir: Path) -> bool:
    return any((domain_dir / split).is_dir() for split in SPLITS)


def domain_classes(domain_dir: Path) -> set[str]:
    if not uses_split_folders(domain_dir):
        return {d.name for d in _visible_dirs(domain_dir)}
    return {
        d.name
        for split in SPLITS
        if (domain_dir / split).is_dir()
        for d in _visible_dirs(domain_dir / split)
    }


def plan_copies(
    incoming: Path, domain_dir: Path, extensions: tuple[str, ...]
) -> list[tuple[Path, Path]]:
    """(source, destination) per image; refuses unknown classes, stray files and overwrites."""
    known = domain_classes(domain_dir)
    class_dirs = _visible_dirs(incoming)
    if not class_dirs:
        raise DataAddError(f"{incoming}: no class folders; expected <path>/<class>/<image>")
    unknown = sorted(d.name for d in class_dirs if d.name not in known)
    if unknown:
        raise UnknownClassError(
            f"{incoming}: unknown class folder(s) {', '.join(unknown)}; "
            f"{domain_dir} has {', '.join(sorted(known)) or 'no classes'}"
        )
    destination_root = domain_dir / "train" if uses_split_folders(domain_dir) else domain_dir
    allowed = {e.lower() for e in extensions}
    plan, strays, clashes = [], [], []
    for class_dir in class_dirs:
        for path in sorted(class_dir.iterdir()):
            if path.name.startswith(".") or path.is_dir():
                continue
            if path.suffix.lower() not in allowed:
                strays.append(path)
                continue
            destination = destination_root / class_dir.name / path.name
            (clashes if destination.exists() else plan).append((path, destination))
    if strays:
        raise DataAddError(
            f"{incoming}: not image files (prepare.extensions = {', '.join(sorted(allowed))}): "
            + ", ".join(str(p) for p in strays[:5])
        )
    if clashes:
        raise NameClashError(
            f"{clashes[0][1]}: already exists; rename the incoming file {clashes[0][0]} "
            f"({len(clashes)} name clash(es) in all, nothing copied)"
        )
    if not plan:
        raise DataAddError(f"{incoming}: no images to add")
    return plan


def check_incoming(plan: list[tuple[Path, Path]], params: Params) -> None:
    """Every incoming image through the integrity pass ``data validate`` and prepare use
    (decoded whole, within ``prepare.image_limits``, a format of ``prepare.extensions``);
    one error naming every file that fails, before anything is copied."""
    limits = ImageLimits.for_files(params.prepare.image_limits, params.prepare.extensions)
    results = inspect_images([source for source, _ in plan], limits=limits)
    problems = [r for r in results if isinstance(r, ImageProblem)]
    if problems:
        listed = "\n".join(f"  {p.path}: {p.reason}" for p in problems)
        raise DataAddError(
            f"{len(problems)} incoming file(s) failed the integrity check; nothing was copied "
            f"or versioned. Remove or re-export each one, then run `roadshift data add` "
            f"again:\n{listed}"
        )


def verify_data_folders(params: Params, root: Path, folders: dict[str, Path]) -> None:
    """Prepare's scan of each folder (keys: ``source``, ``target``, ``target_unlabeled``)
    before it may become a data version: the layout, no links or special files, every
    image whole and within ``prepare.image_limits``. Raises ``DataVersionRefusedError``
    naming the folder, its ``.dvc`` pointer (left as it was) and each offending file."""
    layout = Layout(root)
    for name, folder in folders.items():
        try:
            if name in DOMAINS:
                build_manifest(folder, name, params.prepare, root)
            elif name == UNLABELED_POOL:
                build_unlabeled_manifest(folder, params.prepare, root)
        except RoadshiftError as error:
            pointer = layout.data_pointer(folder)
            kept = f"{pointer} keeps its previous version" if pointer.is_file() else "no .dvc"
            raise DataVersionRefusedError(
                f"{folder}: not recorded as a new data version ({kept}): {error}"
            ) from None


def copy_planned(plan: list[tuple[Path, Path]]) -> tuple[Path, ...]:
    for source, destination in plan:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
    return tuple(destination for _, destination in plan)


def dvc_add(root: Path, folder: Path, *more: Path) -> None:
    """One ``dvc add`` of every folder given: the new versions are recorded together."""
    with open_repo(root) as repo:
        repo.add([str(folder), *(str(f) for f in more)])


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def add_domain_data(params: Params, root: Path, domain: str, incoming: Path) -> DataAddResult:
    """Copy ``incoming`` into the domain (in place if already inside it), then version it.

    Checked first, in this order, and nothing copied or versioned unless all pass: the
    domain as it is (``verify_data_folders``), links and special files in ``incoming``, its
    class names and file names (``plan_copies``), then every incoming image (``check_incoming``).
    """
    configured = params.data.domain(domain).path
    domain_dir = (configured if configured.is_absolute() else root / configured).resolve()
    incoming = incoming.resolve()
    if not domain_dir.is_dir():
        raise FileNotFoundError(f"{domain_dir}: data.{domain}.path folder not found")
    if not incoming.is_dir():
        raise FileNotFoundError(f"{incoming}: folder of new images not found")
    pointer = Layout(root).data_pointer(domain_dir)
    old_version = dvc_data_version(pointer)
    verify_data_folders(params, root, {domain: domain_dir})
    copied: tuple[Path, ...] = ()
    if not _is_within(incoming, domain_dir):
        refuse_unsafe_entries(incoming, root)
        plan = plan_copies(incoming, domain_dir, params.prepare.extensions)
        check_incoming(plan, params)
        copied = copy_planned(plan)
    pool_dir = unlabeled_pool_dir(params, root) if domain == "target" else None
    if pool_dir is None:
        dvc_add(root, domain_dir)
        return DataAddResult(domain_dir, copied, old_version, dvc_data_version(pointer))
    removed, pool_versions = drain_labelled_from_pool(params, root, pool_dir, domain_dir)
    return DataAddResult(
        domain_dir, copied, old_version, dvc_data_version(pointer), removed, pool_versions
    )


def unlabeled_pool_dir(params: Params, root: Path) -> Path | None:
    """The unlabelled target pool's folder, if one is configured and exists."""
    configured = params.data.target.unlabeled_path
    if configured is None:
        return None
    folder = (configured if configured.is_absolute() else root / configured).resolve()
    return folder if folder.is_dir() else None


def drain_labelled_from_pool(
    params: Params, root: Path, pool_dir: Path, domain_dir: Path
) -> tuple[tuple[Path, ...], tuple[str | None, str | None]]:
    """Remove from the pool every image the target tree now holds, then version the target
    and the pool in one ``dvc add``: a labelled image never stays behind as unlabelled."""
    from roadshift.data.pool import remove_labelled_from_pool

    pool_pointer = Layout(root).data_pointer(pool_dir)
    old = dvc_data_version(pool_pointer)
    removed = remove_labelled_from_pool(pool_dir, [domain_dir], params.prepare.extensions)
    dvc_add(root, domain_dir, pool_dir)
    return removed, (old, dvc_data_version(pool_pointer))


@dataclass(frozen=True)
class PoolAddResult:
    pool_dir: Path
    copied: tuple[Path, ...]
    already_in_pool: tuple[Path, ...]
    already_labelled: tuple[Path, ...]
    old_version: str | None
    new_version: str | None


def keep_unlabeled_images(
    params: Params, root: Path, paths: list[Path], batch_name: str
) -> PoolAddResult:
    """Copy scored production images into the unlabelled pool (by content: none twice, none
    already labelled) and record the pool as a new DVC data version."""
    from roadshift.config import ConfigError
    from roadshift.data.pool import keep_in_pool

    configured = params.data.target.unlabeled_path
    if configured is None:
        raise ConfigError(
            "data.target.unlabeled_path: not set, so there is no unlabelled pool to keep the "
            "images in; point it at a folder inside the project (e.g. data/raw/target_unlabeled)"
        )
    pool_dir = (configured if configured.is_absolute() else root / configured).resolve()
    target_dir = params.data.target.path
    target_dir = (target_dir if target_dir.is_absolute() else root / target_dir).resolve()
    pointer = Layout(root).data_pointer(pool_dir)
    old_version = dvc_data_version(pointer)
    pool_dir.mkdir(parents=True, exist_ok=True)
    domain_folders(params, root)  # inside the project, not overlapping a labelled tree
    kept = keep_in_pool(paths, pool_dir, [target_dir], params.prepare.extensions, batch_name)
    dvc_add(root, pool_dir)
    return PoolAddResult(
        pool_dir,
        kept.copied,
        kept.already_in_pool,
        kept.already_labelled,
        old_version,
        dvc_data_version(pointer),
    )
