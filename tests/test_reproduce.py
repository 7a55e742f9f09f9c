"""Reproducing a registered model from its lineage after the project moved on."""

from __future__ import annotations

import os
import shutil

import mlflow
import pytest
from mlflow import MlflowClient

from roadshift.cli import main
from roadshift.config import load_params
from roadshift.data.synth import add_target_batch
from roadshift.registry.reproduce import REPRODUCES_TAG, ReproductionError, reproduce_registered
from tests.helpers import TINY_PARAMS, commit_everything, git, make_project

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def project_that_moved_on(tmp_path_factory, prefect_server):
    """Version 1 registered by the real flow; then a new target batch and a new commit."""
    from flows.pipeline import training_pipeline

    root = make_project(tmp_path_factory.mktemp("reproduce"), TINY_PARAMS)
    training_pipeline(root=str(root))
    commit_everything(root, "pipeline outputs of version 1 (dvc.lock, data pointers)")
    params = load_params(root / "params.yaml")
    add_target_batch(root / "data/raw/target", 2, params.synth.image_size, 99, "week1")
    (root / "CHANGELOG").write_text("new target labels\n")
    commit_everything(root, "the data and the code moved on")
    yield root
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_a_registered_version_is_rebuilt_identically_without_touching_the_checkout(
    project_that_moved_on, capsys
):
    root = project_that_moved_on
    head_before = git(root, "rev-parse", "HEAD")
    status_before = git(root, "status", "--porcelain")

    assert main(["--root", str(root), "reproduce", "--model-version", "1"]) == 0

    shown = capsys.readouterr().out
    assert "| target_macro_f1 |" in shown and "NO |" not in shown
    assert shown.rstrip().endswith("identical")
    assert git(root, "rev-parse", "HEAD") == head_before
    assert git(root, "status", "--porcelain") == status_before
    assert len(git(root, "worktree", "list").splitlines()) == 1  # the temporary one is gone
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("roadshift").experiment_id],
        filter_string=f"tags.`{REPRODUCES_TAG}` = 'models:/tiny-road-signs/1'",
    )
    assert len(runs) == 1 and runs[0].data.tags["roadshift.reproduced.identical"] == "true"
    summary = mlflow.artifacts.load_dict(f"runs:/{runs[0].info.run_id}/reproduction.json")
    assert summary["weights_sha256"]["registered"] == summary["weights_sha256"]["reproduced"]
    f1 = summary["metrics"]["target_macro_f1"]
    assert f1["registered"] == f1["reproduced"]
    stage_runs = client.search_runs(
        [client.get_experiment_by_name("roadshift").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{runs[0].info.run_id}'",
    )
    assert {r.data.tags["roadshift.stage"] for r in stage_runs} >= {"pretrain", "evaluate"}


def test_a_data_version_in_no_cache_or_remote_is_named(project_that_moved_on):
    root = project_that_moved_on
    params = load_params(root / "params.yaml")
    hidden = {
        path: path.with_name(path.name + ".hidden")
        for path in (root / ".dvc" / "cache", root / ".dvcstore")
    }
    for path, away in hidden.items():
        path.rename(away)
    try:
        with pytest.raises(
            ReproductionError, match=r"neither the DVC cache nor any reachable remote"
        ):
            reproduce_registered(root, params, version="1")
    finally:
        for path, away in hidden.items():
            shutil.rmtree(path, ignore_errors=True)
            away.rename(path)


def test_an_unknown_version_is_named(project_that_moved_on):
    params = load_params(project_that_moved_on / "params.yaml")
    with pytest.raises(ReproductionError, match="has no version 42"):
        reproduce_registered(project_that_moved_on, params, version="42")
