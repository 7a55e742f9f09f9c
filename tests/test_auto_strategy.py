"""``finetune.strategy: auto`` chooses by cross-validation (roadshift.transfer.selection).

The folds (stratified, seeded, single-image classes), the choice from scores (higher mean,
ties, the fallback) and the reason; then real training: a real mobilenet_v3_small at 32 px,
pretrained for a few seconds on three drawn shapes (disc, horizontal bar, vertical bar),
cross-validated on tiny target trees, and the finetune stage writing the scores to
metrics/finetune.json. One torch thread; no mocks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from roadshift.config import ConfigError, Params, load_params, parse_params
from roadshift.data.dataset import split_frame
from roadshift.data.manifest import read_manifest
from roadshift.layout import Layout
from roadshift.stages.finetune import run_finetune
from roadshift.stages.prepare import run_prepare
from roadshift.stages.runner import run_stage_command
from roadshift.train.models import load_model_dir, save_model_dir
from roadshift.train.recipe import train_new_model
from roadshift.transfer.selection import (
    FALLBACK,
    TIE_WINNER,
    CandidateScores,
    FoldPlan,
    choose_from_scores,
    cross_validated_choice,
    fallback_choice,
    fold_epochs,
    paired_standard_error,
    stratified_folds,
    train_labels,
)
from tests.helpers import PROJECT_ROOT

CPU = torch.device("cpu")
CLASSES = ("disc", "hbar", "vbar")
SIZE = 32
SOURCE_COUNTS = {"train": 30, "val": 4, "test": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and the 2-core machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- folds -----------------------------------------------------------------------------------


def test_folds_are_stratified_disjoint_complete_and_k_is_capped_by_the_smallest_class():
    labels = np.repeat([0, 1, 2], [9, 6, 4])
    plan = stratified_folds(labels, folds=5, seed=0)
    assert plan.k == 4  # min(5, smallest class 4)
    held_all = np.concatenate([held for _, held in plan.splits])
    assert sorted(held_all) == list(range(len(labels)))  # each row held out exactly once
    for train, held in plan.splits:
        assert not set(train) & set(held) and len(train) + len(held) == len(labels)
        counts = np.bincount(labels[held], minlength=3)
        assert counts.min() >= 1  # every fold scores every class
        assert all(abs(c - n / plan.k) < 1 for c, n in zip(counts, (9, 6, 4), strict=True))
    assert plan.scored == (0, 1, 2) and plan.unscored == ()


def test_folds_are_deterministic_for_a_seed():
    labels = np.repeat([0, 1, 2], 6)

    def as_lists(plan: FoldPlan) -> list:
        return [(list(train), list(held)) for train, held in plan.splits]

    first = as_lists(stratified_folds(labels, folds=3, seed=11))
    assert as_lists(stratified_folds(labels, folds=3, seed=11)) == first
    assert as_lists(stratified_folds(labels, folds=3, seed=12)) != first


def test_a_class_with_one_image_trains_in_every_fold_and_is_never_held_out():
    labels = np.array([0, 1, 1, 1, 2, 2, 2])
    plan = stratified_folds(labels, folds=3, seed=0)
    assert plan.k == 3 and plan.unscored == (0,) and plan.scored == (1, 2)
    for train, held in plan.splits:
        assert 0 in train and 0 not in held


def test_without_two_classes_of_two_images_there_are_no_folds():
    assert stratified_folds(np.array([0, 1, 2]), folds=3, seed=0).k == 0
    assert stratified_folds(np.array([0, 0, 1, 2]), folds=3, seed=0).k == 0


# --- the choice from scores ------------------------------------------------------------------

PLAN = stratified_folds(np.repeat([0, 1, 2], 3), folds=3, seed=0)


def scores(feature_extraction: list[float], fine_tune: list[float]) -> list[CandidateScores]:
    return [
        CandidateScores("feature_extraction", tuple(feature_extraction)),
        CandidateScores("fine_tune", tuple(fine_tune)),
    ]


def choose(candidates: list[CandidateScores], plan: FoldPlan = PLAN):
    return choose_from_scores(candidates, plan, CLASSES, images=9, epochs=2, domain_distance=1.3)


@pytest.mark.parametrize(
    ("feature_extraction", "fine_tune", "winner"),
    [
        ([0.9, 0.8, 1.0], [0.5, 0.6, 0.4], "feature_extraction"),
        ([0.5, 0.6, 0.4], [0.9, 0.8, 1.0], "fine_tune"),
    ],
)
def test_the_higher_mean_wins_and_the_reason_names_every_score(
    feature_extraction, fine_tune, winner
):
    choice = choose(scores(feature_extraction, fine_tune))
    assert choice.strategy == winner
    fe_mean, ft_mean = np.mean(feature_extraction), np.mean(fine_tune)
    assert f"feature_extraction mean {fe_mean:.3f}" in choice.reason
    assert f"fine_tune mean {ft_mean:.3f}" in choice.reason
    assert "folds 0.900, 0.800, 1.000" in choice.reason
    assert "the higher mean wins" in choice.reason
    if winner == "feature_extraction":  # ahead of fine_tune by more than the fold noise
        assert "leads by 0.400, more than the standard error" in choice.reason
    assert "3-fold" in choice.reason and "proxy A-distance to the source 1.30" in choice.reason
    assert choice.reason.startswith(f"auto chose {winner}: ") and choice.reason.endswith(".")
    metrics = choice.metrics()
    assert metrics["auto_cv_feature_extraction_mean"] == pytest.approx(fe_mean)
    assert metrics["auto_cv_fine_tune_mean"] == pytest.approx(ft_mean)
    assert metrics["auto_cv_fine_tune_fold_3"] == fine_tune[2]
    assert metrics["auto_cv_folds"] == 3 and metrics["domain_distance"] == 1.3
    assert all(math.isfinite(value) for value in metrics.values())


def test_a_tie_goes_to_fine_tune_and_says_so():
    choice = choose(scores([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]))
    assert TIE_WINNER == "fine_tune" and choice.strategy == "fine_tune"
    assert "a tie, and a tie goes to fine_tune" in choice.reason


def test_a_lead_of_feature_extraction_within_the_fold_noise_is_a_tie():
    """Measured on the embedded data at epochs_fraction 0.25 (seed 42): the folds ranked
    feature extraction 0.011 ahead, paired standard error 0.028, and its full schedule
    trails fine-tuning by 11 points of test accuracy."""
    noisy = scores([0.543, 0.537, 0.382], [0.584, 0.483, 0.360])
    gap = noisy[0].mean - noisy[1].mean
    noise = paired_standard_error(noisy[0], noisy[1])
    assert 0 < gap < noise
    choice = choose(noisy)
    assert choice.strategy == "fine_tune"
    assert f"feature_extraction leads by {gap:.3f}, within the standard error" in choice.reason
    assert f"({noise:.3f}): a tie, and a tie goes to fine_tune" in choice.reason
    # the same lead on steady folds is no tie
    steady = choose(scores([0.55, 0.55, 0.55], [0.54, 0.54, 0.54]))
    assert steady.strategy == "feature_extraction" and "the higher mean wins" in steady.reason


def test_scores_that_are_not_numbers_cannot_choose():
    with pytest.raises(ValueError, match="finite"):
        choose(scores([float("nan")] * 3, [0.5] * 3))


def test_the_fallback_names_the_rule_and_logs_no_scores():
    plan = stratified_folds(np.array([0, 1, 2]), folds=3, seed=0)
    choice = fallback_choice(plan, CLASSES, domain_distance=0.4)
    assert FALLBACK == "fine_tune" and choice.strategy == "fine_tune"
    assert "without cross-validation" in choice.reason and "fallback rule" in choice.reason
    assert choice.metrics() == {"domain_distance": 0.4, "auto_cv_folds": 0.0}


def test_fold_epochs_are_a_rounded_up_share_of_the_schedule():
    assert fold_epochs(Params().finetune) == 8  # 15 x 0.5, rounded up
    assert fold_epochs(parse_params({"finetune": {"epochs": 40}}).finetune) == 20
    assert fold_epochs(parse_params({"finetune": {"epochs": 1}}).finetune) == 1
    quarter = {"epochs": 40, "auto": {"epochs_fraction": 0.25}}
    assert fold_epochs(parse_params({"finetune": quarter}).finetune) == 10


def test_params_yaml_agrees_with_the_defaults_and_the_old_thresholds_are_gone():
    assert load_params(PROJECT_ROOT / "params.yaml").finetune.auto == Params().finetune.auto
    for key in ("max_images_per_class", "max_domain_distance"):
        with pytest.raises(ConfigError, match=rf"finetune\.auto\.{key}: unknown key"):
            parse_params({"finetune": {"auto": {key: 1.0}}})


# --- real training on tiny image trees -------------------------------------------------------


def draw(label: int, rng: np.random.Generator) -> np.ndarray:
    """A dark red shape on light grey, placed and sized at random."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    cy, cx = rng.uniform(11, 21, 2)
    radius = rng.uniform(5, 9)
    if label == 0:
        shape = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    elif label == 1:
        shape = (abs(yy - cy) < 2.5) & (abs(xx - cx) < radius + 2)
    else:
        shape = (abs(xx - cx) < 2.5) & (abs(yy - cy) < radius + 2)
    background = rng.uniform(170, 230, 3)
    foreground = rng.uniform([120, 10, 10], [200, 60, 60])
    image = np.where(shape[..., None], foreground, background) + rng.normal(0, 10, (SIZE, SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_tree(root: Path, domain: str, counts: dict[str, tuple[int, ...]], seed: int) -> None:
    """``data/raw/<domain>/<split>/<class>/<n>.png`` with ``counts[split][class]`` images."""
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for label, (name, count) in enumerate(zip(CLASSES, per_class, strict=True)):
            folder = root / "data" / "raw" / domain / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(draw(label, rng)).save(folder / f"{index:03d}.png")


def tiny_params(**finetune) -> Params:
    return parse_params(
        {
            "base": {"seed": 3, "image_size": SIZE, "num_threads": 1},
            "data": {
                "source": {"path": "data/raw/source"},
                "target": {"path": "data/raw/target", "unlabeled_path": None},
            },
            "pretrain": {"epochs": 20, "batch_size": 16, "lr": 0.003},
            "finetune": {"strategy": "auto", "batch_size": 8, **finetune},
            "evaluate": {"batch_size": 64},
        }
    )


def publish_manifests(params: Params, root: Path) -> None:
    """prepare, then hand the manifests to training as validate would (GX is not the subject)."""
    run_prepare(params, root)
    layout = Layout(root)
    for domain in ("source", "target"):
        layout.validated_manifest(domain).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(layout.manifest(domain), layout.validated_manifest(domain))


@pytest.fixture(scope="module")
def source_project(tmp_path_factory) -> Path:
    """Source images and a source model that gets them (all, for seeds 0-5 but 1) right,
    pretrained in ~6 s."""
    root = tmp_path_factory.mktemp("auto") / "source"
    write_tree(root, "source", {s: (n,) * 3 for s, n in SOURCE_COUNTS.items()}, seed=1)
    write_tree(root, "target", {"train": (2, 2, 2)}, seed=2)  # replaced by each test
    params = tiny_params()
    publish_manifests(params, root)
    layout = Layout(root)
    torch.manual_seed(0)  # the new model's initial weights
    trained = train_new_model(
        "pretrain",
        layout.validated_manifest("source"),
        params,
        root,
        CPU,
        weights=None,
        on_epoch_end=None,
    )
    save_model_dir(trained.model, trained.spec, layout.model_dir("source"))
    shutil.rmtree(root / "data" / "raw" / "target")
    return root


def target_project(source_project: Path, tmp_path: Path, train: tuple[int, ...]) -> Path:
    """A copy of the source project with a target tree of ``train`` images per class."""
    root = tmp_path / "project"
    shutil.copytree(source_project, root)
    write_tree(root, "target", {"train": train, "val": (2, 2, 2), "test": (2, 2, 2)}, seed=2)
    publish_manifests(tiny_params(), root)
    return root


def choose_on(root: Path, params: Params, model: torch.nn.Module | None = None):
    source, spec = load_model_dir(Layout(root).model_dir("source"))
    frame = split_frame(read_manifest(Layout(root).validated_manifest("target")), "train")
    model = source if model is None else model
    choice = cross_validated_choice(model, spec, frame, root, params, CPU, domain_distance=0.5)
    return choice, frame, spec


def means(choice) -> dict[str, float]:
    return {candidate.strategy: candidate.mean for candidate in choice.scores}


def test_auto_fine_tunes_when_the_frozen_features_carry_nothing(source_project, tmp_path):
    """The source model's last block silenced (its BatchNorm scale and shift zeroed): every
    image gets the same frozen features, as from a source too far off to help, so a head on
    them predicts one class, while fine-tuning trains that block back. Source models from
    torch seeds 0-4: fine-tuning 0.86-0.96."""
    root = target_project(source_project, tmp_path, train=(8, 8, 8))
    model, _ = load_model_dir(Layout(root).model_dir("source"))
    with torch.no_grad():
        model.features[12][1].weight.zero_()
        model.features[12][1].bias.zero_()
    params = tiny_params(epochs=8, lr=0.003, backbone_lr_factor=1.0, auto={"epochs_fraction": 1.0})
    choice, _, _ = choose_on(root, params, model)
    scored = means(choice)
    assert choice.strategy == "fine_tune"
    assert scored["fine_tune"] > scored["feature_extraction"] + 0.3
    assert scored["feature_extraction"] < 0.34  # one class predicted for every image
    assert "the higher mean wins" in choice.reason


def test_with_separating_features_and_few_labels_the_better_mean_chooses(source_project, tmp_path):
    """Target = the source domain, 3 labels a class: the frozen features already separate
    the classes, and a backbone trained at a rate far too high for 6 images a fold loses
    them. Source models from torch seeds 0-5: feature extraction 0.85-1.0, fine-tuning
    0.17-0.44, a lead beyond the fold noise every time."""
    root = target_project(source_project, tmp_path, train=(3, 3, 3))
    params = tiny_params(epochs=8, lr=0.05, backbone_lr_factor=1.0, auto={"epochs_fraction": 1.0})
    choice, _, _ = choose_on(root, params)
    scored = means(choice)
    assert choice.folds == 3 and len(choice.scores) == 2
    assert all(len(c.fold_scores) == 3 for c in choice.scores)
    assert scored["feature_extraction"] >= 0.8
    assert scored["fine_tune"] < scored["feature_extraction"] - 0.2
    assert choice.strategy == max(scored, key=scored.get) == "feature_extraction"
    assert "the higher mean wins" in choice.reason
    for strategy, mean in scored.items():
        assert f"{strategy} mean {mean:.3f}" in choice.reason


def test_a_class_with_one_train_image_trains_in_every_fold_unscored(source_project, tmp_path):
    root = target_project(source_project, tmp_path, train=(1, 3, 3))
    params = tiny_params(epochs=2)
    choice, frame, spec = choose_on(root, params)
    labels = train_labels(frame, spec.class_names)
    assert choice.folds == 3 and len(choice.scores) == 2
    assert "(disc) train in every fold and are not scored" in choice.reason
    fe, ft = (means(choice)[s] for s in ("feature_extraction", "fine_tune"))
    assert choice.strategy == ("feature_extraction" if fe > ft else "fine_tune")
    assert stratified_folds(labels, 3, params.base.seed).unscored == (0,)


def test_with_only_single_image_classes_auto_falls_back_without_training(source_project, tmp_path):
    root = target_project(source_project, tmp_path, train=(1, 1, 2))
    choice, _, _ = choose_on(root, tiny_params())
    assert choice.strategy == FALLBACK and choice.folds == 0 and choice.scores == ()
    assert "without cross-validation" in choice.reason


def test_the_stage_logs_the_scores_to_its_metrics_the_console_and_mlflow(
    source_project, tmp_path, capsys
):
    """Through the stage command's runner, as ``roadshift stage finetune`` runs it."""
    import mlflow

    root = target_project(source_project, tmp_path, train=(3, 3, 3))
    params = tiny_params(epochs=4)
    try:
        assert run_stage_command("finetune", params, root, argv=[]) == 0
        [run] = mlflow.search_runs(output_format="list")
    finally:
        mlflow.set_tracking_uri(None)  # back to MLflow's default for later modules
    metrics = json.loads(Layout(root).metrics("finetune").read_text())
    fe, ft = metrics["auto_cv_feature_extraction_mean"], metrics["auto_cv_fine_tune_mean"]
    assert metrics["auto_cv_folds"] == 3 and {"auto_cv_fine_tune_fold_3"} <= set(metrics)
    assert 0 <= metrics["domain_distance"] <= 2
    assert all(math.isfinite(value) for value in metrics.values())
    chosen = "feature_extraction" if fe > ft else "fine_tune"
    tags = run.data.tags
    assert tags["roadshift.finetune.strategy"] == chosen
    reason = tags["roadshift.finetune.strategy_reason"]
    assert f"feature_extraction mean {fe:.3f}" in reason and f"fine_tune mean {ft:.3f}" in reason
    assert run.data.metrics["auto_cv_fine_tune_mean"] == pytest.approx(ft)
    assert run.data.metrics["auto_cv_feature_extraction_mean"] == pytest.approx(fe)
    out = capsys.readouterr().out
    assert f"finetune: {reason}" in out
    assert f"finetune: auto cv fine_tune: held-out macro-F1 {ft_folds(metrics)}; mean" in out
    assert "auto cross-validation took" in out and "proxy A-distance" in out


def ft_folds(metrics: dict[str, float]) -> str:
    return ", ".join(f"{metrics[f'auto_cv_fine_tune_fold_{i}']:.3f}" for i in (1, 2, 3))


def test_auto_trains_exactly_what_choosing_the_strategy_by_hand_trains(source_project, tmp_path):
    """The folds leave no trace: the same model, the same random state after them (a new
    head is drawn from the global torch RNG after the folds)."""
    root = target_project(source_project, tmp_path, train=(3, 3, 3))
    layout = Layout(root)
    outcome = run_finetune(tiny_params(epochs=4, reinit_head=True), root)
    chosen = outcome.details["strategy"]
    assert outcome.details["strategy_reason"].startswith(f"auto chose {chosen}: ")
    assert json.loads(layout.metrics("finetune").read_text()) == pytest.approx(outcome.metrics)
    auto_weights = (layout.model_dir("target") / "weights.safetensors").read_bytes()

    by_hand = run_finetune(tiny_params(epochs=4, reinit_head=True, strategy=chosen), root)
    assert by_hand.details["strategy_reason"] == f"finetune.strategy is {chosen}"
    assert not {key for key in by_hand.metrics if key.startswith("auto_cv")}
    assert (layout.model_dir("target") / "weights.safetensors").read_bytes() == auto_weights
