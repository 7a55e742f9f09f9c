"""The flow's gates, for real: a new target batch is a new data version that retrains without
re-pretraining; failing validation stops the flow before training and leaves the registry alone."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from roadshift.cli import main
from tests.helpers import TINY_PARAMS, make_project

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = TINY_PARAMS["register"]["model_name"]


@pytest.fixture(scope="module")
def client(tmp_path_factory, prefect_server):
    """One project for the module; MLflow pointed at its store, then forgotten."""
    root = make_project(tmp_path_factory.mktemp("gates"), TINY_PARAMS)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    yield root, MlflowClient(uri)
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def two_runs(client, tmp_path_factory):
    """The pipeline, then a new labelled target batch via `roadshift data add`, then again."""
    from flows.pipeline import training_pipeline
    from roadshift.data.synth import add_target_batch

    root, _ = client
    first = training_pipeline(root=str(root))
    incoming = tmp_path_factory.mktemp("incoming")
    add_target_batch(incoming, per_class=2, image_size=32, seed=7, batch_id="week1")
    assert main(["--root", str(root), "data", "add", "target", str(incoming / "train")]) == 0
    second = training_pipeline(root=str(root))
    return first, second


def _tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    return client.get_run(run_id).data.tags


def test_a_new_target_batch_is_a_new_target_data_version_and_pretrain_is_skipped(client, two_runs):
    _, mlflow_client = client
    first, second = two_runs
    before, after = (
        _tags(mlflow_client, first.mlflow_run_id),
        _tags(mlflow_client, second.mlflow_run_id),
    )
    assert after["data.target.version"] != before["data.target.version"]
    assert after["data.source.version"] == before["data.source.version"]
    ran = {run.stage: run.ran for run in second.stages}
    assert ran["pretrain"] is False
    assert ran["finetune"] is True
    assert ran["scratch"] is True


def test_the_parent_run_carries_the_validation_report_and_the_contact_sheet(client, two_runs):
    _, mlflow_client = client
    first, _ = two_runs
    top = {item.path for item in mlflow_client.list_artifacts(first.mlflow_run_id)}
    assert "contact_sheet.png" in top
    validation = {
        item.path for item in mlflow_client.list_artifacts(first.mlflow_run_id, "validation")
    }
    assert "validation/summary.json" in validation
    for key in ("scratch_target_accuracy", "scratch_target_macro_f1"):
        assert 0.0 <= first.metrics[key] <= 1.0


def test_failing_validation_stops_the_flow_before_training_and_leaves_the_registry_alone(
    client, two_runs
):
    """Runs after the two good runs, so there is a champion to leave untouched."""
    from flows.pipeline import training_pipeline
    from tasks.reports import ValidationGateError

    root, mlflow_client = client
    versions_before = mlflow_client.search_model_versions(f"name = '{MODEL}'")
    champion_before = mlflow_client.get_model_version_by_alias(MODEL, "champion").version
    target = root / "data/raw/target"
    for split in ("train", "val", "test"):  # a class only the target has: label sets differ
        (target / split / "stop").rename(target / split / "stop_sign")
    model_before = (root / "models/target/weights.safetensors").read_bytes()

    with pytest.raises(ValidationGateError) as raised:
        training_pipeline(root=str(root))

    message = str(raised.value)
    assert "data validation failed" in message
    assert str(Path("reports/validation/summary.json")) in message
    assert "stop_sign" in message
    from prefect.artifacts import Artifact

    published = Artifact.get("data-validation")
    assert published is not None and "Data validation FAILED" in str(published.data)
    assert len(mlflow_client.search_model_versions(f"name = '{MODEL}'")) == len(versions_before)
    assert mlflow_client.get_model_version_by_alias(MODEL, "champion").version == champion_before
    assert (root / "models/target/weights.safetensors").read_bytes() == model_before
