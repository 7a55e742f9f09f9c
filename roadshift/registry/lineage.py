"""What a model was made from: the git commit, each domain's DVC data version, the params.

These become tags on every registered model version, so an auditor can rebuild
version N from ``git.commit`` + ``data.<domain>.version`` + ``params.hash``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

from roadshift.config import Params, params_to_dict
from roadshift.data.dvc_repo import UNKNOWN, data_versions

_CHUNK = 1 << 20

# DVC rewrites these on every `dvc add`/`dvc repro`; the data versions they hold
# are recorded as tags of their own, so they do not make the code "dirty".
_DVC_BOOKKEEPING = (":(exclude)dvc.lock", ":(exclude,glob)**/*.dvc")


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    except (FileNotFoundError, NotADirectoryError):  # no git binary, or no such folder
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(root: Path) -> str:
    """The full sha of HEAD, or ``"unknown"`` outside a git repository (or before a commit)."""
    return _git(root, "rev-parse", "--verify", "HEAD") or UNKNOWN


def git_is_dirty(root: Path) -> bool:
    """Whether tracked files differ from HEAD, DVC's own bookkeeping files aside.

    Untracked files are ignored: pipeline outputs such as ``metrics/*.json`` are
    untracked until someone commits them, and they do not change how the model
    is rebuilt from the commit.
    """
    status = _git(
        root, "status", "--porcelain", "--untracked-files=no", "--", ".", *_DVC_BOOKKEEPING
    )
    return bool(status)


def uncommitted_dvc_files(root: Path) -> list[str]:
    """DVC's pointer and lock files that differ from HEAD (or are new): committing them
    records which data and models a run used. Empty outside git."""
    status = _git(root, "status", "--porcelain", "--", "dvc.lock", "*.dvc")
    return [line[3:] for line in (status or "").splitlines() if line[3:]]


def params_hash(params: Params) -> str:
    """sha256 of the params as canonical JSON: equal params give an equal hash, however written."""
    canonical = json.dumps(params_to_dict(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lineage_tags(
    params: Params, root: Path, extra: Mapping[str, object] | None = None
) -> dict[str, str]:
    tags = {
        "git.commit": git_commit(root),
        "git.dirty": str(git_is_dirty(root)).lower(),
        **{f"data.{domain}.version": v for domain, v in data_versions(params, root).items()},
        "params.hash": params_hash(params),
    }
    tags.update({key: str(value) for key, value in (extra or {}).items()})
    return tags


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def directory_digest(path: Path) -> str:
    """sha256 over every file's relative path and content hash: names and bytes, not mtimes."""
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()
