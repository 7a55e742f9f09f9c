"""Tracking with real MLflow on SQLite: URI precedence, the experiment, one run per stage."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from roadshift.config import Params, TrackingSection, parse_params
from roadshift.tracking import (
    PARENT_RUN_ENV,
    MetricLogger,
    configure_tracking,
    flatten_params,
    resolve_tracking_uri,
    stage_params,
    stage_run,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Params, str]:
    """One store for the module: a fresh SQLite store costs seconds of migrations."""
    root = tmp_path_factory.mktemp("tracked")
    (root / "dvc.yaml").write_text(
        "stages:\n  pretrain:\n    cmd: roadshift stage pretrain\n    params: [base, pretrain]\n"
    )
    params = parse_params({"tracking": {"experiment": "tracking-tests"}})
    experiment_id = configure_tracking(params, root)
    yield root, params, experiment_id
    mlflow.set_tracking_uri(None)  # back to MLflow's default for later modules


def test_tracking_uri_precedence_is_env_then_config_then_local_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(TrackingSection(), tmp_path)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"

    configured = TrackingSection(tracking_uri="http://mlflow.team:5000")
    assert resolve_tracking_uri(configured, tmp_path) == "http://mlflow.team:5000"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/env.db")
    assert resolve_tracking_uri(configured, tmp_path) == "sqlite:////elsewhere/env.db"
    assert resolve_tracking_uri(TrackingSection(), tmp_path) == "sqlite:////elsewhere/env.db"


def test_configure_tracking_creates_the_experiment_once_with_artifacts_under_the_root(project):
    root, params, experiment_id = project
    assert (root / "mlruns" / "mlflow.db").is_file()
    experiment = MlflowClient().get_experiment(experiment_id)
    assert experiment.name == "tracking-tests"
    assert experiment.artifact_location == (root / "mlruns" / "artifacts").as_uri()
    assert configure_tracking(params, root) == experiment_id
    assert mlflow.get_tracking_uri() == f"sqlite:///{root.resolve()}/mlruns/mlflow.db"
    # MLflow exports the URI it is given; left set, it would outrank the next project's config.
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_flatten_params_uses_dotted_keys_and_string_values():
    flat = flatten_params(parse_params({"pretrain": {"lr": 0.01}}))
    assert flat["pretrain.lr"] == "0.01"
    assert flat["pretrain.augment.enabled"] == "True"
    assert flat["prepare.extensions"].startswith('[".jpg"')
    assert flat["model.weights"] == "None"
    assert all(isinstance(value, str) for value in flat.values())


def test_stage_params_follow_dvc_yaml_else_the_stages_own_section(project):
    root, params, _ = project
    pretrain = stage_params("pretrain", params, root)
    assert {key.split(".")[0] for key in pretrain} == {"base", "pretrain"}
    assert {key.split(".")[0] for key in stage_params("register", params, root)} == {"register"}
    assert stage_params("pipeline", params, root) == flatten_params(params)


def test_stage_run_nests_under_the_parent_named_in_the_environment(project, monkeypatch):
    root, params, experiment_id = project
    client = MlflowClient()
    # The parent lives in another process (the flow); here it is only a run id.
    parent = client.create_run(experiment_id, run_name="training-pipeline")
    monkeypatch.setenv(PARENT_RUN_ENV, parent.info.run_id)

    log_epoch = MetricLogger()
    with stage_run("pretrain", params, root) as run:
        for epoch in range(3):
            log_epoch({"train_loss": 1.0 / (epoch + 1), "val_accuracy": 0.3 * epoch}, epoch)

    child = client.get_run(run.info.run_id)
    assert child.info.run_name == "pretrain (pretrain on source)"
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["roadshift.stage"] == "pretrain"
    assert child.data.tags["roadshift.omp_wait_policy"]  # how its OpenMP threads waited
    assert child.data.params["pretrain.lr"] == str(params.pretrain.lr)
    assert "finetune.lr" not in child.data.params
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert mlflow.active_run() is None


def test_stage_run_without_a_parent_is_standalone_and_fails_loudly(project, monkeypatch):
    root, params, _ = project
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    with pytest.raises(ZeroDivisionError), stage_run("evaluate", params, root) as run:
        1 / 0  # noqa: B018
    failed = MlflowClient().get_run(run.info.run_id)
    assert failed.info.status == "FAILED"
    assert "mlflow.parentRunId" not in failed.data.tags
    assert mlflow.active_run() is None


def test_metric_logger_refuses_to_start_a_stray_run():
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        MetricLogger()({"train_loss": 1.0}, 0)


def test_an_unreachable_tracking_server_becomes_one_error_naming_it(monkeypatch):
    from roadshift.tracking import TrackingUnavailableError, explain_tracking_outage
    from tests.team_stack import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    expected = f"{uri} stopped answering while testing"
    with (
        pytest.raises(TrackingUnavailableError, match=expected),
        explain_tracking_outage(uri, "testing"),
    ):
        MlflowClient(uri).search_experiments()


def test_other_failures_pass_through_untouched(tmp_path):
    from roadshift.tracking import explain_tracking_outage

    with (
        pytest.raises(KeyError),
        explain_tracking_outage(f"sqlite:///{tmp_path / 'm.db'}", "testing"),
    ):
        raise KeyError("not a tracking problem")


def test_the_retry_budget_comes_from_params_unless_mlflow_variables_are_set(monkeypatch):
    from roadshift.config import TrackingSection
    from roadshift.tracking import bound_request_retries

    for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "TIMEOUT"):
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", "-")  # so the test's end restores it
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    bound_request_retries(TrackingSection(request_retries=2, request_backoff_seconds=3))
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
