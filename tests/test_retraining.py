"""Scheduled retraining: nothing new, nothing trained; new target data, fine-tune; gates decide."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import mlflow
import pytest
from mlflow import MlflowClient

from roadshift.config import load_params
from roadshift.data.synth import add_target_batch
from roadshift.registry.retraining import retrain_decision
from tests.helpers import TINY_PARAMS, make_project

CHAMPION_TAGS = {
    "data.source.version": "s1.dir",
    "data.target.version": "t1.dir",
    "params.hash": "p1",
}


def test_no_champion_means_train_the_first_one():
    decision = retrain_decision(None, None, {"source": "s1.dir", "target": "t1.dir"}, "p1")
    assert decision.retrain and "no champion" in decision.reason


def test_same_data_and_params_as_the_champion_means_nothing_to_retrain():
    decision = retrain_decision(CHAMPION_TAGS, "v3", {"source": "s1.dir", "target": "t1.dir"}, "p1")
    assert not decision.retrain
    assert decision.reason.startswith("nothing to retrain: champion v3")


@pytest.mark.parametrize(
    ("versions", "params_hash", "change"),
    [
        ({"source": "s1.dir", "target": "t2.dir"}, "p1", "target data t1.dir -> t2.dir"),
        ({"source": "s2.dir", "target": "t1.dir"}, "p1", "source data s1.dir -> s2.dir"),
        ({"source": "s1.dir", "target": "t1.dir"}, "p2", "params changed"),
    ],
)
def test_new_data_or_params_mean_retrain_and_say_what_changed(versions, params_hash, change):
    decision = retrain_decision(CHAMPION_TAGS, "v3", versions, params_hash)
    assert decision.retrain and change in decision.reason


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook_block(prefect_server):
    from prefect.blocks.webhook import Webhook

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    Webhook(method="POST", url=url, allow_private_urls=True).save("roadshift-test-hook")
    Hook.received.clear()
    yield "roadshift-test-hook"
    server.shutdown()


@pytest.mark.slow
@pytest.mark.integration
def test_three_scheduled_runs_train_then_skip_then_fine_tune_the_new_batch(
    tmp_path, prefect_server, webhook_block
):
    from prefect.artifacts import Artifact

    from flows.retrain import DECISION_ARTIFACT_KEY, scheduled_retraining

    params = {**TINY_PARAMS, "retrain": {"notify_webhook_block": webhook_block}}
    root = make_project(tmp_path / "project", params)
    try:
        first = scheduled_retraining(root=str(root))
        assert first.retrained and "no champion" in first.reason
        assert first.pipeline.model_version == "1" and "champion" in first.pipeline.aliases
        assert Hook.received[-1]["event"] == "champion" and Hook.received[-1]["version"] == "1"

        second = scheduled_retraining(root=str(root))
        assert not second.retrained and second.pipeline is None
        assert second.reason.startswith("nothing to retrain: champion v1")
        assert "Nothing to retrain" in Artifact.get(DECISION_ARTIFACT_KEY).data

        tiny = load_params(root / "params.yaml")
        add_target_batch(root / "data/raw/target", 2, tiny.synth.image_size, 123, "week1")
        third = scheduled_retraining(root=str(root))
        assert third.retrained and "target data" in third.reason and "source" not in third.reason
        ran = {run.stage: run.ran for run in third.pipeline.stages}
        assert ran["pretrain"] is False and ran["finetune"] is True
        assert third.pipeline.model_version == "2"

        client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
        version = client.get_model_version("tiny-road-signs", "2")
        champion = client.get_model_version_by_alias("tiny-road-signs", "champion")
        decision = version.tags["promotion.decision"]
        assert decision in {"promoted", "refused"}
        assert (champion.version == "2") == (decision == "promoted")
        assert (
            version.tags["data.target.version"]
            != client.get_model_version("tiny-road-signs", "1").tags["data.target.version"]
        )
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_the_deployment_serves_params_cron_one_run_at_a_time(tmp_path, tiny_params):
    from flows.retrain import retraining_deployment

    tiny_params["retrain"] = {"cron": "30 2 * * *", "timezone": "Asia/Kolkata"}
    root = make_project(tmp_path / "project", tiny_params)
    params = load_params(root / "params.yaml")
    deployment = retraining_deployment(root, params)
    assert deployment.name == "scheduled-retraining"
    assert deployment.concurrency_limit == 1
    assert deployment.parameters == {"root": str(root)}
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "30 2 * * *"
    assert schedule.schedule.timezone == "Asia/Kolkata"
