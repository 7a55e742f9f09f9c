"""Evaluation metrics and report figures on synthetic arrays: no model, no project, fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from roadshift.config import EvaluateSection
from roadshift.evaluate import report as eval_report
from roadshift.evaluate.metrics import (
    _resampled_scores,
    bootstrap_intervals,
    calibration,
    classification_report,
    confusion_matrix,
    evaluate_probabilities,
    worst_mistakes,
)
from roadshift.evaluate.report import ReportInputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ("give_way", "no_entry", "stop", "school_zone")


def synthetic_probabilities(
    n: int, k: int, accuracy_of, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 confidence uniform on (1/k, 1); the top-1 class is right with probability
    ``accuracy_of(confidence)`` (the identity gives perfectly calibrated probabilities)."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(1.0 / k + 1e-3, 1.0, size=n)
    predicted = rng.integers(0, k, size=n)
    probabilities = np.repeat(((1.0 - confidence) / (k - 1))[:, None], k, axis=1)
    probabilities[np.arange(n), predicted] = confidence
    right = rng.random(n) < accuracy_of(confidence)
    other = (predicted + rng.integers(1, k, size=n)) % k
    return probabilities, np.where(right, predicted, other)


def noisy_labels(n: int, k: int, accuracy: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, k, size=n)
    wrong = (targets + rng.integers(1, k, size=n)) % k
    return targets, np.where(rng.random(n) < accuracy, targets, wrong)


def test_ece_of_perfectly_calibrated_probabilities_is_near_zero():
    probabilities, targets = synthetic_probabilities(50_000, 4, lambda c: c)
    result = calibration(probabilities, targets, num_bins=15)
    assert result.ece < 0.01
    assert sum(b.count for b in result.bins) == len(targets)
    for b in result.bins:
        if b.count > 500:
            assert b.lower < b.confidence <= b.upper
            assert b.accuracy == pytest.approx(b.confidence, abs=0.05)


def test_ece_of_over_confident_probabilities_is_the_confidence_gap():
    probabilities, targets = synthetic_probabilities(50_000, 4, lambda c: c - 0.2)
    result = calibration(probabilities, targets, num_bins=15)
    assert result.ece == pytest.approx(0.2, abs=0.02)
    assert result.bins[0].count == 0  # bin (0, 1/15] is below 1/4: empty, no accuracy
    assert np.isnan(result.bins[0].accuracy)


def test_confusion_matrix_counts_actual_rows_against_predicted_columns():
    targets = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 0, 2])
    matrix = confusion_matrix(targets, predictions, CLASSES)
    expected = np.zeros((4, 4), dtype=int)
    for t, p in zip(targets, predictions, strict=True):
        expected[t, p] += 1
    assert np.array_equal(matrix.counts, expected)
    assert matrix.counts[3].sum() == 0  # a class absent from the split keeps its row
    assert matrix.class_names == CLASSES


def test_resampled_macro_f1_equals_scikit_learn_on_every_resample():
    targets, predictions = noisy_labels(120, 4, 0.6, seed=1)
    rows = np.random.default_rng(2).integers(0, 120, size=(40, 120))
    accuracy, macro_f1 = _resampled_scores(targets, predictions, 4, rows)
    for b, row in enumerate(rows):
        t, p = targets[row], predictions[row]
        assert accuracy[b] == pytest.approx(np.mean(t == p))
        assert macro_f1[b] == pytest.approx(
            f1_score(t, p, labels=range(4), average="macro", zero_division=0)
        )


def test_bootstrap_interval_contains_the_point_estimate_and_narrows_with_more_rows():
    widths = []
    for n in (100, 2_000):
        targets, predictions = noisy_labels(n, 4, 0.7, seed=3)
        report = classification_report(targets, predictions, CLASSES)
        intervals = bootstrap_intervals(targets, predictions, 4, 1000, 0.95, seed=7)
        for name, point in (("accuracy", report.accuracy), ("macro_f1", report.macro_f1)):
            assert intervals[name].low <= point <= intervals[name].high
        widths.append(intervals["accuracy"].high - intervals["accuracy"].low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 20x the rows, about 4.5x narrower


def test_bootstrap_is_deterministic_by_seed_and_off_at_zero():
    targets, predictions = noisy_labels(400, 8, 0.5, seed=4)
    first = bootstrap_intervals(targets, predictions, 8, 1000, 0.95, seed=11)
    assert first == bootstrap_intervals(targets, predictions, 8, 1000, 0.95, seed=11)
    assert first != bootstrap_intervals(targets, predictions, 8, 1000, 0.95, seed=12)
    assert bootstrap_intervals(targets, predictions, 8, 0, 0.95, seed=11) == {}


def test_worst_mistakes_are_the_most_confident_errors_first():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.95, 0.05]])
    targets = np.array([1, 1, 1, 0, 0])  # rows 0, 2, 3 are wrong
    evaluation = evaluate_probabilities(
        probabilities, targets, ("a", "b"), EvaluateSection(bootstrap_samples=0), seed=0
    )
    assert worst_mistakes(evaluation, 2) == [0, 3]
    assert worst_mistakes(evaluation, 10) == [0, 3, 2]
    assert evaluation.intervals == {}
    assert "target_accuracy_ci_low" not in evaluation.headline("target")


def _scored(accuracy: float, seed: int):
    """An evaluation whose predictions are right on ``accuracy`` of 400 rows."""
    targets, predictions = noisy_labels(400, len(CLASSES), accuracy, seed)
    probabilities = np.eye(len(CLASSES))[predictions]
    cfg = EvaluateSection(bootstrap_samples=0)
    return evaluate_probabilities(probabilities, targets, CLASSES, cfg, seed=seed)


def test_the_fine_tuned_models_source_accuracy_is_reported_beside_the_source_only_models():
    from roadshift.stages.evaluate import evaluation_metrics

    finetuned, source_only = _scored(0.8, 1), _scored(0.5, 2)
    source_home, finetuned_source = _scored(0.95, 3), _scored(0.85, 4)

    metrics = evaluation_metrics(
        finetuned, source_only, source_home, None, finetuned_source=finetuned_source
    )

    assert metrics["source_only_source_accuracy"] == source_home.report.accuracy
    assert metrics["finetuned_source_accuracy"] == finetuned_source.report.accuracy
    assert metrics["finetuned_source_macro_f1"] == finetuned_source.report.macro_f1
    drop = source_home.report.accuracy - finetuned_source.report.accuracy
    assert metrics["source_accuracy_drop"] == pytest.approx(drop)
    assert "scratch_target_macro_f1" not in metrics  # no scratch baseline trained
    report = eval_report.report_markdown(
        ReportInputs(
            metrics=metrics,
            models={"fine-tuned": finetuned, "source-only": source_only},
            finetuned="fine-tuned",
            baseline="source-only",
            mistakes=[],
            figures=[],
        )
    )
    assert (
        "- **Source retained** (accuracy on the source test split, fine-tuned vs source-only): "
        f"{finetuned_source.report.accuracy:.3f} vs {source_home.report.accuracy:.3f} = "
        f"**{-drop:+.3f}**"
    ) in report


def _render_everything(out: Path, images: list[Path]) -> list[Path]:
    cfg = EvaluateSection(bootstrap_samples=200, calibration_bins=10)
    probabilities, targets = synthetic_probabilities(len(images), len(CLASSES), lambda c: c)
    finetuned = evaluate_probabilities(probabilities, targets, CLASSES, cfg, seed=5)
    baseline = evaluate_probabilities(probabilities[::-1], targets, CLASSES, cfg, seed=5)
    rows = worst_mistakes(finetuned, 6)
    figures = [
        eval_report.plot_confusion_matrix(finetuned.confusion, out / "confusion.png", "c"),
        eval_report.plot_per_class(finetuned, baseline, out / "per_class.png", "p"),
        eval_report.plot_reliability(finetuned.calibration, out / "reliability.png", "r"),
        eval_report.plot_worst_mistakes(finetuned, images, rows, out / "worst.png"),
    ]
    inputs = ReportInputs(
        metrics={"source_only_source_accuracy": 0.9, "source_only_target_accuracy": 0.4},
        models={"fine-tuned": finetuned, "source-only": baseline},
        finetuned="fine-tuned",
        baseline="source-only",
        mistakes=[("data/x.png", "stop", "give_way", 0.9)],
        figures=[f.name for f in figures],
    )
    return [*figures, eval_report.write_report(inputs, out / "report.md")]


def test_figures_are_pngs_and_render_byte_identically_twice(tmp_path):
    images = []
    for i in range(40):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (6 * i, 255 - 6 * i, 90)).save(path)
        images.append(path)
    first = _render_everything(tmp_path / "first", images)
    second = _render_everything(tmp_path / "second", images)
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    for png in first[:4]:
        assert png.read_bytes().startswith(PNG_SIGNATURE)
        assert b"matplotlib" not in png.read_bytes()  # no software/version chunk
    report = first[-1].read_text()
    assert "Domain gap" in report and "0.500" in report  # 0.9 - 0.4
    for png in first[:4]:
        assert f"]({png.name})" in report


def test_prefect_markdown_points_the_report_figures_at_the_files_on_disk(tmp_path):
    from tasks.reports import evaluation_markdown

    report = "# Evaluation\n\n![Reliability diagram](reliability.png)\n| `data/x.png` | a |\n"
    markdown = evaluation_markdown(report, tmp_path, "file:///store/run", "abc")
    assert f"]({(tmp_path / 'reliability.png').as_uri()})" in markdown
    assert "`data/x.png`" in markdown  # a path in a table is not a link: left alone
    assert "file:///store/run/evaluation/" in markdown and "(run abc)" in markdown


@pytest.mark.slow
@pytest.mark.integration
def test_the_flow_task_publishes_the_report_to_prefect_and_the_mlflow_parent_run(
    tmp_path, prefect_server
):
    """Real Prefect (artifact) and real MLflow (SQLite store) on a rendered report folder."""
    import os

    import mlflow
    from mlflow import MlflowClient
    from prefect import flow
    from prefect.artifacts import Artifact

    from tasks.reports import EVALUATION_ARTIFACT_KEY, publish_evaluation

    images = []
    for i in range(12):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(path)
        images.append(path)
    report_dir = tmp_path / eval_report.REPORT_DIR
    written = _render_everything(report_dir, images)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        experiment = client.create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
        run_id = client.create_run(experiment).info.run_id

        @flow(name="publish-evaluation-test")
        def publish() -> Path | None:
            return publish_evaluation(tmp_path, run_id)

        assert publish() == report_dir / "report.md"
        logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
        assert {f"evaluation/{p.name}" for p in written} == logged
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    published = Artifact.get(EVALUATION_ARTIFACT_KEY)
    assert published is not None and "Domain gap" in str(published.data)
    assert (report_dir / "reliability.png").as_uri() in str(published.data)
