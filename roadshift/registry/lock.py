"""The promotion lock: one promoter of a model at a time on one store.

The lock is a file lock beside a local store (SQLite or file), keyed on the store and the
model name. A remote tracking server has no file to lock beside: there the Prefect flow
holds the global concurrency limit ``roadshift-registry-<model>`` around registration
(``tasks/registry.py``), and this module takes no lock of its own.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from roadshift.errors import RoadshiftError

DEFAULT_LOCK_TIMEOUT_S = 600.0


# Defined beside the lock, the lowest module that raises it (a wait that times out); the
# promoters in roadshift.registry.aliases raise it too.
class PromotionError(RoadshiftError, ValueError):
    """An expected refusal to act (unknown version, no previous champion, missing reason):
    the CLI shows it as one line and exits 2."""


def _slug(model_name: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)[:80]
    return f"{readable}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"


def lock_path(store_uri: str, model_name: str) -> Path | None:
    """The promotion lock file for a local store, beside it; None for a remote store.

    SQLite: ``<db>.<model>-<hash>.promotion.lock`` next to the database file. File store:
    inside its folder. One file per store and model name, so promoters of one model on one
    store exclude each other and nothing else.
    """
    parsed = urlparse(store_uri)
    if parsed.scheme == "sqlite":
        raw = (
            store_uri[len("sqlite:///") :].split("?", 1)[0]
            if store_uri.startswith("sqlite:///")
            else ""
        )
        if not raw or raw == ":memory:":
            return None
        database = Path(unquote(raw))
        return database.with_name(f"{database.name}.{_slug(model_name)}.promotion.lock")
    if parsed.scheme == "file" or (parsed.scheme == "" and store_uri):
        folder = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(store_uri)
        return folder / f".{_slug(model_name)}.promotion.lock"
    return None


def registry_limit_name(model_name: str) -> str:
    """The Prefect global concurrency limit that serialises registration on remote stores."""
    return f"roadshift-registry-{model_name}"


@contextmanager
def promotion_lock(
    store_uri: str, model_name: str, timeout: float = DEFAULT_LOCK_TIMEOUT_S
) -> Iterator[str]:
    """Hold the promotion lock of ``model_name`` on ``store_uri``; yields what was locked.

    Waits up to ``timeout`` seconds, then raises ``PromotionError`` naming the lock file.
    """
    path = lock_path(store_uri, model_name)
    if path is None:
        yield (
            f"no file lock: {store_uri} is not a local store; the training-pipeline flow "
            f"serialises registration with the Prefect global concurrency limit "
            f"{registry_limit_name(model_name)!r}"
        )
        return
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    # One instance per file, re-entrant within a thread (registration holds the lock around
    # the decision, which takes it again); other threads and processes wait.
    lock = FileLock(str(path), is_singleton=True)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise PromotionError(
            f"waited {timeout:g} s for the promotion lock {path} of {model_name!r}; another "
            "promotion of it is still running"
        ) from None
    try:
        yield f"file lock {path}"
    finally:
        lock.release()
