"""Prefect's temporary server, started by ``roadshift run`` before anything heavy is imported.

With no Prefect API configured, a flow starts Prefect's temporary server on its first API
call and waits for it to boot (~3 s here), after importing ``prefect.server.api.server``
(~1.3 s) only to launch it. ``roadshift run`` launches the same server itself, with the
same command and settings as Prefect's ``SubprocessASGIServer`` (uvicorn, Prefect's app
factory, no UI, ephemeral mode, a free port on 127.0.0.1, the database under
``PREFECT_HOME``), as soon as it knows no API is configured; it boots while the flow's
modules import, and the flow runs against it as it would against any server.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

API_URL_ENV = "PREFECT_API_URL"
BOOT_TIMEOUT_S = 60.0  # Prefect's own default wait for its temporary server is 20 s
# what Prefect's SubprocessASGIServer sets: no UI, the server knows it is ephemeral
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class TemporaryPrefectServer:
    process: subprocess.Popen
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_until_up(self, timeout_s: float = BOOT_TIMEOUT_S) -> str | None:
        """None once it answers ``/health``; else why not (it exited, or it is too slow)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"it exited with status {self.process.returncode}"
            health = f"{self.api_url}/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as answer:
                if answer.status == 200:
                    return None
            time.sleep(0.05)
        return f"it did not answer within {timeout_s:.0f} s"

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_temporary_prefect_server() -> TemporaryPrefectServer | None:
    """Launch the server if this run would need Prefect's temporary one; None otherwise
    (a configured ``PREFECT_API_URL``, from the environment or a Prefect profile, or
    ``PREFECT_SERVER_EPHEMERAL_ENABLED`` off). Imports only Prefect's settings."""
    import prefect
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        get_current_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    port = _free_port()
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
        "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    settings = get_current_settings().to_environment_variables(exclude_unset=True)
    env = {**os.environ, **SERVER_ENV, **settings}
    server = TemporaryPrefectServer(subprocess.Popen(command, env=env), port)
    # stopped as Prefect stops its own: by an atexit handler, which runs after Prefect's
    # log and event workers have sent what they still hold (threading's exit hooks)
    atexit.register(server.stop)
    return server


@contextmanager
def _api_url_everywhere(url: str) -> Iterator[None]:
    """``PREFECT_API_URL`` in the environment and Prefect's process-wide settings, so that
    every thread (Prefect's own log and event workers too) uses this server: a thread
    that saw no API URL would start Prefect's own temporary server beside it."""
    from prefect.context import refresh_global_settings_context

    before = os.environ.get(API_URL_ENV)
    os.environ[API_URL_ENV] = url
    refresh_global_settings_context()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(API_URL_ENV, None)
        else:
            os.environ[API_URL_ENV] = before
        refresh_global_settings_context()


@contextmanager
def running_against(server: TemporaryPrefectServer) -> Iterator[None]:
    """Prefect pointed at ``server`` (once it is up) while the flow runs.

    Without heartbeats: a flow run sends them so that a server can tell a crashed run
    from a slow one, but this server ends with the run, and stopping the heartbeat thread
    at the end takes up to a second (it sleeps in 1 s steps). If the server did not come
    up, the flow is left to start Prefect's own temporary server, which reports why.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    problem = server.wait_until_up()
    if problem is not None:
        print(
            f"roadshift: the early Prefect server on port {server.port}: {problem}; "
            "Prefect starts its own",
            file=sys.stderr,
        )
        yield
        return
    with (
        _api_url_everywhere(server.api_url),
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield
