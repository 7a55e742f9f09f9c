"""Shared fixtures: offline settings, tiny configs and throwaway git+DVC project copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from roadshift.cli import OFFLINE_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[1]

for key, value in {**OFFLINE_ENV, "PREFECT_SERVER_EPHEMERAL_ENABLED": "true"}.items():
    os.environ[key] = value
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="roadshift-prefect-home-"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("ROADSHIFT_PARENT_RUN_ID", None)

# What a project checkout needs for `dvc repro`: the pipeline definition and the
# stage sources that dvc.yaml lists as dependencies.
PROJECT_FILES = ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore")
PROJECT_DIRS = ("roadshift",)

TINY_PARAMS = {
    "base": {"seed": 7, "image_size": 32, "num_threads": 1},
    "synth": {
        "source_per_class": 10,
        "target_train_per_class": 4,
        "target_val_per_class": 2,
        "target_test_per_class": 3,
        "image_size": 32,
    },
    "validate": {"min_images_per_class": 2},
    "pretrain": {"epochs": 2, "batch_size": 16, "lr": 0.003},
    "finetune": {"epochs": 2, "batch_size": 16, "lr": 0.002},
    "evaluate": {"batch_size": 64},
    "register": {"model_name": "tiny-road-signs"},
}


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def venv_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def make_project(root: Path, params: dict) -> Path:
    """A fresh git repo holding the pipeline definition, tiny params and tiny synthetic data."""
    from roadshift.config import params_to_dict, parse_params
    from roadshift.data.synth import synthesize_dataset

    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT_ROOT / name, root / name)
    for name in PROJECT_DIRS:
        shutil.copytree(
            PROJECT_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    parsed = parse_params(params)
    # DVC reads each stage's params sections from the file itself: write them all out.
    (root / "params.yaml").write_text(yaml.safe_dump(params_to_dict(parsed), sort_keys=False))
    synthesize_dataset(root / "data" / "raw", parsed.synth, seed=parsed.base.seed)
    return commit_everything(root, "tiny project")


def commit_everything(root: Path, message: str) -> Path:
    """Make ``root`` a git repository if it is not one, and commit all of it."""
    if not (root / ".git").exists():
        git(root, "init", "-q", "-b", "main")
        git(root, "config", "user.name", "roadshift tests")
        git(root, "config", "user.email", "tests@roadshift.invalid")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return root


@pytest.fixture
def tiny_params() -> dict:
    return yaml.safe_load(yaml.safe_dump(TINY_PARAMS))


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (temporary, SQLite) for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
