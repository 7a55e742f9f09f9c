"""No champion worse than its own baselines, none that forgot the source.

The baseline gates on crafted figures (pure), then for real: registrations and a manual
promote on an MLflow SQLite store with tiny real models, reading the tags they leave.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from roadshift.config import RegisterSection, parse_params
from roadshift.registry.aliases import current_user, promote_version
from roadshift.registry.gates import (
    Baselines,
    Scores,
    baselines_from_metrics,
    baselines_from_tags,
    check_gates,
    scores_from_metrics,
)
from roadshift.registry.model_card import render_model_card
from roadshift.registry.model_metrics import version_metrics
from roadshift.registry.register import RegistrationResult, register_model_dir
from roadshift.tracking import configure_tracking
from tests.helpers import make_model_dir


def run(
    f1: float = 0.80,
    source_only: float | None = 0.50,
    scratch: float | None = 0.60,
    source_before: float | None = 0.95,
    source_after: float | None = 0.93,
) -> Baselines:
    return Baselines(f1, source_only, scratch, source_before, source_after)


def decide(baselines: Baselines | None, **cfg: object):
    challenger = Scores(baselines.target_macro_f1 if baselines else 0.8, baselines=baselines)
    return check_gates(challenger, None, None, RegisterSection(**cfg))


def verdicts(decision) -> dict[str, str]:
    """Each gate as its ``promotion.gate.<name>`` tag reads: ``status: reason``."""
    return {gate.name: f"{gate.status}: {gate.reason}" for gate in decision.gates}


# --------------------------------------------------------------------------- beat the baselines


def test_a_challenger_that_beats_both_baselines_of_its_run_passes_both_gates():
    decision = decide(run(f1=0.80, source_only=0.50, scratch=0.60))

    assert decision.promote
    tags = verdicts(decision)
    assert tags["beats_scratch"] == (
        "pass: target_macro_f1 0.8000 beats the scratch baseline of its own run "
        "(scratch_target_macro_f1 0.6000) by +0.2000"
    )
    assert tags["beats_source_only"] == (
        "pass: target_macro_f1 0.8000 beats the source-only baseline of its own run "
        "(source_only_target_macro_f1 0.5000) by +0.3000"
    )
    assert [g.name for g in decision.gates] == [
        "floor",
        "beats_scratch",
        "beats_source_only",
        "margin",
    ]


def test_losing_to_the_scratch_baseline_refuses_the_challenger_and_says_so():
    decision = decide(run(f1=0.55, source_only=0.50, scratch=0.60))

    assert not decision.promote and decision.label == "refused"
    tags = verdicts(decision)
    assert tags["beats_scratch"] == (
        "fail: target_macro_f1 0.5500 does not beat the scratch baseline of its own run "
        "(scratch_target_macro_f1 0.6000, gain -0.0500; register.require_beats_baselines)"
    )
    assert tags["beats_source_only"].startswith("pass: ")
    assert tags["beats_scratch"].split(": ", 1)[1] in decision.reason


def test_only_matching_the_source_only_baseline_is_not_beating_it():
    decision = decide(run(f1=0.50, source_only=0.50, scratch=0.40))

    assert not decision.promote
    assert verdicts(decision)["beats_source_only"].startswith(
        "fail: target_macro_f1 0.5000 does not beat the source-only baseline of its own run "
        "(source_only_target_macro_f1 0.5000, gain +0.0000"
    )


def test_without_a_scratch_baseline_that_part_is_skipped_and_source_only_still_decides():
    passing = decide(run(f1=0.70, source_only=0.50, scratch=None))
    failing = decide(run(f1=0.45, source_only=0.50, scratch=None))

    assert passing.promote and not failing.promote
    for decision in (passing, failing):
        assert verdicts(decision)["beats_scratch"].startswith(
            "skipped: no scratch baseline in the challenger's run (no scratch_target_macro_f1: "
            "evaluate.scratch_baseline is false"
        )
    assert verdicts(failing)["beats_source_only"].startswith("fail: ")


@pytest.mark.parametrize("baselines", [None, Baselines(target_macro_f1=0.8)], ids=["none", "empty"])
def test_unknown_baselines_skip_both_gates_without_blocking(baselines):
    decision = decide(baselines)

    assert decision.promote
    tags = verdicts(decision)
    for name in ("beats_scratch", "beats_source_only"):
        assert tags[name] == (
            "skipped: baselines unknown: the challenger's run recorded no "
            "source_only_target_macro_f1, so register.require_beats_baselines was not checked"
        )


def test_the_baseline_gates_can_be_switched_off():
    decision = decide(run(f1=0.40, source_only=0.50, scratch=0.60), require_beats_baselines=False)

    assert decision.promote
    assert [g.name for g in decision.gates] == ["floor", "margin"]


def test_the_runs_own_macro_f1_is_compared_not_a_rescored_one():
    """``roadshift promote`` re-scores a version on today's test split; its baselines come from
    its own run's split, so the gate compares that run's target macro-F1 with them."""
    rescored = Scores(0.90, baselines=run(f1=0.55, source_only=0.50, scratch=0.60))

    decision = check_gates(rescored, None, None, RegisterSection())

    assert not decision.promote
    assert verdicts(decision)["beats_scratch"].startswith("fail: target_macro_f1 0.5500")


# --------------------------------------------------------------------------- forgetting the source


@pytest.mark.parametrize(
    ("before", "after", "status", "phrase"),
    [
        pytest.param(0.95, 0.93, "pass", "drop +0.0200 is within", id="small-drop"),
        pytest.param(0.95, 0.90, "pass", "drop +0.0500 is within", id="exactly-the-limit"),
        pytest.param(0.90, 0.92, "pass", "drop -0.0200 is within", id="source-improved"),
        pytest.param(
            0.95,
            0.80,
            "fail",
            "drop +0.1500 is more than register.max_source_accuracy_drop=0.0500: "
            "the fine-tuned model forgot the source",
            id="forgot-the-source",
        ),
        pytest.param(
            0.95,
            None,
            "skipped",
            "baselines unknown: the challenger's run recorded no finetuned_source_accuracy",
            id="fine-tuned-not-scored-on-source",
        ),
    ],
)
def test_the_source_accuracy_drop_gate(before, after, status, phrase):
    decision = decide(run(source_before=before, source_after=after), max_source_accuracy_drop=0.05)

    gate = verdicts(decision)["source_accuracy_drop"]
    assert gate.startswith(f"{status}: ")
    assert phrase in gate
    assert decision.promote is (status != "fail")


def test_the_source_accuracy_drop_gate_is_off_by_default():
    decision = decide(run(source_before=0.95, source_after=0.10))

    assert decision.promote
    assert "source_accuracy_drop" not in verdicts(decision)


# --------------------------------------------------------------------------- the figures


EVALUATE_JSON = {  # the keys of metrics/evaluate.json the gates read, plus some they do not
    "target_macro_f1": 0.62,
    "target_accuracy": 0.64,
    "source_only_target_macro_f1": 0.41,
    "scratch_target_macro_f1": 0.70,
    "source_only_source_accuracy": 0.97,
    "finetuned_source_accuracy": 0.88,
    "domain_gap_accuracy": 0.5,
}
EXPECTED = Baselines(0.62, 0.41, 0.70, 0.97, 0.88)


def test_the_baselines_come_from_evaluate_json_and_back_from_the_version_tags():
    assert baselines_from_metrics(EVALUATE_JSON) == EXPECTED
    assert scores_from_metrics(EVALUATE_JSON, None, "evaluate").baselines == EXPECTED
    tags = {f"metrics.{k}": repr(v) for k, v in EVALUATE_JSON.items()}  # as registration writes
    assert baselines_from_tags({**tags, "metrics.recall.stop": "0.5", "git.commit": "x"}) == (
        EXPECTED
    )
    assert baselines_from_metrics({"scratch_target_macro_f1": float("nan")}) == Baselines()


def test_the_model_card_names_the_baseline_gates_and_the_source_accuracy_retained():
    decision = decide(run(f1=0.62, source_only=0.41, scratch=0.70))
    cfg = RegisterSection(max_source_accuracy_drop=0.05)

    card = render_model_card("signs", "3", EVALUATE_JSON, None, {}, [], cfg, decision)

    assert "`register.require_beats_baselines=True`" in card
    assert "`register.max_source_accuracy_drop=0.05`" in card
    assert "| finetuned_source_accuracy | 0.8800 |" in card
    assert (
        "**Source retained**: on the source test split this model scores 0.880 accuracy, "
        "the source-only model 0.970 (-0.090)"
    ) in card
    assert "- beats_scratch: fail: target_macro_f1 0.6200 does not beat the scratch" in card


# --------------------------------------------------------------------------- registry, real


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("baseline-gates")
    configure_tracking(parse_params({"tracking": {"experiment": "baseline-gates"}}), root)
    yield root
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


class Registry:
    """Registers tiny real models under one name with evaluate.json-shaped metrics."""

    seed = 500

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name

    def register(self, metrics: dict[str, float], **cfg: object) -> RegistrationResult:
        Registry.seed += 1
        model_dir = make_model_dir(
            self.root / "models" / f"{self.name}-{Registry.seed}", Registry.seed
        )
        with mlflow.start_run(run_name=f"register-{self.name}"):
            return register_model_dir(
                model_dir, metrics, {}, RegisterSection(model_name=self.name, **cfg)
            )

    def tags(self, version: str) -> dict[str, str]:
        return MlflowClient().get_model_version(self.name, version).tags

    def aliases(self) -> dict[str, str]:
        registered = MlflowClient().get_registered_model(self.name)
        return {k: str(v) for k, v in registered.aliases.items()}


def evaluated(f1: float, scratch: float | None) -> dict[str, float]:
    metrics = {
        "target_macro_f1": f1,
        "source_only_target_macro_f1": 0.40,
        "source_only_source_accuracy": 0.95,
        "finetuned_source_accuracy": 0.92,
    }
    if scratch is not None:
        metrics["scratch_target_macro_f1"] = scratch
    return metrics


def test_a_model_that_loses_to_its_scratch_baseline_is_registered_but_not_made_champion(store):
    registry = Registry(store, "loses-to-scratch")
    first = registry.register(evaluated(0.60, scratch=0.50))
    assert first.decision == "promoted"
    assert registry.tags("1")["promotion.gate.beats_scratch"].startswith(
        "pass: target_macro_f1 0.6000 beats the scratch baseline of its own run"
    )

    # Beats the champion by far, and its source-only baseline, but not its own scratch model.
    second = registry.register(evaluated(0.75, scratch=0.80))

    assert second.decision == "refused" and second.version == "2"
    assert second.aliases == ("challenger",)
    assert registry.aliases() == {"challenger": "2", "champion": "1"}
    tags = registry.tags("2")
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.gate.beats_scratch"] == (
        "fail: target_macro_f1 0.7500 does not beat the scratch baseline of its own run "
        "(scratch_target_macro_f1 0.8000, gain -0.0500; register.require_beats_baselines)"
    )
    assert tags["promotion.gate.beats_source_only"].startswith("pass: ")
    assert tags["promotion.gate.margin"].startswith("pass: ")
    assert "does not beat the scratch baseline" in tags["promotion.reason"]
    version = MlflowClient().get_model_version(registry.name, "2")
    assert version_metrics(version)["scratch_target_macro_f1"] == 0.8


def test_no_scratch_baseline_and_source_forgetting_are_tagged_at_registration(store):
    registry = Registry(store, "forgets-the-source")

    result = registry.register(evaluated(0.60, scratch=None), max_source_accuracy_drop=0.01)

    assert result.decision == "refused"
    assert "champion" not in registry.aliases()
    tags = registry.tags("1")
    assert tags["promotion.gate.beats_scratch"].startswith("skipped: no scratch baseline")
    assert tags["promotion.gate.beats_source_only"].startswith("pass: ")
    assert tags["promotion.gate.source_accuracy_drop"] == (
        "fail: source test accuracy 0.9500 (source-only) -> 0.9200 (fine-tuned), drop +0.0300 "
        "is more than register.max_source_accuracy_drop=0.0100: the fine-tuned model forgot "
        "the source"
    )


def test_manual_promote_rechecks_the_baselines_from_the_version_tags(store):
    registry = Registry(store, "manual")
    registry.register({"target_macro_f1": 0.50})  # no baselines recorded: an older run
    assert registry.register(evaluated(0.70, scratch=0.80)).decision == "refused"

    def promote(version: str, **cfg: object):
        return promote_version(
            MlflowClient(),
            registry.name,
            version,
            RegisterSection(model_name=registry.name, **cfg),
            store_uri=mlflow.get_registry_uri(),
            user=current_user(),
        )

    again = promote("2")
    assert not again.decision.promote
    assert registry.tags("2")["promotion.mode"] == "manual"
    assert registry.tags("2")["promotion.gate.beats_scratch"].startswith(
        "fail: target_macro_f1 0.7000 does not beat the scratch baseline of its own run"
    )

    # The gate switched off: promoted, and no gate tag of the earlier decision is left behind.
    relaxed = promote("2", require_beats_baselines=False)
    assert relaxed.decision.promote
    assert registry.aliases()["champion"] == "2"
    assert not any(k.startswith("promotion.gate.beats_") for k in registry.tags("2"))

    # v1 was registered without baselines: promote says so, and the gate does not block.
    back = promote("1")
    gates = {g.name: f"{g.status}: {g.reason}" for g in back.decision.gates}
    assert gates["beats_scratch"].startswith("skipped: baselines unknown")
    assert registry.tags("1")["promotion.gate.beats_source_only"].startswith(
        "skipped: baselines unknown"
    )
