"""Each stage function on tiny data, without Prefect or DVC: the pure core of the pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from roadshift.cli import main
from roadshift.config import parse_params
from roadshift.layout import Layout
from roadshift.train.models import load_model_dir
from tests.helpers import make_project


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory):
    """A tiny project taken through every stage up to evaluation, once for this module.

    Real training: every test that uses it is marked slow.
    """
    from tests.helpers import TINY_PARAMS

    root = make_project(tmp_path_factory.mktemp("stages"), TINY_PARAMS)
    for stage in ("prepare", "validate", "pretrain", "finetune", "scratch", "evaluate"):
        assert main(["--root", str(root), "stage", stage]) == 0, stage
    return root


@pytest.mark.slow
def test_prepare_and_validate_hand_validated_manifests_to_training(trained_project):
    layout = Layout(trained_project)
    for domain in ("source", "target"):
        assert (
            layout.validated_manifest(domain).read_bytes() == layout.manifest(domain).read_bytes()
        )
    assert (layout.validation_dir / "summary.json").is_file()


@pytest.mark.slow
def test_pretrain_and_finetune_write_loadable_models_with_the_shared_label_set(trained_project):
    layout = Layout(trained_project)
    _, source_spec = load_model_dir(layout.model_dir("source"))
    target_model, target_spec = load_model_dir(layout.model_dir("target"))
    assert source_spec.class_names == target_spec.class_names
    assert len(target_spec.class_names) == 8
    logits = target_model(torch.zeros(1, 3, target_spec.image_size, target_spec.image_size))
    assert logits.shape == (1, 8)


@pytest.mark.slow
def test_evaluate_reports_the_fine_tuned_model_next_to_the_source_only_baseline(trained_project):
    metrics = json.loads(Layout(trained_project).metrics("evaluate").read_text())
    for key in (
        "target_accuracy",
        "target_macro_f1",
        "source_only_target_accuracy",
        "source_only_source_accuracy",
        "finetuned_source_accuracy",
        "source_accuracy_drop",
        "domain_gap_accuracy",
        "transfer_gain_macro_f1",
        "scratch_target_accuracy",
        "scratch_target_macro_f1",
        "transfer_gain_over_scratch_macro_f1",
        "target_min_class_recall",
        "target_ece",
        "target_accuracy_ci_low",
        "target_accuracy_ci_high",
        "target_macro_f1_ci_low",
        "target_macro_f1_ci_high",
        "source_only_target_macro_f1_ci_low",
        "scratch_target_macro_f1_ci_high",
    ):
        assert key in metrics
    assert 0 <= metrics["target_accuracy"] <= 1
    assert 0 <= metrics["target_ece"] <= 1
    assert (
        metrics["target_accuracy_ci_low"]
        <= metrics["target_accuracy"]
        <= metrics["target_accuracy_ci_high"]
    )
    assert 0 <= metrics["target_macro_f1_ci_low"] <= metrics["target_macro_f1_ci_high"] <= 1


@pytest.mark.slow
def test_scratch_baseline_is_the_same_architecture_trained_on_target_only(trained_project):
    layout = Layout(trained_project)
    _, scratch_spec = load_model_dir(layout.model_dir("scratch"))
    _, target_spec = load_model_dir(layout.model_dir("target"))
    assert scratch_spec.architecture == target_spec.architecture
    assert scratch_spec.class_names == target_spec.class_names
    metrics = json.loads(layout.metrics("evaluate").read_text())
    assert metrics["transfer_gain_over_scratch_macro_f1"] == pytest.approx(
        metrics["target_macro_f1"] - metrics["scratch_target_macro_f1"]
    )


EVALUATION_REPORT_FILES = (
    "confusion_matrix.png",
    "per_class.png",
    "reliability.png",
    "worst_mistakes.png",
    "report.md",
)


def _declared_evaluate_outputs(root: Path) -> list[str]:
    """Every path the evaluate stage of the project's dvc.yaml declares (metrics, outs, plots)."""
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["evaluate"]
    entries = [*stage["metrics"], *stage["outs"], *stage["plots"]]
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


@pytest.mark.slow
def test_evaluate_writes_every_declared_file_and_logs_them_to_its_mlflow_run(trained_project):
    from mlflow import MlflowClient

    declared = _declared_evaluate_outputs(trained_project)
    assert "reports/evaluation" in declared and "plots/calibration_target.csv" in declared
    for relative in declared:
        assert (trained_project / relative).exists(), relative
    report_dir = trained_project / "reports" / "evaluation"
    for name in EVALUATION_REPORT_FILES:
        assert (report_dir / name).stat().st_size > 0, name
    report = (report_dir / "report.md").read_text()
    assert "Domain gap" in report and "over scratch" in report and "(reliability.png)" in report
    plots = trained_project / "plots"
    per_class = (plots / "per_class_target.csv").read_text().splitlines()
    assert per_class[0] == "class,precision,recall,f1,support" and len(per_class) == 1 + 8
    assert (
        (plots / "calibration_target.csv")
        .read_text()
        .startswith("bin_lower,bin_upper,count,confidence,accuracy")
    )

    client = MlflowClient(f"sqlite:///{trained_project / 'mlruns' / 'mlflow.db'}")
    [run] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`roadshift.stage` = 'evaluate'",
    )
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert set(EVALUATION_REPORT_FILES) | {"per_class_target.csv", "evaluate.json"} <= logged
    assert run.data.metrics["target_ece"] == pytest.approx(
        json.loads(Layout(trained_project).metrics("evaluate").read_text())["target_ece"]
    )


@pytest.mark.slow
def test_dvc_repro_reruns_evaluate_byte_identically_and_dvc_reads_metrics_and_plots(
    trained_project, tmp_path
):
    """Through real DVC: the stage runs, its report files come out the same bytes again,
    and ``dvc metrics show`` / ``dvc plots show`` accept what it declares."""
    import subprocess

    from tests.helpers import venv_environment

    root = tmp_path / "project"  # a copy: DVC writes dvc.lock and rewrites the outputs
    shutil.copytree(trained_project, root)
    report_dir = root / "reports" / "evaluation"
    before = {name: (report_dir / name).read_bytes() for name in EVALUATION_REPORT_FILES}

    def dvc(*args: str) -> str:
        done = subprocess.run(
            ["dvc", *args], cwd=root, env=venv_environment(), capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "Running stage 'evaluate'" in dvc("repro", "--force", "--single-item", "evaluate")
    for name, content in before.items():
        assert (report_dir / name).read_bytes() == content, name
    [workspace] = json.loads(dvc("metrics", "show", "--json")).values()
    shown = workspace["data"]["metrics/evaluate.json"]["data"]
    assert {"target_macro_f1", "target_ece", "target_macro_f1_ci_low"} <= set(shown)
    plots = json.loads(dvc("plots", "show", "--json"))
    assert "errors" not in plots, plots["errors"]
    for name, field in (
        ("confusion_target.csv", "predicted"),
        ("per_class_target.csv", "f1"),
        ("calibration_target.csv", "confidence"),
    ):
        [plot] = plots["data"][f"plots/{name}"]
        rows = plot["content"]["data"]["values"]
        assert rows and all(field in row for row in rows), name


@pytest.mark.slow
def test_training_is_bitwise_repeatable_on_cpu(trained_project):
    layout = Layout(trained_project)
    before = (layout.model_dir("target") / "weights.safetensors").read_bytes()
    assert main(["--root", str(trained_project), "stage", "finetune"]) == 0
    assert (layout.model_dir("target") / "weights.safetensors").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["auto", "feature_extraction"])
def test_finetune_strategies_auto_and_feature_extraction(
    trained_project, tmp_path, strategy, capsys
):
    """The plans themselves are tested in test_strategies.py; here the stage's wiring."""
    from roadshift.stages.finetune import run_finetune
    from roadshift.train.models import head_module_name, head_parameters

    root = tmp_path / "project"  # a copy: the module's other tests read models/target
    shutil.copytree(trained_project, root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["finetune"].update(strategy=strategy, epochs=2)
    params = parse_params(raw)
    outcome = run_finetune(params, root)
    layout = Layout(root)
    metrics = json.loads(layout.metrics("finetune").read_text())
    assert metrics == pytest.approx(outcome.metrics)
    assert {"best_epoch", "target_val_accuracy", "trainable_parameters"} <= set(metrics)
    assert 1 <= metrics["best_epoch"] <= 2 and 0 <= metrics["target_val_accuracy"] <= 1
    source, spec = load_model_dir(layout.model_dir("source"))
    target, _ = load_model_dir(layout.model_dir("target"))
    chosen = outcome.details["strategy"]
    if strategy == "auto":  # the cross-validated choice itself: tests/test_auto_strategy.py
        assert 0 <= metrics["domain_distance"] <= 2
        fe = metrics["auto_cv_feature_extraction_mean"]
        ft = metrics["auto_cv_fine_tune_mean"]
        assert chosen == ("feature_extraction" if fe > ft else "fine_tune")
        reason = outcome.details["strategy_reason"]
        assert f"feature_extraction mean {fe:.3f}" in reason
        assert f"fine_tune mean {ft:.3f}" in reason
        assert reason in capsys.readouterr().out
    else:
        assert chosen == "feature_extraction" and "domain_distance" not in metrics
    if chosen == "feature_extraction":
        head = head_module_name(spec.architecture)
        assert metrics["trainable_parameters"] == sum(
            p.numel() for p in head_parameters(source, spec.architecture)
        )
        before, after = source.state_dict(), target.state_dict()
        backbone = [k for k in before if not k.startswith(f"{head}.")]
        assert all(torch.equal(before[k], after[k]) for k in backbone)  # BN statistics too
        assert any(not torch.equal(before[k], after[k]) for k in before if k not in backbone)


def test_a_corrupt_image_stops_prepare_naming_the_file(tmp_path, tiny_params, capsys):
    root = make_project(tmp_path / "project", tiny_params)
    victim = next((root / "data/raw/target/train").rglob("*.png"))
    victim.write_bytes(victim.read_bytes()[:40])
    assert main(["--root", str(root), "stage", "prepare"]) == 2
    err = capsys.readouterr().err
    assert victim.name in err
    assert "Traceback" not in err


def test_a_bad_params_value_stops_before_any_work_naming_the_key(tmp_path, tiny_params, capsys):
    root = make_project(tmp_path / "project", tiny_params)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["pretrain"]["lr"] = -0.1
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--root", str(root), "stage", "pretrain"]) == 2
    assert "pretrain.lr" in capsys.readouterr().err
    assert not Path(root / "models").exists()
