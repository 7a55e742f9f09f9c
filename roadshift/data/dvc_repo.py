"""The one way roadshift opens a DVC repository through DVC's Python API.

Two DVC habits need handling wherever the API is used in-process: stage and
output paths are resolved against the working directory (not the repo root),
and DVC's console handlers keep the ``sys.stdout``/``sys.stderr`` that existed
when ``dvc`` was first imported, which may since have been replaced or closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from roadshift.config import DOMAINS, UNLABELED_POOL, Params
from roadshift.layout import Layout

UNKNOWN = "unknown"
UNLABELED_KEY = "data.target.unlabeled_path"
_DVC_LOGGERS = ("dvc", "dvc_objects", "dvc_data")
# Which DVC remote the pipeline pushes to and a deployment pulls from; unset: core.remote.
# An environment switch, so one committed .dvc/config serves a laptop and a team stack.
DVC_REMOTE_ENV = "ROADSHIFT_DVC_REMOTE"


def chosen_remote(repo=None) -> str | None:
    """The remote named by ``ROADSHIFT_DVC_REMOTE``, checked against ``repo``'s config if given."""
    name = os.environ.get(DVC_REMOTE_ENV, "").strip() or None
    if name is None or repo is None:
        return name
    configured = sorted(repo.config.get("remote", {}))
    if name not in configured:
        from roadshift.config import ConfigError

        raise ConfigError(
            f"{DVC_REMOTE_ENV}={name}: no DVC remote of that name in {repo.root_dir}/.dvc/config "
            f"(configured: {', '.join(configured) or 'none'}); add it with "
            f"`dvc remote add {name} <url>` or unset {DVC_REMOTE_ENV}"
        )
    return name


def remote_option() -> list[str]:
    """``["-r", name]`` for ``dvc push/pull`` when a remote is chosen, else nothing."""
    name = chosen_remote()
    return ["-r", name] if name else []


def _rebind_console_handlers() -> None:
    """Point DVC's handlers at today's streams; stop Prefect's root handler repeating them."""
    from dvc.logger import LoggerHandler

    for name in _DVC_LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = False
        for handler in logger.handlers:
            if isinstance(handler, LoggerHandler):
                wants_stderr = handler.level >= logging.WARNING
                # not setStream(): it flushes the old stream, which may be closed
                handler.stream = sys.stderr if wants_stderr else sys.stdout


@contextmanager
def open_repo(root: Path) -> Iterator:
    """A DVC ``Repo`` at ``root``, with the working directory there while it is open (DVC
    resolves stage and output paths against it)."""
    from dvc.repo import Repo

    if not (Path(root) / ".dvc").is_dir():
        raise FileNotFoundError(f"{Path(root) / '.dvc'}: not a DVC project; run `dvc init` first")
    _rebind_console_handlers()
    with contextlib.chdir(root), Repo(str(root)) as repo:
        yield repo


def _project_folder(key: str, configured: Path, root: Path) -> Path:
    from roadshift.config import ConfigError

    folder = (configured if configured.is_absolute() else root / configured).resolve()
    if root not in folder.parents:
        raise ConfigError(
            f"{key}: {configured} is outside the project {root}; DVC versions "
            "only folders inside it: copy or move the tree under data/ and point the key there"
        )
    if not folder.is_dir():
        raise ConfigError(f"{key}: folder {folder} does not exist")
    return folder


def _overlap(a: Path, b: Path) -> bool:
    """One folder is the other or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def domain_folders(params, root: Path) -> dict[str, Path]:
    """Each domain's data folder and the unlabelled target pool (``target_unlabeled``),
    refused up front if DVC could not version them or dvc.yaml could not depend on them."""
    from roadshift.config import DOMAINS, ConfigError

    root = Path(root).resolve()
    folders = {
        domain: _project_folder(f"data.{domain}.path", params.data.domain(domain).path, root)
        for domain in DOMAINS
    }
    pool = params.data.target.unlabeled_path
    if pool is None:
        # dvc.yaml's prepare stage names ${data.target.unlabeled_path} as a dependency, and
        # DVC templating has no optional entries: a null there stops `dvc repro` unexplained.
        raise ConfigError(
            f"{UNLABELED_KEY}: not set, but dvc.yaml's prepare stage depends on the folder it "
            "names (DVC has no optional dependencies); point it at a folder of unlabelled "
            "target images, or at an empty folder for none, e.g. `mkdir -p "
            "data/raw/target_unlabeled` and data.target.unlabeled_path: data/raw/target_unlabeled"
        )
    folders[UNLABELED_POOL] = _project_folder(UNLABELED_KEY, pool, root)
    for domain in DOMAINS:
        if _overlap(folders[domain], folders[UNLABELED_POOL]):
            raise ConfigError(
                f"{UNLABELED_KEY}: {pool} and data.{domain}.path "
                f"({params.data.domain(domain).path}) overlap; DVC versions each folder on its "
                "own and the labelled tree would read the pool as a class: keep the unlabelled "
                "images in a folder beside the labelled trees"
            )
    return folders


def pull_domain_data(params, root: Path) -> dict[str, str]:
    """Fetch each domain's committed data version from the chosen remote into the checkout.

    What a fresh clone (a deployment's worker, a colleague) runs before the pipeline:
    the ``.dvc`` pointers come with git, the images from the DVC remote.
    """
    from roadshift.config import DOMAINS
    from roadshift.layout import Layout

    root = Path(root).resolve()
    layout = Layout(root)
    pointers = {d: layout.data_pointer(params.data.domain(d).path) for d in DOMAINS}
    if params.data.target.unlabeled_path is not None:
        pointers[UNLABELED_POOL] = layout.data_pointer(params.data.target.unlabeled_path)
    with open_repo(root) as repo:
        remote = chosen_remote(repo)
        missing = [str(p) for p in pointers.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{', '.join(missing)}: no DVC pointer committed for this data; on the machine "
                "that has the images run `dvc add` (or `roadshift run`), commit the .dvc files "
                "and push them"
            )
        try:
            repo.pull(targets=[str(p) for p in pointers.values()], remote=remote)
        except Exception as error:
            from dvc.exceptions import DvcException

            if not isinstance(error, DvcException):
                raise
            name = remote or repo.config["core"].get("remote", "(no default remote)")
            raise FileNotFoundError(
                f"DVC could not fetch the data versions "
                f"{', '.join(f'{d} {dvc_data_version(p)}' for d, p in pointers.items())} "
                f"from remote {name!r}: {error}"
            ) from error
    return {d: dvc_data_version(p) or "unknown" for d, p in pointers.items()}


def dvc_data_version(pointer_file: Path) -> str | None:
    """``outs[0].md5`` of a ``.dvc`` file (``<md5>.dir`` for a folder), or None if there is none."""
    pointer_file = Path(pointer_file)
    if not pointer_file.is_file():
        return None
    try:
        content = yaml.safe_load(pointer_file.read_text()) or {}
        return str(content["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise ValueError(
            f"{pointer_file}: not a DVC pointer file (expected outs[0].md5); "
            "recreate it with `dvc add`"
        ) from None


def data_versions(params: Params, root: Path) -> dict[str, str]:
    """Each domain's DVC data version, ``"unknown"`` where its folder is not DVC-tracked; with
    an unlabelled pool configured, its version too (``target_unlabeled``), since what the
    model self-trained on is part of what it was made from."""
    layout = Layout(root)
    versions = {
        domain: dvc_data_version(layout.data_pointer(params.data.domain(domain).path)) or UNKNOWN
        for domain in DOMAINS
    }
    pool = params.data.target.unlabeled_path
    if pool is not None:
        versions[UNLABELED_POOL] = dvc_data_version(layout.data_pointer(pool)) or UNKNOWN
    return versions
