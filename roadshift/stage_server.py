"""A warm process for ``roadshift stage``: the heavy imports happen once per pipeline run.

DVC runs every stage as its own command, and each ``roadshift stage`` process spent
4-5 s of a 3-15 s stage importing torch, torchvision, MLflow, pandas, scikit-learn and
Great Expectations and opening the MLflow store, before any work. While the pipeline
flow runs its stages it keeps one server process that has done all of that; each stage
command DVC starts becomes a thin client that hands the server its arguments, working
directory, environment and its stdin/stdout/stderr, and the server forks a child that
runs the stage exactly as the command would have. DVC, ``dvc.lock`` and ``dvc repro``
see nothing different: the command, its output, its exit status and its signals are
those of the stage.

Why fork and not run in the server: every stage gets a fresh copy of the warm
interpreter, so no state (torch's RNG, MLflow's active run, memory) leaks from one
stage into the next, a crash takes down one child only, and the child exits like a
normal process (atexit handlers, thread joins, flushed streams).

Linux only (fork after importing torch is safe there as long as the server itself runs
no torch ops, which it never does). ``ROADSHIFT_WARM_STAGES=0`` turns it off; a client
that finds no server runs the stage itself.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

SOCKET_ENV = "ROADSHIFT_STAGE_SERVER"
SWITCH_ENV = "ROADSHIFT_WARM_STAGES"

# What the stage commands import, at module level or inside the functions they call, so
# that a forked child starts with it in memory. A module missing here only costs time.
# The first stages' modules load at once; the training ones only after the first stage
# has been forked (while it runs), so that a run with nothing to do pays little for them.
FIRST_STAGES_MODULES = (
    "roadshift.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.artifact.local_artifact_repo",
    "roadshift.distributed",
    "roadshift.stages.prepare",
    "great_expectations",
    "great_expectations.data_context.types.base",
    "roadshift.stages.validate",
)
TRAINING_MODULES = (
    "torch.distributed",
    "torchvision.models",
    "roadshift.stages.pretrain",
    "roadshift.stages.finetune",
    "roadshift.stages.scratch",
    "roadshift.lr_finder",
    "sklearn.linear_model",
    "sklearn.model_selection",
    "roadshift.stages.evaluate",
    "roadshift.eval_report",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
)

_HEADER = struct.Struct("!Q")  # length of the JSON request that follows
_STATUS = struct.Struct("!i")  # the child's pid, then its exit status
_STDIO = (0, 1, 2)


def warm_stages_enabled() -> bool:
    return sys.platform == "linux" and os.environ.get(SWITCH_ENV, "1").strip() not in {
        "0",
        "false",
        "no",
        "off",
    }


# --- client: what `roadshift stage ...` does when the flow's server is up --------------------


def _stdio_fds() -> list[int]:
    """Our stdin/stdout/stderr to hand over; a closed one is replaced by /dev/null."""
    fds = []
    for fd in _STDIO:
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def run_on_server(argv: list[str], socket_path: str) -> int | None:
    """Run ``roadshift <argv>`` in a child of the warm server; its exit status.

    None when no server takes the request (gone, or died before starting the stage):
    the caller then runs the stage itself. Once the child has started, a signal sent
    to this client (Ctrl-C, DVC stopping) is passed on to it, and if this client is
    killed outright the server kills the child.
    """
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(socket_path)
        socket.send_fds(conn, [_HEADER.pack(len(request))], _stdio_fds())
        conn.sendall(request)
        started = _recv_exactly(conn, _STATUS.size)
    except OSError:
        return None
    if started is None:
        return None
    (child,) = _STATUS.unpack(started)
    previous = {
        signum: signal.signal(signum, lambda number, _frame: os.kill(child, number))
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        finished = _recv_exactly(conn, _STATUS.size)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        conn.close()
    if finished is None:
        print(f"roadshift: the warm stage server at {socket_path} went away", file=sys.stderr)
        return 1
    return _STATUS.unpack(finished)[0]


# --- server ----------------------------------------------------------------------------------


def _open_tracking_store(tracking_uri: str) -> None:
    """Open (and schema-check) an existing SQLite store once; children reuse the object.

    MLflow caches stores by URI. The pooled connections are closed before any fork,
    so each child opens its own: a SQLite connection must never cross a fork. Done at
    the first request, when the flow has created the store; one that does not exist
    is left alone (creating it here could race the flow's own creation).
    """
    if not tracking_uri.startswith("sqlite:///"):
        return
    if not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return
    from mlflow.tracking._tracking_service.utils import _get_store

    store = _get_store(tracking_uri)
    engine = getattr(store, "engine", None)
    if engine is not None:
        engine.dispose()


def _exit_status(wait_status: int) -> int:
    """As a shell reports it: the exit code, or 128 + the signal that killed the child."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


def _die_with_parent(signum: int) -> None:
    """PR_SET_PDEATHSIG: when the process that started us dies, we get ``signum``."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))


def _become_stage(request: dict, fds: list[int]) -> NoReturn:
    """In the forked child: take on the client's streams, directory and environment,
    then run the command as ``roadshift.cli.main`` does in a process of its own."""
    _die_with_parent(signal.SIGKILL)
    for target, fd in zip(_STDIO, fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(SOCKET_ENV, None)  # a torchrun relaunch starts real processes
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=stream.isatty())
    sys.argv = ["roadshift", *request["argv"]]
    from roadshift.cli import end_process, main

    code = 1
    try:
        code = main(request["argv"])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        end_process(code)


class _Server:
    """Requests are served side by side (the pipeline trains two stages at once): each one
    forks its child at once, and one loop watches the listener, every client (one that goes
    away has its child killed) and every child's exit. Preloading goes on module by module
    in between, also while children run, so a stage that arrives early waits for one
    import at most and is forked with what is loaded so far."""

    def __init__(self, listener: socket.socket, tracking_uri: str | None) -> None:
        self.listener = listener
        self.tracking_uri = tracking_uri
        self.to_preload = list(FIRST_STAGES_MODULES)
        self.training_modules_queued = False
        self.stopping = threading.Event()
        self.children: dict[int, socket.socket] = {}  # pid -> its client's connection
        self.children_told_to_stop = False

    def preload_one(self) -> None:
        name = self.to_preload.pop(0)
        try:
            importlib.import_module(name)
        except Exception as error:  # the stage itself will raise it, with its own message
            print(f"roadshift stage server: could not preload {name}: {error}", file=sys.stderr)

    def open_tracking_store_once(self) -> None:
        uri, self.tracking_uri = self.tracking_uri, None
        if uri:
            try:
                _open_tracking_store(uri)
            except Exception as error:  # each stage then opens it, and reports it
                print(f"roadshift stage server: {uri}: {error}", file=sys.stderr)

    def step(self) -> None:
        """Wait briefly for a client or a gone client, act on it, reap finished children;
        with nothing to act on, preload one more module."""
        idle_wait = 0.1 if self.children else 0.5
        # once told to stop, no new stage: a client left waiting sees EOF and runs it itself
        listening = [] if self.stopping.is_set() else [self.listener]
        watched = [*listening, *self.children.values()]
        ready, _, _ = select.select(watched, [], [], 0 if self.to_preload else idle_wait)
        for sock in ready:
            if sock is self.listener:
                conn, _ = self.listener.accept()
                conn.setblocking(True)
                self.start_child(conn)
            elif not sock.recv(1):  # the client is gone: so must its stage be
                self.signal_child(sock, signal.SIGKILL)
        if self.stopping.is_set() and not self.children_told_to_stop:
            self.children_told_to_stop = True
            for pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        self.reap_children()
        if self.to_preload and not ready:
            self.preload_one()

    def signal_child(self, conn: socket.socket, signum: int) -> None:
        for pid, child_conn in self.children.items():
            if child_conn is conn:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    def reap_children(self) -> None:
        """Each finished child's exit status goes to its client, which then exits with it."""
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                conn = self.children.pop(pid)
                with contextlib.suppress(OSError):
                    conn.sendall(_STATUS.pack(_exit_status(status)))
                conn.close()

    def start_child(self, conn: socket.socket) -> None:
        """Fork a child for one request and report its pid to the client."""
        from roadshift.cli import is_stage_command

        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, len(_STDIO))
        complete = len(header) == _HEADER.size
        payload = _recv_exactly(conn, _HEADER.unpack(header)[0]) if complete else None
        request = json.loads(payload) if payload else None
        if request is None or len(fds) != len(_STDIO) or not is_stage_command(request["argv"]):
            for fd in fds:
                os.close(fd)
            conn.close()
            return  # not a stage request: the client sees EOF and runs it itself
        self.open_tracking_store_once()
        if not self.training_modules_queued:  # a stage runs: training ones will follow
            self.training_modules_queued = True
            self.to_preload.extend(TRAINING_MODULES)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for other in (self.listener, conn, *self.children.values()):
                other.close()
            _become_stage(request, fds)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        with contextlib.suppress(OSError):
            conn.sendall(_STATUS.pack(pid))


def serve(socket_path: Path, tracking_uri: str | None) -> None:
    """Listen at once, then preload and serve until the process that started us is gone
    or sends SIGTERM (children still running are told, and waited for)."""
    parent = os.getppid()
    _die_with_parent(signal.SIGTERM)  # stops as if told to, so the socket goes too
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stage and the flow
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server = _Server(listener, tracking_uri)
    signal.signal(signal.SIGTERM, lambda *_: server.stopping.set())
    try:
        listener.bind(str(socket_path))
        listener.listen(16)
        while (not server.stopping.is_set() or server.children) and os.getppid() == parent:
            server.step()
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)


# --- the flow's side: start it, point the stage commands at it, stop it ---------------------


def _server_answers(socket_path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(socket_path)
        except OSError:
            return False
    return True


@contextlib.contextmanager
def warm_stage_server(tracking_uri: str | None = None) -> Iterator[str | None]:
    """A warm server for the duration of the block, its socket in ``ROADSHIFT_STAGE_SERVER``
    for the stage commands DVC starts; the socket path, or None when switched off.

    If a server is already up (``roadshift run`` starts one before Prefect so that its
    imports overlap the flow's start), that one is used and left alone.
    """
    existing = os.environ.get(SOCKET_ENV)
    if existing and _server_answers(existing):
        yield existing
        return
    if not warm_stages_enabled():
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="roadshift-stages-"))  # mode 0700: ours alone
    socket_path = folder / "server.sock"
    command = [sys.executable, "-m", "roadshift.stage_server", str(socket_path)]
    if tracking_uri:
        command.append(tracking_uri)
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not socket_path.exists():
            print(
                "roadshift: the warm stage server did not start; stages start cold", file=sys.stderr
            )
            yield None
            return
        os.environ[SOCKET_ENV] = str(socket_path)
        try:
            yield str(socket_path)
        finally:
            if os.environ.get(SOCKET_ENV) == str(socket_path):
                os.environ.pop(SOCKET_ENV)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        socket_path.unlink(missing_ok=True)
        folder.rmdir()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m roadshift.stage_server SOCKET [TRACKING_URI]", file=sys.stderr)
        return 2
    serve(Path(args[0]), args[1] if len(args) > 1 else None)
    os._exit(0)  # nothing to flush or close; tearing down torch and GX would take seconds


if __name__ == "__main__":
    sys.exit(main())
