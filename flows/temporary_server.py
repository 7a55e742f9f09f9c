"""Prefect's temporary server, started early by ``roadshift run``."""

from __future__ import annotations

import contextlib
import threading
from contextlib import AbstractContextManager


def start_temporary_prefect_server() -> threading.Thread | None:
    """With no Prefect API configured, a flow runs on Prefect's temporary server, which
    the flow's first API call starts and then waits ~3 s for. Started from here, in a
    thread, it boots while the flow's modules import; the flow finds it running, as if it
    had started it itself. If this start fails, the flow's own attempt reports why."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        with contextlib.suppress(Exception):
            SubprocessASGIServer().start()

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread


def without_heartbeats() -> AbstractContextManager:
    """Flow runs send heartbeats so that a server can tell a crashed run from a slow one.
    The temporary server ends with this process and has no use for them, and stopping
    the heartbeat thread at the end of a run takes up to a second (it sleeps in 1 s steps)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
