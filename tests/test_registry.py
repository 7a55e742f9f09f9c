"""The registry for real: MLflow on SQLite, tiny real models, the promotion history of one name."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from roadshift.config import RegisterSection, parse_params
from roadshift.data.transforms import create_eval_transform
from roadshift.lineage import sha256_file
from roadshift.models import ModelSpec, create_model, load_model_dir, save_model_dir
from roadshift.registry import (
    CHAMPION_GATE_METRIC,
    RegistrationResult,
    champion_version,
    decide_promotion,
    load_champion,
    register_model_dir,
)
from roadshift.tracking import configure_tracking

CLASSES = ("stop", "give_way", "no_entry")
NAME = "test-road-signs"
GATES = RegisterSection(model_name=NAME, min_improvement=0.02)


def make_model_dir(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", len(CLASSES))
    spec = ModelSpec("mobilenet_v3_small", CLASSES, image_size=32, extra={"seed": str(seed)})
    return save_model_dir(model, spec, path)


@dataclass
class Step:
    result: RegistrationResult
    seconds: float
    aliases: dict[str, str]  # the registered model's aliases right after this step
    versions: int


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module: creating one costs seconds of migrations."""
    root = tmp_path_factory.mktemp("registry")
    configure_tracking(parse_params({"tracking": {"experiment": "registry-tests"}}), root)
    yield root
    mlflow.set_tracking_uri(None)  # back to MLflow's default for later modules


def _register(model_dir: Path, f1: float, cfg: RegisterSection = GATES) -> Step:
    started = time.perf_counter()
    result = register_model_dir(model_dir, {"target_macro_f1": f1}, {"git.commit": "c0ffee"}, cfg)
    seconds = time.perf_counter() - started
    client = MlflowClient()
    return Step(
        result,
        seconds,
        {k: str(v) for k, v in client.get_registered_model(cfg.model_name).aliases.items()},
        len(client.search_model_versions(f"name = '{cfg.model_name}'")),
    )


@pytest.fixture(scope="module")
def history(store) -> dict[str, Step]:
    """First model, the same weights again, a worse challenger, then a better one."""
    first_dir = make_model_dir(store / "models" / "first", seed=1)
    with mlflow.start_run(run_name="register"):
        steps = {
            "first": _register(first_dir, 0.60),
            "again": _register(first_dir, 0.60),
            "worse": _register(make_model_dir(store / "models" / "worse", seed=2), 0.61),
            "better": _register(make_model_dir(store / "models" / "better", seed=3), 0.70),
        }
    print(
        f"\nlog + register: {steps['first'].seconds:.2f} s first, "
        f"{steps['better'].seconds:.2f} s later; no-op {steps['again'].seconds:.3f} s"
    )
    return steps


def test_first_registration_becomes_challenger_and_champion_with_lineage(store, history):
    first = history["first"]
    assert first.result.version == "1"
    assert not first.result.already_registered
    assert first.result.aliases == ("challenger", "champion")
    assert first.result.decision == "promoted"
    assert first.aliases == {"challenger": "1", "champion": "1"}
    tags = MlflowClient().get_model_version(NAME, "1").tags
    assert tags["weights.sha256"] == sha256_file(store / "models/first/weights.safetensors")
    assert tags["metrics.target_macro_f1"] == "0.6"
    assert tags["git.commit"] == "c0ffee"
    assert tags["promotion.decision"] == "promoted"
    assert "no champion yet" in tags["promotion.reason"]


def test_registering_the_same_weights_again_registers_nothing(history):
    again = history["again"]
    assert again.result.already_registered
    assert again.result.version == "1"
    assert again.versions == 1
    assert again.aliases == history["first"].aliases
    assert again.seconds < 1.0


def test_a_challenger_short_of_the_margin_is_refused_and_the_champion_stays(history):
    worse = history["worse"]
    assert worse.result.version == "2"
    assert worse.result.decision == "refused"
    assert worse.result.aliases == ("challenger",)
    assert worse.aliases == {"challenger": "2", "champion": "1"}
    reason = MlflowClient().get_model_version(NAME, "2").tags["promotion.reason"]
    assert "gain +0.0100 is not above register.min_improvement=0.0200" in reason
    assert reason == worse.result.reason


def test_a_better_challenger_is_promoted_and_the_old_champion_kept_as_previous(history):
    better = history["better"]
    assert better.result.decision == "promoted"
    assert better.result.aliases == ("challenger", "champion")
    assert better.aliases == {"challenger": "3", "champion": "3", "previous-champion": "1"}
    assert str(champion_version(MlflowClient(), NAME).version) == "3"
    # MLflow 3.17's SQL store hands versions back as int here; results carry them as str.
    assert MlflowClient().get_model_version_by_alias(NAME, "champion").version in (3, "3")
    assert "beats champion v1" in better.result.reason


def test_the_champion_loads_from_the_registry_and_predicts_like_evaluation_does(store, history):
    model = load_champion(NAME)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 45, 57, 3), dtype=np.uint8)  # not the trained 32x32

    from_array = model.predict(images)

    assert list(from_array.columns) == ["label", *(f"prob_{c}" for c in CLASSES)]
    assert set(from_array["label"]) <= set(CLASSES)
    np.testing.assert_allclose(from_array.iloc[:, 1:].sum(axis=1), 1.0, rtol=1e-5)
    # The same preprocessing as the evaluate stage, on the same weights: no train/serve skew.
    torch_model, spec = load_model_dir(store / "models" / "better")
    transform = create_eval_transform(spec.image_size, spec.mean, spec.std)
    with torch.inference_mode():
        batch = torch.stack([transform(image=image)["image"] for image in images])
        expected = torch.softmax(torch_model(batch), dim=1).numpy()
    np.testing.assert_allclose(from_array.iloc[:, 1:].to_numpy(), expected, atol=1e-5)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_champion_predicts_from_png_bytes_as_from_the_decoded_array(history):
    model = load_champion(NAME)
    images = np.random.default_rng(1).integers(0, 256, size=(3, 20, 70, 3), dtype=np.uint8)
    from_png = model.predict(pd.DataFrame({"image": [_png(image) for image in images]}))
    pd.testing.assert_frame_equal(from_png, model.predict(images))


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [
        (np.zeros((2, 32, 32), dtype=np.uint8), r"shaped \(N, H, W, 3\)"),
        (np.zeros((1, 32, 32, 3), dtype=np.float32), "raw uint8 pixel values"),
        (pd.DataFrame({"pixels": [b"x"]}), "'image' column"),
        (pd.DataFrame({"image": [b"not an image"]}), "row 0: bytes are not an image"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(history, bad_input, message):
    with pytest.raises(ValueError, match=message):
        load_champion(NAME).predict(bad_input)


def test_a_first_model_below_the_floor_does_not_become_champion(store, history):
    floor = RegisterSection(model_name=f"{NAME}-floor", min_macro_f1=0.9)
    with mlflow.start_run(run_name="register-floor"):
        step = _register(store / "models" / "first", 0.60, floor)
    assert step.result.decision == "refused"
    assert "below the floor register.min_macro_f1=0.9000" in step.result.reason
    assert step.aliases == {"challenger": "1"}
    assert champion_version(MlflowClient(), floor.model_name) is None


def test_registration_needs_the_gate_metric_and_an_active_run(store, history):
    fresh = RegisterSection(model_name=f"{NAME}-fresh")
    model_dir = store / "models" / "first"
    with pytest.raises(ValueError, match="metrics lack 'target_macro_f1'"):
        register_model_dir(model_dir, {"target_accuracy": 0.9}, {}, fresh)
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        register_model_dir(model_dir, {"target_macro_f1": 0.9}, {}, fresh)


@pytest.mark.parametrize(
    ("challenger", "champion", "min_improvement", "promote"),
    [
        (0.80, 0.70, 0.10, True),  # exactly the margin, despite float rounding
        (0.70, 0.70, 0.00, False),  # a tie keeps the champion
        (0.71, 0.70, 0.00, True),
        (0.75, 0.70, 0.10, False),
        (0.90, None, 0.00, False),  # a champion with no score is not replaced automatically
    ],
)
def test_promotion_gates(challenger, champion, min_improvement, promote):
    cfg = RegisterSection(model_name=NAME, min_improvement=min_improvement)
    decision = decide_promotion(challenger, champion, "v1", cfg)
    assert decision.promote is promote, decision.reason


def test_the_champions_score_on_the_same_test_set_is_preferred_when_given(store, history):
    cfg = RegisterSection(model_name=f"{NAME}-same-test-set")
    with mlflow.start_run(run_name="register-same-test-set"):
        register_model_dir(store / "models" / "first", {"target_macro_f1": 0.5}, {}, cfg)
        # Stored score 0.5 would lose to 0.6; re-scored on today's test set the champion has 0.65.
        result = register_model_dir(
            store / "models" / "worse",
            {"target_macro_f1": 0.6, CHAMPION_GATE_METRIC: 0.65},
            {},
            cfg,
        )
    assert result.decision == "refused"
    assert "champion v1 0.6500" in result.reason
