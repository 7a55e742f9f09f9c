"""The one way roadshift opens a DVC repository through DVC's Python API.

Two DVC habits need handling wherever the API is used in-process: stage and
output paths are resolved against the working directory (not the repo root),
and DVC's console handlers keep the ``sys.stdout``/``sys.stderr`` that existed
when ``dvc`` was first imported, which may since have been replaced or closed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_DVC_LOGGERS = ("dvc", "dvc_objects", "dvc_data")


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
    from dvc.repo import Repo

    if not (Path(root) / ".dvc").is_dir():
        raise FileNotFoundError(f"{Path(root) / '.dvc'}: not a DVC project; run `dvc init` first")
    _rebind_console_handlers()
    with contextlib.chdir(root), Repo(str(root)) as repo:
        yield repo


def domain_folders(params, root: Path) -> dict[str, Path]:
    """Each domain's data folder, refused up front if DVC could not version it."""
    from roadshift.config import DOMAINS, ConfigError

    root = Path(root).resolve()
    folders = {}
    for domain in DOMAINS:
        configured = params.data.domain(domain).path
        folder = (configured if configured.is_absolute() else root / configured).resolve()
        if root not in folder.parents:
            raise ConfigError(
                f"data.{domain}.path: {configured} is outside the project {root}; DVC versions "
                "only folders inside it: copy or move the tree under data/ and point the key there"
            )
        if not folder.is_dir():
            raise ConfigError(f"data.{domain}.path: folder {folder} does not exist")
        folders[domain] = folder
    return folders
