"""Every expected error that stops a `roadshift` command is one short message, not a traceback.

What failed, the file/key/server at fault and what to do; exit code 2; at most ~30 lines; the
traceback only with ``--verbose``. Bugs keep their traceback. Prefect still records a failed
pipeline's flow and task runs with the error (its UI is where the detail lives).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import (
    TINY_PARAMS,
    make_project,
    png_bytes,
    register_champion,
    venv_environment,
)

MAX_LINES = 30


def roadshift(root: Path, *args: str, env: dict[str, str] | None = None):
    """``roadshift <args>`` in ``root`` as a user runs it; the combined output and exit code."""
    environment = venv_environment()
    environment["PREFECT_HOME"] = str(root / ".prefect")
    environment.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "roadshift", *args],
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.returncode, done.stdout + done.stderr


def assert_one_clear_message(code: int, output: str, *expected: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    assert len(output.splitlines()) <= MAX_LINES, output
    for fragment in expected:
        assert fragment in output, (fragment, output)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("template") / "project", TINY_PARAMS)


@pytest.fixture
def project(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(template, root, symlinks=True)
    return root


def edit_params(root: Path, section: str, values: dict) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


# --- errors found before any work starts ----------------------------------------------------


def test_an_unknown_params_key_names_the_key_and_the_file(project):
    edit_params(project, "pretrain", {"epochz": 3})
    code, output = roadshift(project, "run")
    assert_one_clear_message(code, output, "pretrain.epochz", "params.yaml")


def test_a_missing_data_folder_names_the_folder(project):
    shutil.rmtree(project / "data" / "raw" / "target")
    code, output = roadshift(project, "run")
    assert_one_clear_message(code, output, "data/raw/target")


def test_verbose_shows_the_traceback_of_an_expected_error(project):
    edit_params(project, "pretrain", {"epochz": 3})
    code, output = roadshift(project, "run", "--verbose")
    assert code == 2
    assert "Traceback" in output and "pretrain.epochz" in output


def test_a_bug_keeps_its_traceback():
    from roadshift.cli import _dispatch

    def broken(_: argparse.Namespace) -> int:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        _dispatch(argparse.Namespace(handler=broken, verbose=False))


# --- the registry ---------------------------------------------------------------------------


def test_predict_with_no_champion_says_how_to_get_one(tmp_path):
    import mlflow

    from roadshift.config import parse_params
    from roadshift.tracking import configure_tracking

    configure_tracking(parse_params({}), tmp_path)  # a store with nothing registered
    mlflow.set_tracking_uri(None)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8)))
    code, output = roadshift(tmp_path, "predict", "images")
    assert_one_clear_message(code, output, "champion", "roadshift run")


def test_promoting_an_unknown_version_names_the_version_and_the_model(tmp_path):
    import mlflow

    register_champion(tmp_path, "road-signs")
    mlflow.set_tracking_uri(None)
    (tmp_path / "params.yaml").write_text("register:\n  model_name: road-signs\n")
    code, output = roadshift(tmp_path, "promote", "--version", "99")
    assert_one_clear_message(code, output, "99", "road-signs")


# --- errors inside a running pipeline (Prefect, DVC stages) ---------------------------------


def prefect_run_states(root: Path) -> dict[str, str]:
    """Flow and task run names -> state names, read back from the run's local Prefect database."""
    script = (
        "import json\n"
        "from prefect import get_client\n"
        "with get_client(sync_client=True) as client:\n"
        "    flows = client.read_flow_runs()\n"
        "    tasks = client.read_task_runs()\n"
        "print(json.dumps({**{r.name: r.state_name for r in tasks},"
        " 'flow': [r.state_name for r in flows]}))\n"
    )
    environment = venv_environment()
    environment["PREFECT_HOME"] = str(root / ".prefect")
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_corrupt_image_stops_the_run_with_one_message_and_prefect_records_it(project):
    bad = sorted((project / "data" / "raw" / "target" / "train").rglob("*.png"))[0]
    bad.write_text("not an image")
    code, output = roadshift(project, "run")
    assert_one_clear_message(code, output, str(bad.relative_to(project / "data" / "raw")))
    assert output.count("not an image Pillow can read") == 1, output

    states = prefect_run_states(project)
    assert states.pop("flow") == ["Failed"]
    assert "Failed" in states.values(), states  # the task that refused the data


@pytest.mark.slow
def test_a_failed_data_check_points_at_the_validation_report(project):
    edit_params(project, "validate", {"min_images_per_class": 500})
    code, output = roadshift(project, "run")
    assert_one_clear_message(code, output, "data validation failed", "summary.json")


@pytest.mark.slow
def test_a_label_set_mismatch_names_the_classes(project):
    target = project / "data" / "raw" / "target"
    for split in ("train", "val", "test"):
        (target / split / "give_way").rename(target / split / "yield_sign")
    code, output = roadshift(project, "run")
    assert_one_clear_message(code, output, "give_way", "yield_sign")


@pytest.mark.slow
def test_an_unreachable_tracking_server_names_the_server(project):
    uri = f"http://127.0.0.1:{closed_port()}"
    edit_params(project, "tracking", {"request_retries": 0})
    code, output = roadshift(project, "run", env={"MLFLOW_TRACKING_URI": uri})
    assert_one_clear_message(code, output, uri)


# --- a run that succeeds --------------------------------------------------------------------

LIBRARY_NOISE = (
    "Traceback",
    "Warning",  # UserWarning, FutureWarning, ... and MLflow's "WARNING mlflow...." lines
    "WARNING",
    " INFO ",
    "| INFO",
    "To track the changes with git",  # DVC's hint, once a stage
    "core.autostage",
    "Successfully registered model",  # MLflow's prints on registration
    "Created version",
)


@pytest.mark.slow
def test_a_successful_run_prints_its_stages_the_summary_and_the_decision_only(project):
    code, output = roadshift(project, "run")
    assert code == 0, output
    for noise in LIBRARY_NOISE:
        assert noise not in output, (noise, output)
    for stage in ("prepare", "validate", "pretrain", "finetune", "scratch", "evaluate"):
        assert f"{stage}: ran (" in output, output
    assert "Target test split (Indian roads (IRC:67))" in output
    assert "Model version 1: aliases" in output
    assert len(output.splitlines()) <= 45, output


# --- metric files ---------------------------------------------------------------------------


def test_a_metrics_file_leaves_undefined_figures_out_and_says_why(tmp_path):
    from roadshift.jsonio import read_metrics, write_metrics

    path = write_metrics(
        tmp_path / "m.json",
        {"accuracy": 0.5, "ece": float("nan"), "gain": float("inf")},
        {"val_accuracy": "the target has no val split"},
    )
    text = path.read_text()
    written = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))
    assert written["left_out"] == {
        "ece": "not a finite number (nan)",
        "gain": "not a finite number (inf)",
        "val_accuracy": "the target has no val split",
    }
    assert read_metrics(path) == {"accuracy": 0.5}
