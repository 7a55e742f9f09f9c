"""The whole training-pipeline flow, for real: Prefect, DVC in a git repo, MLflow on SQLite."""

from __future__ import annotations

import json
import os
import subprocess

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers import (
    TINY_PARAMS,
    launch_chromium,
    make_project,
    start_mlflow_ui,
    stop_ui,
    venv_environment,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_server):
    from flows.pipeline import training_pipeline

    root = make_project(tmp_path_factory.mktemp("project"), TINY_PARAMS)
    result = training_pipeline(root=str(root))
    return root, result


@pytest.fixture
def registry_of():
    """Point MLflow at a project's store for one test, then forget it (set_tracking_uri
    also writes MLFLOW_TRACKING_URI into the environment, which would leak into later tests)."""

    def point_at(root) -> MlflowClient:
        uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        return MlflowClient(uri)

    yield point_at
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _data_version(pointer) -> str:
    return yaml.safe_load(pointer.read_text())["outs"][0]["md5"]


def test_first_run_runs_every_stage_and_crowns_a_champion(first_run, registry_of):
    root, result = first_run
    assert [run.stage for run in result.stages] == [
        "prepare",
        "validate",
        "pretrain",
        "finetune",
        "scratch",
        "evaluate",
    ]
    assert all(run.ran for run in result.stages)
    client = registry_of(root)
    champion = client.get_model_version_by_alias("tiny-road-signs", "champion")
    assert str(champion.version) == result.model_version
    assert {"champion", "challenger"} <= set(result.aliases)
    for key in ("target_accuracy", "source_only_target_accuracy", "target_macro_f1"):
        assert 0.0 <= result.metrics[key] <= 1.0


def test_champion_lineage_names_the_git_commit_and_each_domains_data_version(
    first_run, registry_of
):
    root, _ = first_run
    champion = registry_of(root).get_model_version_by_alias("tiny-road-signs", "champion")
    tags = champion.tags
    assert tags["data.source.version"] == _data_version(root / "data/raw/source.dvc")
    assert tags["data.target.version"] == _data_version(root / "data/raw/target.dvc")
    assert tags["data.source.version"] != tags["data.target.version"]
    assert len(tags["git.commit"]) == 40


def test_champion_loads_from_the_registry_and_predicts(first_run, registry_of):
    root, _ = first_run
    registry_of(root)
    model = mlflow.pyfunc.load_model("models:/tiny-road-signs@champion")
    images = np.random.default_rng(0).integers(0, 255, size=(3, 40, 40, 3), dtype=np.uint8)
    predictions = model.predict(images)
    assert len(predictions) == 3
    assert set(predictions["label"]) <= set(
        yaml.safe_load((root / "models/target/model.json").read_text())["class_names"]
    )


def test_pipeline_stages_are_nested_mlflow_runs_with_epoch_metrics(first_run, registry_of):
    root, result = first_run
    client = registry_of(root)
    parent = client.get_run(result.mlflow_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'",
    )
    stages = {run.data.tags.get("roadshift.stage") for run in children}
    assert {
        "prepare",
        "validate",
        "pretrain",
        "finetune",
        "scratch",
        "evaluate",
        "register",
    } <= stages
    pretrain = next(r for r in children if r.data.tags.get("roadshift.stage") == "pretrain")
    history = client.get_metric_history(pretrain.info.run_id, "train_loss")
    assert len(history) == 2  # one point per epoch


def _inputs(run) -> dict[str, tuple[str, str, str]]:
    """name -> (digest, source uri, context) of a run's dataset inputs."""
    found = {}
    for entry in run.inputs.dataset_inputs:
        context = next(t.value for t in entry.tags if t.key == "mlflow.data.context")
        source = json.loads(entry.dataset.source)["uri"]
        found[entry.dataset.name] = (entry.dataset.digest, source, context)
    return found


def test_runs_log_their_data_as_mlflow_dataset_inputs_and_say_what_they_are(first_run, registry_of):
    root, result = first_run
    client = registry_of(root)
    source = _data_version(root / "data/raw/source.dvc")
    target = _data_version(root / "data/raw/target.dvc")
    pool = _data_version(root / "data/raw/target_unlabeled.dvc")
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.run_name == (
        f"pipeline v{result.model_version} src:{source[:8]} tgt:{target[:8]}"
    )
    assert _inputs(parent) == {
        "source": (source, "data/raw/source", "source"),
        "target": (target, "data/raw/target", "target"),
        "target_unlabeled": (pool, "data/raw/target_unlabeled", "unlabeled"),
    }
    children = {
        run.data.tags["roadshift.stage"]: run
        for run in client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'",
        )
    }
    assert children["finetune"].info.run_name == "finetune (fine-tune on target)"
    assert _inputs(children["pretrain"]) == {"source": (source, "data/raw/source", "train")}
    assert _inputs(children["finetune"]) == {
        "target": (target, "data/raw/target", "train"),
        "target_unlabeled": (pool, "data/raw/target_unlabeled", "unlabeled"),
    }
    assert {k: v[2] for k, v in _inputs(children["evaluate"]).items()} == {
        "source": "test",
        "target": "test",
    }
    assert _inputs(children["register"]) == {"target": (target, "data/raw/target", "test")}
    # The Runs page filter: every run that read this target data version.
    found = mlflow.search_runs(
        [parent.info.experiment_id], filter_string=f"dataset.digest = '{target}'"
    )
    assert {result.mlflow_run_id, children["finetune"].info.run_id} <= set(found["run_id"])
    assert children["pretrain"].info.run_id not in set(found["run_id"])


def test_second_run_with_nothing_changed_skips_training_and_registers_nothing(first_run):
    from flows.pipeline import training_pipeline

    root, result = first_run
    again = training_pipeline(root=str(root))
    assert not any(run.ran for run in again.stages)
    assert again.model_version == result.model_version


def test_dvc_repro_reproduces_the_flows_outputs_bit_for_bit(first_run):
    root, _ = first_run
    lock_before = yaml.safe_load((root / "dvc.lock").read_text())
    subprocess.run(
        ["dvc", "repro", "--force"],
        cwd=root,
        env=venv_environment(),
        check=True,
        capture_output=True,
    )
    lock_after = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock_after["stages"]) == set(lock_before["stages"])
    for stage, recorded in lock_before["stages"].items():
        assert lock_after["stages"][stage].get("outs") == recorded.get("outs"), stage


def test_the_mlflow_ui_shows_the_runs_datasets_and_the_champion_alias(first_run, tmp_path):
    """Headless Chromium (Debian's, through Playwright) on `mlflow server` over this store."""
    from playwright.sync_api import expect, sync_playwright

    root, result = first_run
    source = _data_version(root / "data/raw/source.dvc")
    target = _data_version(root / "data/raw/target.dvc")
    experiment = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}").get_run(
        result.mlflow_run_id
    )
    server, url = start_mlflow_ui(root, tmp_path / "mlflow-ui.log")
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{url}/#/experiments/{experiment.info.experiment_id}/runs")
            expect(page.get_by_text("pipeline v1", exact=False).first).to_be_visible(timeout=60_000)
            # The Dataset column: each input's name with its DVC version as the digest.
            expect(page.get_by_text(f"source ({source})", exact=False).first).to_be_visible()
            assert f"target ({target})" in page.inner_text("body")
            page.goto(f"{url}/#/models/tiny-road-signs")
            expect(page.get_by_text("champion", exact=False).first).to_be_visible(timeout=60_000)
            browser.close()
    finally:
        stop_ui(server)
