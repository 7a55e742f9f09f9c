"""The warm stage server: a stage it runs is the stage a fresh process runs, in every way
DVC and a user can see (outputs, exit status, messages, signals), and it never outlives
the flow that started it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from roadshift.cli import main
from roadshift.config import BaseSection
from roadshift.cores import side_by_side_refusal
from roadshift.layout import Layout
from roadshift.stage_server import SOCKET_ENV, SWITCH_ENV, run_on_server, warm_stage_server
from tests.conftest import TINY_PARAMS, make_project, venv_environment
from tests.test_resume_and_ddp import last_checkpointed_epoch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform != "linux", reason="the warm server forks: Linux only"),
]

LONG_PRETRAIN_EPOCHS = 40


@pytest.fixture(scope="module")
def validated_project(tmp_path_factory) -> Path:
    pretrain = {"epochs": LONG_PRETRAIN_EPOCHS, "checkpoint_every_seconds": 0}
    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], **pretrain}}
    root = make_project(tmp_path_factory.mktemp("warm"), params)
    for stage in ("prepare", "validate"):
        assert main(["--root", str(root), "stage", stage]) == 0
    return root


@pytest.fixture
def server(monkeypatch) -> str:
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    monkeypatch.delenv(SWITCH_ENV, raising=False)
    with warm_stage_server() as socket_path:
        assert socket_path is not None
        yield socket_path


def server_process(socket_path: str) -> psutil.Process:
    """The server: the child of this test process whose command line names the socket."""
    for child in psutil.Process().children():
        if socket_path in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no server process for {socket_path}")


def stage_args(root: Path, stage: str, *extra: str) -> list[str]:
    return ["--root", str(root), "stage", stage, *extra]


def test_a_stage_run_by_the_server_writes_the_same_weights_as_a_fresh_process(
    validated_project, server
):
    weights = Layout(validated_project).model_dir("scratch") / "weights.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "roadshift", *stage_args(validated_project, "scratch")],
        env={k: v for k, v in venv_environment().items() if k != SOCKET_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    from_fresh_process = weights.read_bytes()
    weights.unlink()

    assert run_on_server(stage_args(validated_project, "scratch"), server) == 0
    assert weights.read_bytes() == from_fresh_process


def test_the_servers_child_reports_the_stages_exit_status_and_messages(
    validated_project, server, capfd
):
    status = run_on_server(stage_args(validated_project, "prepare", "--set", "nope=1"), server)

    assert status == 2
    assert "nope: unknown key" in capfd.readouterr().err


def test_a_stage_command_under_the_flow_goes_to_the_server_and_says_what_a_process_says(
    validated_project, server
):
    env = {**venv_environment(), SOCKET_ENV: server}
    command = [sys.executable, "-m", "roadshift", *stage_args(validated_project, "validate")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "target_train_images" in done.stdout
    assert server_process(server).children() == []  # the child has ended and been reaped


def test_killing_the_stage_command_kills_the_stage_the_server_runs(validated_project, server):
    checkpoint = Layout(validated_project).checkpoint_dir("pretrain") / "last.pt"
    env = {**venv_environment(), SOCKET_ENV: server}
    command = [sys.executable, "-m", "roadshift", *stage_args(validated_project, "pretrain")]
    client = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while last_checkpointed_epoch(checkpoint) < 2 and client.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    stages = server_process(server).children()
    assert len(stages) == 1, "the stage did not run in the server"

    os.kill(client.pid, signal.SIGKILL)
    assert client.wait() == -signal.SIGKILL, "the stage finished before it could be killed"

    gone, alive = psutil.wait_procs(stages, timeout=30)
    assert alive == [] and gone
    killed_at = last_checkpointed_epoch(checkpoint)
    time.sleep(1)
    assert last_checkpointed_epoch(checkpoint) == killed_at < LONG_PRETRAIN_EPOCHS


def test_with_no_server_answering_the_stage_command_runs_the_stage_itself(
    validated_project, tmp_path
):
    env = {**venv_environment(), SOCKET_ENV: str(tmp_path / "gone.sock")}
    command = [sys.executable, "-m", "roadshift", *stage_args(validated_project, "prepare")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    assert run_on_server(stage_args(validated_project, "prepare"), str(tmp_path / "x")) is None


def test_the_server_ends_with_its_block_and_leaves_no_socket(monkeypatch):
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    monkeypatch.delenv(SWITCH_ENV, raising=False)
    with warm_stage_server() as socket_path:
        process = server_process(socket_path)
        assert os.environ[SOCKET_ENV] == socket_path

    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    assert not Path(socket_path).exists() and SOCKET_ENV not in os.environ


def test_the_server_ends_when_the_process_that_started_it_dies(tmp_path):
    socket_path = tmp_path / "s.sock"
    server_command = [sys.executable, "-m", "roadshift.stage_server", str(socket_path)]
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, time; subprocess.Popen({server_command!r}); time.sleep(600)",
        ],
        env=venv_environment(),
    )
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    (server,) = psutil.Process(starter.pid).children()
    starter.kill()
    starter.wait()

    server.wait(timeout=30)
    assert not socket_path.exists()


def test_the_switch_turns_the_server_off(monkeypatch):
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    monkeypatch.setenv(SWITCH_ENV, "0")
    with warm_stage_server() as socket_path:
        assert socket_path is None
        assert SOCKET_ENV not in os.environ


def test_roadshift_run_on_the_temporary_prefect_server_runs_its_stages_in_the_warm_server(
    tmp_path,
):
    # finetune and scratch long enough (a few seconds) to be seen side by side
    params = {**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], "epochs": 40}}
    root = make_project(tmp_path / "project", params)
    env = {
        k: v
        for k, v in venv_environment().items()
        if k not in {"PREFECT_API_URL", SOCKET_ENV, SWITCH_ENV}
    }
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_EPHEMERAL_ENABLED="true")
    command = [sys.executable, "-m", "roadshift", "--root", str(root), "run"]
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    servers_seen, stages_in_server, most_at_once, prefect_servers = set(), set(), 0, set()
    while run.poll() is None:
        try:
            for process in psutil.Process(run.pid).children():
                if "prefect.server.api.server:create_app" in process.cmdline():
                    prefect_servers.add(process.pid)
                if "roadshift.stage_server" in " ".join(process.cmdline()):
                    servers_seen.add(process.pid)
                    children = {child.pid for child in process.children()}
                    stages_in_server.update(children)
                    most_at_once = max(most_at_once, len(children))
        except psutil.Error:
            pass
        time.sleep(0.05)
    output = run.stdout.read()

    assert run.returncode == 0, output[-3000:]
    for stage in ("prepare", "validate", "pretrain", "finetune", "scratch", "evaluate"):
        assert re.search(rf"^\s+{stage}\s+ran \(", output, re.MULTILINE), stage
    assert "Model version 1" in output
    assert len(servers_seen) == 1 and len(stages_in_server) >= 6
    if side_by_side_refusal(BaseSection(**TINY_PARAMS["base"])) is None:
        assert most_at_once == 2  # finetune and scratch, each in a child of its own
    assert not any(psutil.pid_exists(pid) for pid in servers_seen)
    # Prefect's temporary server, started by `roadshift run` itself, ends with it too
    assert len(prefect_servers) == 1
    assert not any(psutil.pid_exists(pid) for pid in prefect_servers)


def test_roadshift_run_starts_no_prefect_server_where_one_is_configured(monkeypatch):
    from flows.temporary_server import start_temporary_prefect_server

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.team:4200/api")
    assert start_temporary_prefect_server() is None
