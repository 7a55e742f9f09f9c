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
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from PIL import Image
from sklearn.metrics import f1_score

from roadshift.config import RegisterSection, parse_params
from roadshift.data.transforms import create_eval_transform
from roadshift.registry.aliases import champion_version
from roadshift.registry.gates import decide_promotion
from roadshift.registry.lineage import sha256_file
from roadshift.registry.model_card import DataSummary, render_model_card
from roadshift.registry.model_metrics import version_metrics
from roadshift.registry.register import RegistrationResult, load_champion, register_model_dir
from roadshift.registry.scoring import EvaluationSet
from roadshift.registry.tags import CHAMPION_GATE_METRIC
from roadshift.tracking import configure_tracking
from roadshift.train.models import ModelSpec, create_model, load_model_dir, save_model_dir

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
    assert not [key for key in tags if key.startswith("metrics.")]  # metrics live on the model
    assert version_metrics(MlflowClient().get_model_version(NAME, "1")) == {"target_macro_f1": 0.6}
    assert tags["git.commit"] == "c0ffee"
    assert tags["promotion.decision"] == "promoted"
    assert "no champion yet" in tags["promotion.reason"]


def test_registering_the_same_weights_again_registers_nothing(history):
    again = history["again"]
    assert again.result.already_registered
    assert again.result.version == "1"
    assert again.versions == 1
    assert again.aliases == history["first"].aliases


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
    # MlflowException: the scoring server answers it with a 400 and this message, no traceback
    with pytest.raises(MlflowException, match=message):
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


# --------------------------------------------------------------------------- model card, pyfunc


def test_each_version_gets_a_model_card_logged_with_its_run_and_tagged(history):
    tags = MlflowClient().get_model_version(NAME, "3").tags
    assert tags["model_card.uri"].startswith("runs:/")
    assert tags["model_card.uri"].endswith(f"/model_card/{NAME}/v3/model_card.md")
    card = mlflow.artifacts.load_text(tags["model_card.uri"])
    assert card.startswith(f"# Model card: {NAME} version 3\n")
    for section in (
        "## Intended use",
        "## Data",
        "## Metrics (target test split)",
        "## Promotion at registration",
        "## Limits",
        "## Lineage",
    ):
        assert section in card
    assert "Gate metric `target_macro_f1`: **0.7000**" in card
    assert "| git.commit | `c0ffee` |" in card
    assert "- margin: pass: target_macro_f1 0.7000 beats champion v1" in card


def test_the_logged_pyfunc_has_a_signature_and_a_uint8_image_batch_as_input_example(history):
    uri = f"models:/{NAME}/3"
    info = mlflow.models.get_model_info(uri)
    assert info.signature.outputs.input_names() == ["label", *(f"prob_{c}" for c in CLASSES)]
    # No input schema on purpose: MLflow would then refuse the second input form (PNG bytes).
    assert info.signature.inputs is None
    assert info.saved_input_example_info["type"] == "ndarray"
    example = Model.load(uri).load_input_example(mlflow.artifacts.download_artifacts(uri))
    assert example.shape == (1, 32, 32, 3)
    assert example.min() >= 0 and example.max() <= 255  # raw pixels, no training transforms
    predicted = mlflow.pyfunc.load_model(uri).predict(example)
    assert list(predicted.columns) == info.signature.outputs.input_names()


def test_the_model_card_names_the_data_and_the_limits():
    data = [
        DataSummary(
            "source",
            "US roads (MUTCD)",
            "data/raw/source",
            "abc.dir",
            {"train": 70, "val": 15, "test": 15},
            CLASSES,
            synthetic=True,
        ),
        DataSummary(
            "target",
            "Indian roads (IRC:67)",
            "data/raw/target",
            "def.dir",
            {"train": 12, "val": 6, "test": 9},
            CLASSES,
            synthetic=True,
        ),
    ]
    per_class = {
        "stop": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 3},
        "give_way": {"precision": 0.5, "recall": 0.2, "f1": 0.3, "support": 3},
        "no_entry": {"precision": 0.6, "recall": 0.4, "f1": 0.5, "support": 3},
    }
    metrics = {"target_macro_f1": 0.55, "target_accuracy": 0.6, "domain_gap_accuracy": 0.3}
    card = render_model_card(NAME, "4", metrics, per_class, {"git.commit": "c0ffee"}, data, GATES)
    assert "| target | Indian roads (IRC:67) | `def.dir` | 12 | 6 | 9 | 3 |" in card
    assert "**Synthetic data** (source, target)" in card
    assert "**Domain gap**: the source-only model loses 0.300 accuracy" in card
    assert "**Classes with low recall** (below 0.5): give_way 0.20, no_entry 0.40" in card
    assert "as few as 3 test images per class" in card
    assert "| give_way | 0.500 | 0.200 | 0.300 | 3 |" in card
    assert "from Indian roads (IRC:67) into one of 3 classes (stop, give_way, no_entry)" in card


# --------------------------------------------------------------------------- champion, same split


def _evaluation_set(per_class: int = 4, seed: int = 5) -> EvaluationSet:
    rng = np.random.default_rng(seed)
    labels = tuple(c for c in CLASSES for _ in range(per_class))
    images = tuple(_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in labels)
    return EvaluationSet(images, labels, CLASSES, f"a crafted split ({len(labels)} images)")


def _scored_by_hand(model_dir: Path, evaluation: EvaluationSet) -> tuple[float, np.ndarray]:
    """The champion's macro-F1 and recalls computed here, independently of the registry."""
    torch_model, spec = load_model_dir(model_dir)
    transform = create_eval_transform(spec.image_size, spec.mean, spec.std)
    images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in evaluation.images]
    with torch.inference_mode():
        batch = torch.stack([transform(image=image)["image"] for image in images])
        predicted = [spec.class_names[i] for i in torch_model(batch).argmax(dim=1).tolist()]
    truth = list(evaluation.labels)
    f1 = f1_score(truth, predicted, labels=list(CLASSES), average="macro", zero_division=0)
    pairs = list(zip(predicted, truth, strict=True))
    recall = [np.mean([p == c for p, t in pairs if t == c]) for c in CLASSES]
    return float(f1), np.array(recall)


def _perfect(classes=CLASSES) -> dict[str, dict[str, float]]:
    return {c: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 4.0} for c in classes}


def test_the_champion_is_scored_on_the_challengers_test_split_not_by_its_stored_tags(
    store, history
):
    cfg = RegisterSection(model_name=f"{NAME}-live", min_improvement=0.02)
    evaluation = _evaluation_set()
    with mlflow.start_run(run_name="register-live"):
        # Its stored score, 0.95, came from some other test split; today it is far lower.
        register_model_dir(store / "models" / "first", {"target_macro_f1": 0.95}, {}, cfg)
        result = register_model_dir(
            store / "models" / "worse",
            {"target_macro_f1": 0.6},
            {},
            cfg,
            per_class=_perfect(),
            evaluation=evaluation,
        )
    f1, recall = _scored_by_hand(store / "models" / "first", evaluation)
    assert result.champion_scores.macro_f1 == pytest.approx(f1)
    assert [result.champion_scores.recall[c] for c in CLASSES] == pytest.approx(recall)
    assert result.champion_scores.source == "scored on a crafted split (12 images)"
    assert result.decision == "promoted", result.reason
    assert f"beats champion v1 {f1:.4f}" in result.reason
    tags = MlflowClient().get_model_version(cfg.model_name, result.version).tags
    assert float(tags["champion_target_macro_f1"]) == pytest.approx(f1)
    assert tags["champion_scores_from"] == "scored on a crafted split (12 images)"
    assert float(tags["champion_recall.stop"]) == pytest.approx(recall[0])


def test_a_champion_that_cannot_be_loaded_falls_back_to_its_stored_tags_and_says_so(store, history):
    cfg = RegisterSection(model_name=f"{NAME}-unloadable", min_improvement=0.02)
    client = MlflowClient()
    with mlflow.start_run(run_name="register-unloadable"):
        register_model_dir(store / "models" / "first", {"target_macro_f1": 0.65}, {}, cfg)
        served_from = Path(client.get_model_version_download_uri(cfg.model_name, "1")[7:])
        (served_from / "MLmodel").unlink()  # the version stays registered, but cannot load
        result = register_model_dir(
            store / "models" / "worse",
            {"target_macro_f1": 0.6},
            {},
            cfg,
            per_class=_perfect(),
            evaluation=_evaluation_set(),
        )
    assert result.champion_scores.macro_f1 == 0.65
    assert result.champion_scores.source.startswith(
        "stored metrics of v1: it could not be loaded to score on a crafted split (12 images) ("
    )
    assert result.decision == "refused"
    tags = client.get_model_version(cfg.model_name, result.version).tags
    assert tags["champion_scores_from"] == result.champion_scores.source
    assert "gain -0.0500" in tags["promotion.reason"]


def test_a_version_keeps_its_metrics_on_its_logged_model_and_says_what_it_is(history):
    """The versions table shows a short description, the version page the model metrics."""
    client = MlflowClient()
    version = client.get_model_version(NAME, "3")
    metrics = mlflow.get_logged_model(version.source.removeprefix("models:/")).metrics
    assert {m.key: m.value for m in metrics} == {"target_macro_f1": 0.7}
    assert version.description.startswith("Target test split: target_macro_f1 0.7000.")
    assert "Promotion at registration: promoted: " in version.description
    refused = client.get_model_version(NAME, "2").description
    assert "Promotion at registration: refused: " in refused
