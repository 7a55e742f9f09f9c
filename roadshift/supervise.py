"""One run per project, and nothing left running after it: the lock and the process tree.

``roadshift run`` is a small supervisor. It takes the project's run lock, then starts the
real work (the Prefect flow, its local temporary server, DVC and every stage process) as a
child in a session of its own, and ends that whole tree when it is stopped:

- SIGTERM, SIGINT (Ctrl-C) or SIGHUP to the supervisor: every process of the tree gets
  SIGTERM, then SIGKILL after a short grace; the run's temporary folder is removed.
- SIGKILL of the supervisor, which it cannot catch: the child holds the read end of a pipe
  whose only write end the supervisor held. The kernel closes it when the supervisor dies;
  a watchdog thread in the child reads end-of-file and kills the child's own tree.

The lock is ``fcntl.flock`` on ``.roadshift/run.lock``: the kernel releases it when the last
process holding it dies, so a killed run never leaves a stale lock behind. Runs record who
started them (:func:`owner_tag`: host, PID and the process's start time), so a later run
can tell a run whose process is gone from one still going.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from roadshift.errors import RoadshiftError

WATCH_FD_ENV = "ROADSHIFT_RUN_WATCH_FD"
"""Set only in the supervised child: the pipe to watch (the supervisor's life)."""
RUN_TMP_PREFIX = "roadshift-run-"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_SECONDS = 5.0


class ProjectBusyError(RoadshiftError):
    """Another ``roadshift run`` holds this project's run lock."""


# --- who runs: host, PID and start time -------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """A process, told apart from a later one that reuses its PID by its start time."""

    host: str
    pid: int
    started: float

    def tag(self) -> str:
        return f"{self.host}/{self.pid}/{self.started:.2f}"

    @classmethod
    def parse(cls, text: str | None) -> Owner | None:
        """The owner a tag names; None for a missing or foreign tag."""
        parts = (text or "").rsplit("/", 2)
        if len(parts) != 3:
            return None
        host, pid, started = parts
        try:
            return cls(host, int(pid), float(started))
        except ValueError:
            return None

    def is_gone(self) -> bool:
        """True only when this host can tell the process has ended; another host's runs
        are never judged from here."""
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) > 1.0
        except psutil.NoSuchProcess:
            return True


def current_owner() -> Owner:
    return Owner(socket.gethostname(), os.getpid(), psutil.Process().create_time())


def owner_tag() -> str:
    """This process, as a tag value for the runs it starts (MLflow tag, Prefect tag)."""
    return current_owner().tag()


# --- the project's run lock -------------------------------------------------------------------


def _holder_description(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"PID {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown, started at an unknown time"


@contextlib.contextmanager
def project_lock(path: Path) -> Iterator[int]:
    """Hold ``path``'s exclusive lock for the block, or fail at once if another run has it.

    Yields the lock's file descriptor, for a child process to share: the lock is held until
    every process holding it has ended.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ProjectBusyError(
            f"another run ({_holder_description(path)}) holds this project ({path}); "
            "wait for it to finish, or stop that process"
        ) from None
    try:
        started = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield fd
    finally:
        os.close(fd)


# --- ending a process tree --------------------------------------------------------------------


def end_tree(root_pid: int, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM to ``root_pid``, every descendant and every member of its process group, then
    SIGKILL to whatever is left after ``grace`` seconds."""
    processes = _tree(root_pid)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root_pid, signal.SIGKILL)  # started in its own session: its group id


def _tree(root_pid: int) -> list[psutil.Process]:
    """``root_pid``, its descendants, and anything still in its process group (children whose
    parent already died are re-parented, but stay in the group)."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(root_pid)
        found[root_pid] = root
        found.update((child.pid, child) for child in root.children(recursive=True))
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if os.getpgid(process.pid) == root_pid:
                found.setdefault(process.pid, process)
    found.pop(os.getpid(), None)
    return list(found.values())


def remove_run_tmp(folder: str | None) -> None:
    """Remove a run's temporary folder (only one this module made)."""
    if folder and Path(folder).name.startswith(RUN_TMP_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


REMOVE_AFTER_GROUP = (
    'for _ in $(seq 300); do kill -0 "-$1" 2>/dev/null || break; sleep 0.1; done; rm -rf -- "$2"'
)
"""sh: wait (at most 30 s) until process group $1 is gone, then remove folder $2."""


def remove_run_tmp_after(group: int, folder: str | None) -> None:
    """Remove a run's temporary folder once process group ``group`` has ended, from a
    process outside it (the group is about to be killed, this process with it)."""
    if folder and Path(folder).name.startswith(RUN_TMP_PREFIX):
        subprocess.Popen(
            ["sh", "-c", REMOVE_AFTER_GROUP, "remove-run-tmp", str(group), folder],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


# --- the supervisor and its child -------------------------------------------------------------


def supervise(command: list[str], lock_fd: int) -> int:
    """Run ``command`` as the run's worker and wait for it; the worker's exit status, or
    128 + the signal number when a signal stopped the run.

    The worker gets its own session (so the whole tree is one process group), a private
    ``TMPDIR`` (removed afterwards, whatever happens), the lock's descriptor and the
    watched pipe.
    """
    read_end, write_end = os.pipe()
    tmp = tempfile.mkdtemp(prefix=f"{RUN_TMP_PREFIX}{os.getpid()}-")
    env = {**os.environ, WATCH_FD_ENV: str(read_end), "TMPDIR": tmp}
    stopped_by: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        worker = subprocess.Popen(
            command, env=env, pass_fds=(read_end, lock_fd), start_new_session=True
        )
        os.close(read_end)

        def stop(signum: int, _frame: object) -> None:
            stopped_by.append(signum)
            end_tree(worker.pid)

        for sig in STOP_SIGNALS:
            signal.signal(sig, stop)
        code = worker.wait()
        end_tree(worker.pid, grace=0.5)  # anything the worker left in its group
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_end)
        remove_run_tmp(tmp)
    return 128 + stopped_by[0] if stopped_by else code


def watch_supervisor() -> bool:
    """In the worker: end this whole tree when the supervisor dies. False when not supervised.

    The thread blocks reading a pipe nobody writes to; end-of-file means the supervisor's
    end was closed, i.e. it died (even by SIGKILL). Then every descendant is killed, the
    temporary folder removed, and last this process's group, which includes itself.

    The group gets one SIGKILL, so the worker and its stage processes stop at one instant.
    Killed one by one, the worker would outlive its stages for a moment and react to their
    deaths (DVC records the failed stage and rewrites ``.dvc/tmp/rwlock``); a kill in the
    middle of that write leaves DVC a lock file it cannot read. The temporary folder is
    therefore removed by a small process of its own once the group is gone.
    """
    fd_text = os.environ.pop(WATCH_FD_ENV, None)
    if fd_text is None:
        return False
    fd = int(fd_text)

    def watch() -> None:
        while os.read(fd, 1):
            pass
        group = os.getpgrp()
        for process in _tree(os.getpid()):
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                if os.getpgid(process.pid) != group:  # left the group: killpg misses it
                    process.kill()
        remove_run_tmp_after(group, os.environ.get("TMPDIR"))
        os.killpg(group, signal.SIGKILL)

    threading.Thread(target=watch, name="roadshift-supervisor-watch", daemon=True).start()
    return True
