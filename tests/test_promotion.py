"""Champion/challenger promotion for real: the gates on crafted metric sets, registration
against MLflow on SQLite with tiny real models, `roadshift promote` / `roadshift rollback`,
and two OS processes promoting at the same moment."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from roadshift.cli import main
from roadshift.config import Params, PrepareSection, RegisterSection, load_params, parse_params
from roadshift.registry.gates import Scores, check_gates, forced_decision
from roadshift.registry.lock import lock_path, registry_limit_name
from roadshift.registry.model_metrics import stored_figures
from roadshift.registry.register import RegistrationResult, register_model_dir
from roadshift.registry.tags import CHAMPION, PREVIOUS_CHAMPION
from roadshift.tracking import configure_tracking
from roadshift.train.models import ModelSpec, create_model, save_model_dir

CLASSES = ("stop", "give_way", "no_entry")
# The floor and the champion gates; the baseline gates are specified in test_baseline_gates.py.
GATES = RegisterSection(
    model_name="gates", min_macro_f1=0.5, min_improvement=0.02, require_beats_baselines=False
)


def make_model_dir(path: Path, seed: int) -> Path:
    """A tiny real model folder; the seed makes its weights (and so its version) distinct."""
    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", len(CLASSES))
    spec = ModelSpec("mobilenet_v3_small", CLASSES, image_size=32, extra={"seed": str(seed)})
    return save_model_dir(model, spec, path)


def per_class_table(recall: dict[str, float]) -> dict[str, dict[str, float]]:
    """The shape of metrics/evaluate_per_class.json."""
    return {c: {"precision": r, "recall": r, "f1": r, "support": 10.0} for c, r in recall.items()}


def even(value: float) -> dict[str, float]:
    return dict.fromkeys(CLASSES, value)


# --------------------------------------------------------------------------- gates, pure


def _scores(f1: float | None, recall: dict[str, float] | None = None) -> Scores:
    return Scores(f1, dict(recall or {}))


@pytest.mark.parametrize(
    ("challenger", "champion", "promote", "statuses", "phrases"),
    [
        pytest.param(
            _scores(0.55, {"stop": 0.0}),
            None,
            True,
            ["pass", "skipped"],
            ["passes the floor register.min_macro_f1=0.5000", "no champion yet"],
            id="first-model-floor-only",
        ),
        pytest.param(
            _scores(0.45, even(0.9)),
            None,
            False,
            ["fail", "skipped"],
            ["0.4500 is below the floor register.min_macro_f1=0.5000"],
            id="first-model-below-floor",
        ),
        pytest.param(
            _scores(0.71, even(0.8)),
            _scores(0.70, even(0.8)),
            False,
            ["pass", "fail", "pass"],
            ["gain +0.0100 is not above register.min_improvement=0.0200", "none fell"],
            id="short-of-the-margin",
        ),
        pytest.param(
            _scores(0.80, {"stop": 0.9, "give_way": 0.65, "no_entry": 0.9}),
            _scores(0.70, even(0.8)),
            False,
            ["pass", "pass", "fail"],
            [
                "beats champion v1 0.7000 by +0.1000",
                "recall fell by more than register.max_class_recall_drop=0.10 against "
                "champion v1: give_way 0.800 -> 0.650 (-0.150)",
            ],
            id="one-class-recall-drops-too-far",
        ),
        pytest.param(
            _scores(0.80, {"stop": 0.9, "give_way": 0.7, "no_entry": 0.9}),
            _scores(0.70, even(0.8)),
            True,
            ["pass", "pass", "pass"],
            ["largest drop give_way 0.800 -> 0.700 (-0.100)"],
            id="recall-drop-exactly-at-the-limit",
        ),
        pytest.param(
            _scores(0.40, {"stop": 0.9, "give_way": 0.8}),
            _scores(0.70, even(0.8)),
            False,
            ["fail", "fail", "fail"],
            ["below the floor", "gain -0.3000", "no_entry 0.800 -> absent (-0.800)"],
            id="every-gate-fails-and-every-reason-is-given",
        ),
        pytest.param(
            _scores(0.80, even(0.1)),
            _scores(0.70),
            True,
            ["pass", "pass", "skipped"],
            ["champion v1 has no per-class recall, so register.max_class_recall_drop"],
            id="champion-without-recall-skips-that-gate",
        ),
        pytest.param(
            _scores(0.80),
            _scores(0.70, even(0.8)),
            False,
            ["pass", "pass", "fail"],
            ["the challenger has no per-class recall"],
            id="challenger-without-recall-cannot-pass-that-gate",
        ),
        pytest.param(
            _scores(0.80, even(0.9)),
            _scores(None, even(0.8)),
            False,
            ["pass", "fail", "pass"],
            ["champion v1 has no recorded target_macro_f1"],
            id="champion-without-a-score-is-not-replaced-automatically",
        ),
    ],
)
def test_gates_on_crafted_metric_sets(challenger, champion, promote, statuses, phrases):
    decision = check_gates(challenger, champion, "v1" if champion else None, GATES)
    assert decision.promote is promote, decision.reason
    assert [gate.status for gate in decision.gates] == statuses
    for phrase in phrases:
        assert phrase in decision.reason
    assert decision.reason == "; ".join(gate.reason for gate in decision.gates)
    assert decision.label == ("promoted" if promote else "refused")


def test_a_forced_decision_promotes_and_keeps_what_the_gates_said():
    gated = check_gates(_scores(0.40), _scores(0.70), "v1", GATES)
    forced = forced_decision(gated, "alice", "hotfix for a mislabelled class")
    assert forced.promote and forced.label == "forced"
    assert forced.reason.startswith("forced by alice: hotfix for a mislabelled class")
    assert "the gates would have refused" in forced.reason
    assert "below the floor" in forced.reason
    assert forced.gates == gated.gates


def test_the_lock_sits_beside_a_local_store_and_is_keyed_on_the_model_name(tmp_path):
    db = tmp_path / "mlruns" / "mlflow.db"
    one, other = lock_path(f"sqlite:///{db}", "signs"), lock_path(f"sqlite:///{db}", "signs/v2")
    assert one.parent == db.parent and one.name.startswith("mlflow.db.signs-")
    assert one != other and "/" not in other.name
    assert lock_path(tmp_path.as_uri(), "signs").parent == tmp_path  # file store
    assert lock_path("http://mlflow.team:5000", "signs") is None  # remote: Prefect's limit
    assert registry_limit_name("signs") == "roadshift-registry-signs"


# --------------------------------------------------------------------------- registry, real


NAME = "promotion-signs"
PARAMS = {
    "register": {"model_name": NAME, "min_macro_f1": 0.5, "min_improvement": 0.02},
    "tracking": {"experiment": "promotion-tests"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project root whose params.yaml the CLI reads; its SQLite store, shared by the module."""
    root = tmp_path_factory.mktemp("promotion")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    configure_tracking(load_params(root / "params.yaml"), root)
    yield root
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


class Models:
    """Registers tiny real models with crafted metrics under one name, seeds never reused."""

    seed = 100

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name

    def cfg(self, **overrides: float) -> RegisterSection:
        return RegisterSection(**{**PARAMS["register"], "model_name": self.name, **overrides})

    def register(self, f1: float, recall: dict[str, float], **gates: float) -> RegistrationResult:
        Models.seed += 1
        model_dir = make_model_dir(self.root / "models" / f"{self.name}-{Models.seed}", Models.seed)
        with mlflow.start_run(run_name=f"register-{self.name}"):
            return register_model_dir(
                model_dir,
                {"target_macro_f1": f1},
                {"git.commit": "c0ffee"},
                self.cfg(**gates),
                per_class=per_class_table(recall),
            )

    def tags(self, version: str) -> dict[str, str]:
        return MlflowClient().get_model_version(self.name, version).tags

    def aliases(self) -> dict[str, str]:
        return {
            k: str(v) for k, v in MlflowClient().get_registered_model(self.name).aliases.items()
        }


def test_first_ever_promotion_then_a_recall_drop_is_refused_and_both_versions_say_why(project):
    models = Models(project, "history")
    first = models.register(0.60, {"stop": 0.9, "give_way": 0.3, "no_entry": 0.6})
    assert first.decision == "promoted" and first.aliases == ("challenger", "champion")
    tags = models.tags("1")
    assert tags["promotion.gate.floor"].startswith("pass: target_macro_f1 0.6000 passes")
    assert tags["promotion.gate.margin"].startswith("skipped: no champion yet")
    assert tags["promotion.champion_version"] == "none"
    assert tags["promotion.mode"] == "pipeline"
    assert "metrics.recall.give_way" not in tags  # a model metric now, read back as one:
    assert (
        stored_figures(MlflowClient().get_model_version(models.name, "1"))[
            "metrics.recall.give_way"
        ]
        == "0.3"
    )

    # Better macro-F1 by far, but stop's recall falls 0.9 -> 0.7: refused.
    second = models.register(0.75, {"stop": 0.7, "give_way": 0.9, "no_entry": 0.9})
    assert second.decision == "refused"
    assert models.aliases() == {"challenger": "2", "champion": "1"}
    challenger = models.tags("2")
    assert challenger["promotion.decision"] == "refused"
    assert challenger["promotion.gate.margin"].startswith("pass: ")
    assert challenger["promotion.gate.class_recall"].startswith(
        "fail: recall fell by more than register.max_class_recall_drop=0.10 against champion "
        "v1: stop 0.900 -> 0.700 (-0.200)"
    )
    assert challenger["promotion.champion_version"] == "1"
    assert challenger["champion_target_macro_f1"] == "0.6"
    assert challenger["champion_recall.stop"] == "0.9"
    assert challenger["champion_scores_from"] == "stored metrics of v1 (no test split given)"
    champion = models.tags("1")
    assert champion["promotion.challenged_by.2"].startswith("kept at ")
    assert "v2 refused" in champion["promotion.challenged_by.2"]
    assert champion["promotion.last_challenge"].startswith("v2 refused at ")

    third = models.register(0.70, {"stop": 0.85, "give_way": 0.5, "no_entry": 0.6})
    assert third.decision == "promoted"
    assert models.aliases() == {"challenger": "3", "champion": "3", "previous-champion": "1"}
    assert models.tags("3")["promotion.replaced"] == "1"
    assert models.tags("1")["promotion.challenged_by.3"].startswith("replaced at ")


def _cli(project: Path, *args: str) -> int:
    return main(["--root", str(project), *args])


def test_manual_promote_applies_the_gates_and_records_who_and_why(project, capsys):
    models = Models(project, NAME)
    models.register(0.60, even(0.8))
    # Refused at registration only because of a stricter margin then; passes today's params.
    assert models.register(0.70, even(0.8), min_improvement=0.5).decision == "refused"
    assert models.register(0.61, even(0.8)).decision == "refused"  # short of the margin

    assert _cli(project, "promote", "--version", "3") == 1
    out, err = capsys.readouterr()
    assert "promotion-signs v3: refused (champion before: v1)" in out
    assert "margin: fail: target_macro_f1 0.6100 vs champion v1 0.6000" in out
    assert "--force --reason" in err
    assert models.tags("3")["promotion.mode"] == "manual"
    assert models.aliases()[CHAMPION] == "1"

    assert _cli(project, "promote", "--version", "2", "--reason", "margin relaxed") == 0
    assert "promotion-signs v2: promoted (champion before: v1)" in capsys.readouterr().out
    assert models.aliases() == {"challenger": "3", "champion": "2", "previous-champion": "1"}
    tags = models.tags("2")
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.mode"] == "manual"
    assert tags["promotion.why"] == "margin relaxed"
    assert tags["promotion.by"]
    assert tags["promotion.replaced"] == "1"
    assert models.tags("1")["promotion.challenged_by.2"].startswith("replaced at ")

    assert _cli(project, "promote", "--version", "2") == 0
    assert "already champion; nothing changed" in capsys.readouterr().out


def test_force_needs_a_reason_and_then_bypasses_the_gates(project, capsys, monkeypatch):
    models = Models(project, "forced")
    (project / "forced.yaml").write_text(
        yaml.safe_dump({**PARAMS, "register": {**PARAMS["register"], "model_name": "forced"}})
    )
    models.register(0.70, even(0.8))
    models.register(0.40, even(0.2))  # below the floor: refused

    assert _cli(project, "promote", "--params", "forced.yaml", "--version", "2", "--force") == 2
    assert "--force needs --reason" in capsys.readouterr().err
    assert models.aliases()[CHAMPION] == "1"

    monkeypatch.setenv("USER", "oncall-engineer")
    monkeypatch.setenv("LOGNAME", "oncall-engineer")
    args = ("promote", "--params", "forced.yaml", "--version", "2", "--force")
    assert _cli(project, *args, "--reason", "v1 misreads a new sign") == 0
    assert "forced v2: forced (champion before: v1)" in capsys.readouterr().out
    assert models.aliases()[CHAMPION] == "2"
    assert models.aliases()[PREVIOUS_CHAMPION] == "1"
    tags = models.tags("2")
    assert tags["promotion.decision"] == "forced"
    assert tags["promotion.mode"] == "forced"
    assert tags["promotion.by"] == "oncall-engineer"
    assert tags["promotion.why"] == "v1 misreads a new sign"
    assert tags["promotion.reason"].startswith(
        "forced by oncall-engineer: v1 misreads a new sign (the gates would have refused"
    )
    assert tags["promotion.gate.floor"].startswith("fail: ")


def test_unknown_versions_and_missing_history_are_clear_errors(project, capsys):
    models = Models(project, "errors")
    (project / "errors.yaml").write_text(
        yaml.safe_dump({**PARAMS, "register": {**PARAMS["register"], "model_name": "errors"}})
    )
    params = ("--params", "errors.yaml")
    assert _cli(project, "promote", *params, "--version", "1") == 2
    assert "no registered model named 'errors'" in capsys.readouterr().err

    models.register(0.70, even(0.8))
    assert _cli(project, "promote", *params, "--version", "7") == 2
    assert "'errors' has no version 7 (versions: 1)" in capsys.readouterr().err
    assert _cli(project, "rollback", *params, "--reason", "bad") == 2
    assert "no previous-champion to roll back to (champion is v1)" in capsys.readouterr().err
    assert _cli(project, "rollback", *params, "--to", "1", "--reason", "bad") == 2
    assert "v1 is already champion" in capsys.readouterr().err
    assert _cli(project, "rollback", *params, "--to", "9", "--reason", "bad") == 2
    assert "'errors' has no version 9" in capsys.readouterr().err
    assert _cli(project, "rollback", *params, "--reason", "  ") == 2
    assert "rollback needs --reason" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:  # argparse: --reason is required
        _cli(project, "rollback", *params)
    assert raised.value.code == 2


def test_rollback_walks_the_champion_history_back_and_tags_both_ends(project, capsys):
    models = Models(project, "rollback")
    (project / "rollback.yaml").write_text(
        yaml.safe_dump({**PARAMS, "register": {**PARAMS["register"], "model_name": "rollback"}})
    )
    params = ("--params", "rollback.yaml")
    for f1 in (0.60, 0.70, 0.80):  # each replaces the last: v1 <- v2 <- v3
        assert models.register(f1, even(0.8)).decision == "promoted"
    assert models.aliases()[PREVIOUS_CHAMPION] == "2"

    assert _cli(project, "rollback", *params, "--reason", "v3 misreads school zones") == 0
    assert "champion is v2 again (rolled back from v3); previous-champion: v1" in (
        capsys.readouterr().out
    )
    assert models.aliases() == {"challenger": "3", "champion": "2", "previous-champion": "1"}
    rolled_back = models.tags("3")
    assert rolled_back["rolled_back"].startswith("to v2 at ")
    assert rolled_back["rolled_back"].endswith(": v3 misreads school zones")
    assert rolled_back["rolled_back.to"] == "2"
    assert rolled_back["rolled_back.reason"] == "v3 misreads school zones"
    assert rolled_back["rolled_back.by"]
    restored = models.tags("2")
    assert restored["restored.from"] == "3"
    assert restored["restored.reason"] == "v3 misreads school zones"

    assert _cli(project, "rollback", *params, "--reason", "v2 too") == 0
    assert models.aliases() == {"challenger": "3", "champion": "1"}  # no history before v1

    assert _cli(project, "rollback", *params, "--to", "3", "--reason", "fixed upstream") == 0
    assert models.aliases() == {"challenger": "3", "champion": "3", "previous-champion": "2"}
    assert models.tags("1")["rolled_back.to"] == "3"
    assert models.tags("3")["rolled_back.to"] == "2"  # its earlier rollback stays on record
    assert models.tags("3")["restored.from"] == "1"


# --------------------------------------------------------------------------- the stage


def _mini_project(root: Path, name: str) -> Params:
    """What the register stage reads, made by hand: validated manifests over a few real PNGs,
    the evaluate stage's two metric files and a model folder (no training)."""
    from PIL import Image

    from roadshift.data.manifest import build_manifest, write_manifest
    from roadshift.jsonio import write_json
    from roadshift.layout import Layout

    rng = np.random.default_rng(3)
    layout = Layout(root)
    for domain, counts in {"source": (4, 1, 1), "target": (2, 1, 3)}.items():
        for split, count in zip(("train", "val", "test"), counts, strict=True):
            for label in CLASSES:
                folder = root / "data" / "raw" / domain / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(count):
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{index:05d}.png")
        manifest = build_manifest(root / "data/raw" / domain, domain, PrepareSection(), root)
        write_manifest(manifest, layout.validated_manifest(domain))
    params = parse_params({**PARAMS, "register": {**PARAMS["register"], "model_name": name}})
    write_json(layout.metrics_dir / "evaluate_per_class.json", per_class_table(even(1.0)))
    return params


def _stage_register(root: Path, params: Params, f1: float, seed: int) -> RegistrationResult:
    from roadshift.jsonio import write_json
    from roadshift.layout import Layout
    from roadshift.stages.register import run_register

    layout = Layout(root)
    shutil.rmtree(layout.model_dir("target"), ignore_errors=True)
    make_model_dir(layout.model_dir("target"), seed)
    metrics = {"target_macro_f1": f1, "target_accuracy": f1, "domain_gap_accuracy": 0.3}
    write_json(layout.metrics("evaluate"), metrics)
    with mlflow.start_run(run_name="register-stage"):
        return run_register(params, root).details["registration"]


def test_the_register_stage_scores_the_champion_on_the_validated_target_test_split(
    project, tmp_path
):
    params = _mini_project(tmp_path, "stage")
    first = _stage_register(tmp_path, params, 0.9, seed=41)
    assert first.decision == "promoted" and first.champion_scores is None

    second = _stage_register(tmp_path, params, 0.6, seed=42)
    # The champion's stored 0.9 is not what decides: it is scored on today's 9 test images.
    assert second.champion_scores.source == "scored on the test split of target.csv (9 images)"
    assert second.champion_scores.macro_f1 < 0.6
    assert second.decision == "promoted", second.reason
    assert set(second.challenger_scores.recall) == set(CLASSES)

    card = mlflow.artifacts.load_text(second.model_card_uri)
    assert "| target | Indian roads (IRC:67) | `unknown` | 6 | 3 | 9 | 3 |" in card
    assert "| source | US roads (MUTCD) | `unknown` | 12 | 3 | 3 | 3 |" in card
    assert "**Synthetic data** (source, target)" in card  # judged by the generator's file names
    assert "about 2 target training images per class" in card


# --------------------------------------------------------------------------- the race


RACE_GATES = {"min_macro_f1": 0.5, "min_improvement": 0.02, "max_class_recall_drop": 0.1}
STRONG, WEAK, OLD = 0.80, 0.70, 0.55  # STRONG passes every gate against WEAK and OLD


def _race_worker(store: str, jobs: list[tuple[str, str, float]], barrier) -> None:
    """One OS process: for each round, wait at the barrier, then register at once."""
    from roadshift.config import parse_params

    configure_tracking(parse_params({"tracking": {"experiment": "promotion-tests"}}), Path(store))
    for name, model_dir, f1 in jobs:
        barrier.wait(timeout=300)
        with mlflow.start_run(run_name=f"race-{name}"):
            register_model_dir(
                Path(model_dir),
                {"target_macro_f1": f1},
                {},
                RegisterSection(model_name=name, **RACE_GATES),
                per_class=per_class_table(even(f1)),
            )


@pytest.mark.slow
def test_two_processes_promoting_at_once_leave_one_consistent_champion(project):
    rounds = 4
    names = [f"race-{k}" for k in range(rounds)]
    jobs: list[list[tuple[str, str, float]]] = [[], []]
    for k, name in enumerate(names):
        if k % 2:  # odd rounds start from an existing champion
            Models(project, name).register(OLD, even(OLD), **RACE_GATES)
        dirs = [make_model_dir(project / "race" / f"{name}-{i}", 1000 + 2 * k + i) for i in (0, 1)]
        strong_first = k in (0, 1)  # swap which process holds the strong model
        jobs[0].append((name, str(dirs[0]), STRONG if strong_first else WEAK))
        jobs[1].append((name, str(dirs[1]), WEAK if strong_first else STRONG))

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_race_worker, args=(str(project), job, barrier)) for job in jobs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
    assert [worker.exitcode for worker in workers] == [0, 0]

    client = MlflowClient()
    orders = []
    for k, name in enumerate(names):
        versions = {
            str(v.version): stored_figures(v)
            for v in client.search_model_versions(f"name='{name}'")
        }
        old = "1" if k % 2 else None
        racers = sorted(
            (v for v in versions if v != old), key=lambda v: versions[v]["promotion.at"]
        )
        first, second = racers
        by_score = {float(versions[v]["metrics.target_macro_f1"]): v for v in racers}
        strong, weak = by_score[STRONG], by_score[WEAK]
        aliases = Models(project, name).aliases()
        # Exactly one champion, and it is the version that passes the gates against every other.
        assert aliases[CHAMPION] == strong, (name, aliases)
        # The first decided against the champion from before the race ...
        assert versions[first]["promotion.champion_version"] == (old or "none")
        assert versions[first]["promotion.decision"] == "promoted"
        # ... the second against the champion the first left: it re-read it inside the lock.
        assert versions[second]["promotion.champion_version"] == first
        if first == strong:
            assert versions[weak]["promotion.decision"] == "refused"
            assert aliases.get(PREVIOUS_CHAMPION) == old
            orders.append("strong first")
        else:
            assert versions[strong]["promotion.decision"] == "promoted"
            assert versions[strong]["promotion.replaced"] == weak
            assert aliases[PREVIOUS_CHAMPION] == weak
            orders.append("weak first")
    print(f"\nrace orders: {orders}")


# --------------------------------------------------------------------------- Prefect's limit


@pytest.mark.slow
@pytest.mark.integration
def test_the_flows_registry_slot_holds_the_prefect_limit_and_runs_on_without_it(prefect_server):
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.registry import registry_slot

    model, remote = "gcl-signs", "http://mlflow.team:5000"
    limit = registry_limit_name(model)
    with registry_slot(model, remote) as slot:  # no such limit: runs, unguarded, and says so
        assert slot == f"unguarded: Prefect global concurrency limit {limit!r} does not exist"

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
        try:
            with registry_slot(model, remote) as slot:
                assert slot == f"held: holding {limit!r}"
                assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1
            assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
        finally:
            client.delete_global_concurrency_limit_by_name(limit)
