"""Closing the loop: production batches are kept and checked for shift, the pool is ranked for
labelling, and new labels leave the pool in the same data version.

The pure parts (ranking, near-duplicates, verdicts, the pool's bookkeeping) are tested on
arrays and files; the week as a user runs it goes through the real CLI on a git + DVC project
with a tiny champion in a real MLflow SQLite store and a real Prefect webhook block.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from roadshift.config import MonitorSection, load_params
from roadshift.data.pool import (
    difference_hash,
    images_in,
    keep_in_pool,
    remove_labelled_from_pool,
)
from roadshift.data.synth import CONDITIONS, synthesize_production_batch
from roadshift.transfer.shift import ShiftFigures, shift_verdict
from roadshift.transfer.suggest import (
    exclusions,
    hamming_to_nearest,
    rank_for_labelling,
    uncertainty_scores,
)
from tests.helpers import TINY_PARAMS, WebhookReceiver, champion_project, png_bytes

EXTENSIONS = (".png", ".jpg")


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- ranking (pure) ----------------------------------------------------------------------------


def test_margin_and_entropy_call_a_coin_flip_uncertain_and_a_sure_answer_certain():
    probabilities = np.array([[0.5, 0.5, 0.0], [0.98, 0.01, 0.01]])
    for kind in ("margin", "entropy"):
        coin, sure = uncertainty_scores(probabilities, kind)
        assert coin > 0.6 and sure < 0.15


def test_suggestions_favour_uncertain_images_but_never_two_from_one_spot():
    # three tight clusters; cluster A's images are the most uncertain
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    embeddings = np.concatenate([c + rng.normal(0, 0.01, (5, 3)) for c in centres])
    probabilities = np.array(
        [[0.4, 0.35, 0.25]] * 5 + [[0.9, 0.05, 0.05]] * 5 + [[0.05, 0.9, 0.05]] * 5
    )
    chosen = rank_for_labelling(
        embeddings, probabilities, ("a", "b", "c"), np.zeros((0, 3)), 3, uncertainty_weight=0.5
    )
    clusters = {s.index // 5 for s in chosen}
    assert clusters == {0, 1, 2}, "one pick per cluster: diversity"
    assert chosen[0].index // 5 == 0, "the uncertain cluster first"
    assert all("uncertain" in s.reason and "cosine distance" in s.reason for s in chosen)


def test_suggestions_spread_over_the_predicted_classes():
    # every image predicted class 0 except two; with n=4 and 2 classes: at most 2 of class 0
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(20, 8))
    probabilities = np.tile([0.55, 0.45], (20, 1))
    probabilities[[3, 7]] = [0.45, 0.55]
    chosen = rank_for_labelling(embeddings, probabilities, ("x", "y"), np.zeros((0, 8)), 4)
    labels = [s.label for s in chosen]
    assert labels.count("y") == 2 and labels.count("x") == 2


def test_labelled_images_and_near_duplicates_are_never_candidates():
    labelled = np.array([[1.0, 0.0, 0.0]])
    pool = np.array([[1.0, 0.001, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    hashes = np.array([1, 2, 0b1111, 2**40], dtype=np.uint64)
    skip = exclusions(
        pool,
        labelled,
        hashes,
        np.array([0b0111], dtype=np.uint64),
        labelled_copy=np.array([False, True, False, False]),
        max_cosine=0.02,
        max_hash_bits=1,
    )
    assert skip.mask.tolist() == [True, True, True, False]
    assert "cosine" in skip.reasons[0] and "same bytes" in skip.reasons[1]
    assert "hash 1 bits" in skip.reasons[2]
    chosen = rank_for_labelling(
        pool, np.full((4, 2), 0.5), ("a", "b"), labelled, 4, excluded=skip.mask
    )
    assert [s.index for s in chosen] == [3]


def test_hamming_distance_counts_differing_bits():
    assert hamming_to_nearest(
        np.array([0b1010], np.uint64), np.array([0b0110, 0b1011], np.uint64)
    ).tolist() == [1]


# --- verdicts (pure) ---------------------------------------------------------------------------


def figures(distance: float, drop: float, images: int = 20) -> ShiftFigures:
    return ShiftFigures(images, 40, 40, distance, 0.5, 0.5 + drop, drop, 0.3, 0.6, (), ())


def test_a_batch_past_a_monitor_limit_is_shifted_and_says_which():
    limits = MonitorSection(max_domain_distance=1.0, max_confidence_drop=0.15)
    assert not shift_verdict(figures(0.4, 0.05), limits).shifted
    far = shift_verdict(figures(1.6, 0.05), limits)
    assert far.shifted and far.reasons == ("domain distance 1.600 > 1: SHIFTED",)
    unsure = shift_verdict(figures(0.2, 0.3), limits)
    assert unsure.shifted and "confidence drop" in unsure.reasons[0]


def test_a_batch_too_small_to_tell_is_reported_but_never_flagged():
    verdict = shift_verdict(figures(1.9, 0.5, images=3), MonitorSection(min_batch_size=8))
    assert not verdict.shifted and "too few" in verdict.checks[-1]


# --- the synthetic night ------------------------------------------------------------------------


def test_a_night_batch_is_visibly_darker_than_a_day_batch_of_the_same_signs(tmp_path):
    means = {}
    for condition in CONDITIONS:
        classes = synthesize_production_batch(tmp_path / condition, 1, 32, 3, condition, "b1")
        assert sorted(classes) == sorted(set(classes)) and len(classes) == 8
        means[condition] = np.mean(
            [np.asarray(Image.open(p)).mean() for p in sorted((tmp_path / condition).iterdir())]
        )
    assert means["night"] < 0.5 * means["day"]


# --- the pool's bookkeeping --------------------------------------------------------------------


def write_png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(np.full((8, 8, 3), value, dtype=np.uint8)))
    return path


def test_keeping_images_goes_by_content_never_twice_never_a_labelled_one(tmp_path):
    labelled = write_png(tmp_path / "target/train/stop/a.png", 10)
    pool = tmp_path / "pool"
    write_png(pool / "old/x.png", 20)
    batch = [
        write_png(tmp_path / "in/IMG_1.png", 20),  # already in the pool
        write_png(tmp_path / "in/IMG_2.png", 10),  # already labelled
        write_png(tmp_path / "in/IMG_3.png", 30),
        write_png(tmp_path / "in/sub/IMG_3.png", 30),  # same bytes, same name, other camera
    ]
    kept = keep_in_pool(batch, pool, [labelled.parents[2]], EXTENSIONS, "b1")
    assert [p.parent.name for p in kept.copied] == ["b1"]
    assert sha(kept.copied[0]) == sha(batch[2])
    assert kept.already_in_pool == (batch[0], batch[3]) and kept.already_labelled == (batch[1],)


def test_labelled_images_leave_the_pool_and_empty_folders_go_with_them(tmp_path):
    pool = tmp_path / "pool"
    moved = write_png(pool / "b1/x.png", 40)
    stays = write_png(pool / "b2/y.png", 50)
    target = tmp_path / "target"
    shutil.copyfile(moved, target.mkdir() or target / "x.png")
    assert remove_labelled_from_pool(pool, [target], EXTENSIONS) == (moved,)
    assert not (pool / "b1").exists() and stays.is_file()


def test_a_recompressed_copy_keeps_its_difference_hash(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((64, 64))
    image.save(tmp_path / "a.png")
    image.resize((48, 48)).save(tmp_path / "b.jpg", quality=90)
    a, b = difference_hash(tmp_path / "a.png"), difference_hash(tmp_path / "b.jpg")
    assert bin(a ^ b).count("1") <= 4


# --- a week, through the CLI -------------------------------------------------------------------


def run_cli(root: Path, *argv: str, capsys) -> tuple[int, str, str]:
    from roadshift.cli import main

    code = main(["--root", str(root), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def pointer_version(path: Path) -> str | None:
    return yaml.safe_load(path.read_text())["outs"][0]["md5"] if path.is_file() else None


@pytest.mark.slow
@pytest.mark.integration
def test_a_week_keep_check_suggest_label(tmp_path, prefect_server, capsys):
    from flows.retrain import shifted_inputs

    hook = WebhookReceiver()
    params = {**TINY_PARAMS, "retrain": {"notify_webhook_block": "roadshift-shift-hook"}}
    root = champion_project(tmp_path / "project", params)
    hook.save_block("roadshift-shift-hook")
    pool = root / "data/raw/target_unlabeled"
    pool_pointer = root / "data/raw/target_unlabeled.dvc"
    target_pointer = root / "data/raw/target.dvc"
    try:
        for condition in CONDITIONS:
            synthesize_production_batch(tmp_path / condition, 3, 32, 11, condition, condition)
        pool_before = len(images_in(pool, EXTENSIONS))

        # same condition as the training data: kept, reported, not shifted
        code, out, err = run_cli(
            root, "predict", str(tmp_path / "day"), "--keep-unlabelled", capsys=capsys
        )
        assert code == 0, err
        assert out.count(".png") == 24, "stdout holds the predictions alone"
        assert "not shifted" in err and "kept 24 image(s)" in err
        day_version = pointer_version(pool_pointer)
        (day_report,) = sorted((root / "reports/shift").glob("*.json"))
        day = json.loads(day_report.read_text())
        assert day["shifted"] is False and day["model"] == {
            "name": "tiny-road-signs",
            "version": "1",
        }
        assert day["kept_in_pool"] == 24 and day["pool_version"] == day_version
        assert hook.received == []

        # night: visibly different, flagged, notified
        code, out, err = run_cli(
            root, "predict", str(tmp_path / "night"), "--keep-unlabelled", capsys=capsys
        )
        assert code == 0, err
        assert "SHIFTED" in err and "domain distance" in err
        night_version = pointer_version(pool_pointer)
        assert night_version != day_version
        assert len(images_in(pool, EXTENSIONS)) == pool_before + 48
        night = json.loads(sorted((root / "reports/shift").glob("*.json"))[-1].read_text())
        assert night["shifted"] is True
        assert night["figures"]["domain_distance"] > day["figures"]["domain_distance"]
        (event,) = hook.received
        assert event["event"] == "inputs-shifted" and event["batch"] == night["batch"]

        # the same photos again: nothing new kept, the pool's version unchanged
        code, _, err = run_cli(
            root, "predict", str(tmp_path / "night"), "--keep-unlabelled", capsys=capsys
        )
        assert code == 0 and "kept 0 image(s)" in err and "24 already there" in err
        assert pointer_version(pool_pointer) == night_version

        # one MLflow run per batch, tagged with the model version
        client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
        runs = client.search_runs(
            [client.get_experiment_by_name("roadshift").experiment_id],
            "tags.`roadshift.run_kind` = 'shift-report'",
        )
        assert len(runs) == 3
        assert {r.data.tags["model.version"] for r in runs} == {"1"}
        assert sorted(r.data.tags["shift.shifted"] for r in runs) == ["false", "true", "true"]

        # the retraining decision lists the shifted batches and what to run
        section = shifted_inputs.fn(root, load_params(root / "params.yaml"))
        assert "Inputs have shifted since v1: label these" in section
        assert night["batch"] in section and day["batch"] not in section
        assert "roadshift label suggest" in section

        # a recompressed copy of a labelled image sits in the pool: never suggested
        labelled = sorted((root / "data/raw/target/train/stop").glob("*.png"))[0]
        Image.open(labelled).save(pool / "copy-of-a-labelled-one.jpg", quality=95)

        code, out, err = run_cli(
            root, "label", "suggest", "--n", "6", "--out", str(tmp_path / "batch"), capsys=capsys
        )
        assert code == 0, err
        batch = tmp_path / "batch"
        with open(batch / "suggestions.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5, 6]
        assert all(r["why_chosen"] and r["predicted_label"] for r in rows)
        assert (batch / "contact_sheet.png").is_file()
        suggested = [batch / r["file"] for r in rows]
        assert all(p.is_file() for p in suggested) and "copy-of-a-labelled-one" not in out
        labelled_hashes = {sha(p) for p in images_in(root / "data/raw/target", EXTENSIONS)}
        assert not {sha(p) for p in suggested} & labelled_hashes
        assert len({r["predicted_label"] for r in rows}) >= 2, "spread over classes"

        # the whole pool asked for: still not the near-duplicate
        code, out, err = run_cli(
            root, "label", "suggest", "--n", "500", "--out", str(tmp_path / "all"), capsys=capsys
        )
        assert code == 0, err
        assert "near-duplicate of a labelled image" in out
        assert not list((tmp_path / "all").glob("copy-of-a-labelled-one*"))

        # a person sorts (here: by the guess) and adds; the images leave the pool in that version
        for row in rows[:4]:
            shutil.move(batch / row["file"], batch / row["predicted_label"] / row["file"])
        target_before = pointer_version(target_pointer)
        code, out, err = run_cli(root, "data", "add", "target", str(batch), capsys=capsys)
        assert code == 0, err
        assert "removed 4 now-labelled image(s) from the unlabelled pool" in out
        assert pointer_version(target_pointer) not in {None, target_before}
        assert pointer_version(pool_pointer) != night_version
        pool_hashes = {sha(p) for p in images_in(pool, EXTENSIONS)}
        added = [batch / r["predicted_label"] / r["file"] for r in rows[:4]]
        assert not {sha(p) for p in added} & pool_hashes
        unsorted = [batch / r["file"] for r in rows[4:]]
        assert {sha(p) for p in unsorted} <= pool_hashes, "unsorted images stay unlabelled"
    finally:
        hook.close()
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_predict_without_the_flags_writes_no_shift_report(tmp_path, capsys):
    root = champion_project(tmp_path / "project", dict(TINY_PARAMS))
    try:
        synthesize_production_batch(tmp_path / "day", 1, 32, 5, "day", "d")
        code, _, err = run_cli(root, "predict", str(tmp_path / "day"), capsys=capsys)
        assert code == 0, err
        assert not (root / "reports/shift").exists() and "shift" not in err
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_suggest_refuses_to_mix_batches_in_one_folder(tmp_path, capsys):
    root = champion_project(tmp_path / "project", dict(TINY_PARAMS))
    try:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "old.png").write_bytes(b"x")
        code, _, err = run_cli(
            root, "label", "suggest", "--out", str(tmp_path / "busy"), capsys=capsys
        )
        assert code == 2 and "not empty" in err and "Traceback" not in err
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_features_match_what_predict_serves(tmp_path):
    """The probabilities behind the shift report are the served ones (same weights, same
    decoding and preprocessing)."""
    from roadshift.serve.features import features_of, registered_model
    from roadshift.serve.predict import load_registry_model, predict_paths

    champion_project(tmp_path / "project", dict(TINY_PARAMS))
    try:
        synthesize_production_batch(tmp_path / "day", 1, 32, 5, "day", "d")
        paths = sorted((tmp_path / "day").iterdir())
        with registered_model("tiny-road-signs") as loaded:
            features = features_of(loaded, paths)
        served = predict_paths(load_registry_model("models:/tiny-road-signs@champion"), paths)
        probabilities = served[[c for c in served.columns if c.startswith("prob_")]].to_numpy()
        assert torch.allclose(
            torch.tensor(features.probabilities), torch.tensor(probabilities), atol=1e-5
        )
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
