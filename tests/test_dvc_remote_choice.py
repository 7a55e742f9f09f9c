"""Which DVC remote data goes to and comes from is an environment switch, checked by name."""

from __future__ import annotations

import shutil

import pytest

from roadshift.cli import main
from roadshift.data.dvc_repo import open_repo
from tests.helpers import commit_everything, git, make_project


@pytest.fixture
def project(tmp_path, tiny_params):
    return make_project(tmp_path / "project", tiny_params)


def test_an_unknown_remote_is_refused_naming_it_and_the_configured_ones(
    project, monkeypatch, capsys
):
    monkeypatch.setenv("ROADSHIFT_DVC_REMOTE", "nowhere")
    assert main(["--root", str(project), "data", "pull"]) == 2
    error = capsys.readouterr().err
    assert "ROADSHIFT_DVC_REMOTE=nowhere" in error
    assert "configured: local, team" in error


def test_pulling_before_any_data_version_is_committed_says_what_to_do(project, monkeypatch, capsys):
    monkeypatch.setenv("ROADSHIFT_DVC_REMOTE", "local")
    assert main(["--root", str(project), "data", "pull"]) == 2
    error = capsys.readouterr().err
    assert "source.dvc" in error and "no DVC pointer committed" in error


def test_data_comes_back_from_the_chosen_remote_into_a_fresh_clone(project, tmp_path, monkeypatch):
    monkeypatch.setenv("ROADSHIFT_DVC_REMOTE", "local")
    with open_repo(project) as repo:
        repo.add([str(project / "data/raw" / d) for d in ("source", "target", "target_unlabeled")])
        repo.push(remote="local")
    commit_everything(project, "data versions")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    # the clone's `local` remote is relative to its own .dvc: point it at the project's store
    shutil.copytree(project / ".dvcstore", clone / ".dvcstore")
    assert main(["--root", str(clone), "data", "pull"]) == 0
    images = sorted(p.relative_to(clone) for p in (clone / "data/raw").rglob("*.png"))
    assert images and images == sorted(
        p.relative_to(project) for p in (project / "data/raw").rglob("*.png")
    )
