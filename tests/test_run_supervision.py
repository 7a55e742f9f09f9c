"""One `roadshift run` per project, and nothing left behind when one is stopped or killed.

The end-to-end tests run the real command on a tiny project (Prefect's local temporary
server, DVC, stage subprocesses) and stop it once a stage is running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from mlflow import MlflowClient

from flows.recovery import remove_unreadable_dvc_rwlock
from roadshift.supervise import Owner, ProjectBusyError, current_owner, project_lock
from tests.helpers import (
    TINY_PARAMS,
    make_project,
    process_tree,
    start_run,
    still_running,
    venv_environment,
    wait_for_stage,
)


def test_a_second_holder_of_the_run_lock_is_refused_with_the_first_ones_pid(tmp_path):
    lock = tmp_path / ".roadshift" / "run.lock"
    busy = rf"another run \(PID {os.getpid()}, started "
    with project_lock(lock), pytest.raises(ProjectBusyError, match=busy), project_lock(lock):
        pass
    with project_lock(lock):  # released with the first holder
        pass


def test_an_owner_is_gone_once_its_process_ended_and_never_judged_from_another_host():
    ended = subprocess.Popen(["true"])
    ended.wait()
    me = current_owner()
    assert Owner.parse(me.tag()) == me
    assert not me.is_gone()
    assert Owner(me.host, ended.pid, me.started).is_gone()
    assert Owner(me.host, me.pid, me.started - 100).is_gone()  # the PID was reused
    assert not Owner(socket.gethostname() + "-elsewhere", ended.pid, 0.0).is_gone()
    assert Owner.parse("not an owner") is None


def eventually_empty(folder, timeout: float = 30) -> bool:
    """Whether ``folder`` is empty within ``timeout`` seconds (a killed run's temporary
    folder is removed just after its processes are gone)."""
    deadline = time.monotonic() + timeout
    while any(folder.iterdir()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_half_written_dvc_lock_file_is_removed_and_a_readable_one_kept(tmp_path):
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a")
    with Repo(str(tmp_path)) as repo:
        repo.add([str(tmp_path / "data")])
    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.write_text('{"read": {}, "write": {"data": {"pid": 12')
    with Repo(str(tmp_path)) as repo, pytest.raises(Exception, match="JSON structure is corrupted"):
        repo.status(targets=[str(tmp_path / "data.dvc")])

    assert remove_unreadable_dvc_rwlock(tmp_path, settle=0.01)
    with Repo(str(tmp_path)) as repo:
        assert repo.status(targets=[str(tmp_path / "data.dvc")]) == {}
    rwlock.write_text('{"read": {}, "write": {}}')
    assert not remove_unreadable_dvc_rwlock(tmp_path, settle=0.01)
    assert rwlock.is_file()
    rwlock.unlink()
    assert not remove_unreadable_dvc_rwlock(tmp_path, settle=0.01)


def runs_by_status(root) -> dict[str, set[str]]:
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    found: dict[str, set[str]] = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            found.setdefault(run.info.status, set()).add(run.info.run_name)
    return found


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_running_and_the_next_run_ends_its_runs(tmp_path):
    root = make_project(tmp_path / "project", TINY_PARAMS)
    run = start_run(root, tmp_path / "tmp")
    tree = wait_for_stage(run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert still_running(tree) == []
    assert eventually_empty(tmp_path / "tmp")
    assert "RUNNING" in runs_by_status(root)
    # a kill can land while DVC rewrites its lock file (a machine that loses power, the OOM
    # killer): the next run must not be stopped by the half-written file
    rwlock = root / ".dvc" / "tmp" / "rwlock"
    rwlock.write_text('{"write": {"data/prepared": {"pid": 4')

    again = subprocess.run(
        ["roadshift", "run"],
        cwd=root,
        env={**venv_environment(), "TMPDIR": str(tmp_path / "tmp")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "run(s) a killed run left RUNNING as KILLED" in again.stdout
    assert "a killed run left running as Crashed" in again.stdout
    assert "removed DVC's lock file .dvc/tmp/rwlock" in again.stdout
    statuses = runs_by_status(root)
    assert "RUNNING" not in statuses
    assert any(name.startswith("pipeline ") for name in statuses["KILLED"]), statuses
    assert list((tmp_path / "tmp").iterdir()) == []  # also removed on a normal exit


@pytest.mark.slow
def test_a_second_run_is_refused_at_once_and_sigterm_ends_the_first_ones_whole_tree(tmp_path):
    root = make_project(tmp_path / "project", TINY_PARAMS)
    first = start_run(root, tmp_path / "tmp")
    wait_for_stage(first)

    second = subprocess.run(
        ["roadshift", "run"], cwd=root, env=venv_environment(), capture_output=True, text=True
    )
    assert second.returncode == 2
    assert second.stdout == ""
    [line] = second.stderr.splitlines()
    assert f"another run (PID {first.pid}, started " in line
    assert "holds this project" in line

    tree = process_tree(first.pid)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 128 + signal.SIGTERM
    assert still_running(tree) == []
    assert list((tmp_path / "tmp").iterdir()) == []
