"""A broken MLflow store: every command that uses it says which store and what is wrong, in
one line, exit 2, with no traceback, and never creates an empty store in its place."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from roadshift.cli import main
from tests.helpers import register_champion

NAME = "fault-road-signs"
READERS_AND_WRITERS = ("predict", "promote", "rollback", "reproduce")


@pytest.fixture(scope="module")
def healthy_store(tmp_path_factory) -> Path:
    """A real SQLite store holding a registered champion."""
    import mlflow

    root = tmp_path_factory.mktemp("healthy")
    register_champion(root, NAME)
    mlflow.set_tracking_uri(None)
    return root / "mlruns" / "mlflow.db"


@pytest.fixture
def project(tmp_path, healthy_store) -> Path:
    """A project whose store is a copy of the healthy one, and an image to predict."""
    params = {"register": {"model_name": NAME}, "tracking": {"experiment": "predict-tests"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(healthy_store, tmp_path / "mlruns" / "mlflow.db")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "sign.png")
    return tmp_path


def command(name: str, project: Path) -> list[str]:
    return {
        "predict": ["predict", str(project / "sign.png")],
        "promote": ["promote", "--version", "1"],
        "rollback": ["rollback", "--reason", "test"],
        "reproduce": ["reproduce", "--model-version", "1"],
    }[name]


def one_line_error(project: Path, name: str, capsys) -> str:
    """Run the command; its only output: one line on stderr, exit 2."""
    capsys.readouterr()
    assert main(["--root", str(project), *command(name, project)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith("roadshift: ")
    return line


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("name", READERS_AND_WRITERS)
def test_an_unreachable_tracking_server_is_named_with_the_refusal(
    name, project, capsys, monkeypatch
):
    server = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    line = one_line_error(project, name, capsys)
    assert f"the MLflow tracking server {server} does not answer" in line
    assert "Connection refused" in line


@pytest.mark.parametrize("name", READERS_AND_WRITERS)
def test_a_truncated_store_is_named_as_not_a_readable_database(name, project, capsys):
    db = project / "mlruns" / "mlflow.db"
    db.write_bytes(db.read_bytes()[:100_000])
    line = one_line_error(project, name, capsys)
    assert f"the MLflow store {db} is not a readable SQLite database" in line
    assert db.stat().st_size == 100_000  # left as it was, for the user to restore


@pytest.mark.parametrize("name", READERS_AND_WRITERS)
def test_a_deleted_store_is_missing_and_no_empty_one_is_created(name, project, capsys):
    db = project / "mlruns" / "mlflow.db"
    db.unlink()
    line = one_line_error(project, name, capsys)
    assert f"no MLflow store at {db}" in line
    assert not db.exists()


@pytest.fixture
def read_only_store(project):
    """The store made read-only for this process: mode 444, and immutable where we are root
    (root writes through file modes)."""
    db = project / "mlruns" / "mlflow.db"
    db.chmod(0o444)
    immutable = False
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a file read-only")
        done = subprocess.run(["chattr", "+i", str(db)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i refused here: {done.stderr.decode().strip()}")
        immutable = True
    yield db
    if immutable:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    db.chmod(0o644)


@pytest.mark.parametrize("name", ("promote", "rollback", "reproduce"))
def test_a_read_only_store_is_named_by_the_commands_that_write(name, read_only_store, capsys):
    line = one_line_error(read_only_store.parents[1], name, capsys)
    assert f"the MLflow store {read_only_store} cannot be written" in line


def test_predict_reads_a_read_only_store(read_only_store, capsys):
    project = read_only_store.parents[1]
    assert main(["--root", str(project), *command("predict", project)]) == 0
    assert "sign.png" in capsys.readouterr().out


@pytest.mark.slow
def test_run_stops_on_a_truncated_store_before_any_stage(tmp_path, healthy_store):
    from tests.helpers import TINY_PARAMS, make_project, venv_environment

    project = make_project(tmp_path / "project", TINY_PARAMS)
    db = project / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(healthy_store.read_bytes()[:100_000])
    done = subprocess.run(
        ["roadshift", "run"], cwd=project, env=venv_environment(), capture_output=True, text=True
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"roadshift: the MLflow store {db} is not a readable SQLite"
    )
    assert "Running stage" not in done.stdout
