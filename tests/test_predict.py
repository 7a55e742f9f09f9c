"""`roadshift predict` for real: a tiny model registered as champion in a SQLite store, then the
CLI run in a fresh process that gets the model (and its preprocessing) only from the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from roadshift.data.dataset import load_rgb
from roadshift.registry.register import load_champion
from roadshift.registry.tags import CHAMPION
from roadshift.serve.predict import (
    CHAMPION_ALIAS,
    PredictError,
    batch_progress,
    decode_image,
    find_images,
    output_format,
)
from tests.helpers import CLASSES, png_bytes, register_champion, venv_environment

NAME = "predict-road-signs"
COLUMNS = ["path", "label", "confidence", *(f"prob_{c}" for c in CLASSES)]
# Found by scanning "signs" (sorted), then the file named on the command line.
PREDICTED = ["signs/a/deep/grey.png", "signs/a/red.png", "signs/b/wide.jpg", "loose.png"]


def _save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def write_images(root: Path) -> None:
    """Sizes and modes that differ (a grey PNG, an RGBA PNG, a JPEG), plus files to ignore."""
    rng = np.random.default_rng(3)
    red = np.zeros((40, 40, 3), dtype=np.uint8)
    red[..., 0] = 220
    _save(Image.fromarray(red), root / "signs/a/red.png")
    grey = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))
    _save(Image.fromarray(grey, mode="L"), root / "signs/a/deep/grey.png")
    blue = np.zeros((30, 50, 3), dtype=np.uint8)
    blue[..., 2] = 200
    _save(Image.fromarray(blue), root / "signs/b/wide.jpg", quality=95)
    noise = rng.integers(0, 256, size=(40, 40, 4), dtype=np.uint8)
    _save(Image.fromarray(noise, mode="RGBA"), root / "loose.png")
    _save(Image.fromarray(red), root / "signs/.hidden.png")
    (root / "signs/notes.txt").write_text("not an image\n")
    _save(Image.fromarray(red), root / "bad/ok.png")
    (root / "bad/broken.png").write_bytes(png_bytes(red)[:60])  # header only: truncated


def write_project(root: Path, model_name: str) -> Path:
    root.mkdir(parents=True)
    params = {"register": {"model_name": model_name}, "tracking": {"experiment": "predict-cli"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


# Runs CLI invocations in one fresh interpreter (one import of MLflow, not one per call) and
# records every import of torch, albumentations or roadshift's model/training code that does
# not happen inside MLflow's pyfunc machinery (loading or calling the registered model).
DRIVER = r"""
import contextlib, io, json, sys, traceback

FORBIDDEN = ("torch", "torchvision", "albumentations", "roadshift.train.models",
             "roadshift.registry.pyfunc", "roadshift.registry.register",
             "roadshift.data.transforms", "roadshift.train.loop", "roadshift.stages",
             "roadshift.transfer")
outside_pyfunc = set()


def forbidden(name):
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


class ImportAudit:
    def find_spec(self, name, path=None, target=None):
        if forbidden(name) and not any(
            "/mlflow/pyfunc/" in frame.filename for frame in traceback.extract_stack()
        ):
            outside_pyfunc.add(name)
        return None


sys.meta_path.insert(0, ImportAudit())
from roadshift.cli import main

invocations, report = json.loads(sys.argv[1]), sys.argv[2]
runs = {}
for key, argv in invocations.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as stop:
            rc = stop.code
        except Exception:
            rc = "exception"
            traceback.print_exc()
    runs[key] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
loaded = sorted(name for name in sys.modules if forbidden(name))
with open(report, "w") as handle:
    json.dump({"runs": runs, "outside_pyfunc": sorted(outside_pyfunc), "loaded": loaded}, handle)
"""


def invocations() -> dict[str, list[str]]:
    predict = ["--root", "project", "predict"]
    return {
        "csv": [*predict, "signs", "loose.png", "--out", "out/preds.csv", "--batch-size", "2"],
        "json": [*predict, "signs", "loose.png", "signs/a/red.png", "--out", "out/preds.json"],
        "table": [*predict, "loose.png"],
        "corrupt": [*predict, "bad"],
        "skip": [*predict, "bad", "--skip-bad", "--out", "out/skip.csv"],
        "bad_suffix": [*predict, "loose.png", "--out", "out/preds.txt"],
        "no_champion": ["--root", "empty-project", "predict", "loose.png"],
        "explicit_model": [*predict, "loose.png", "--model", f"models:/{NAME}/1"],
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    write_images(root)
    write_project(root / "project", NAME)
    write_project(root / "empty-project", "nobody-road-signs")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = register_champion(tmp_path_factory.mktemp("predict-store"), NAME)
    yield uri
    mlflow.set_tracking_uri(None)  # back to MLflow's default for later modules


@pytest.fixture(scope="module")
def cli(workdir, store) -> dict:
    """Every CLI invocation's exit code and output, from one fresh process."""
    report = workdir / "report.json"
    env = {**venv_environment(), "MLFLOW_TRACKING_URI": store}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(invocations()), str(report)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(report.read_text())


def _run(cli: dict, key: str) -> dict:
    run = cli["runs"][key]
    assert run["rc"] != "exception", run["stderr"]
    return run


@pytest.mark.slow
def test_the_cli_never_imports_model_or_training_code_itself(cli):
    assert cli["outside_pyfunc"] == []
    # ...and the registered model did load its own preprocessing to predict.
    assert "roadshift.data.transforms" in cli["loaded"]


@pytest.mark.slow
def test_csv_has_a_row_per_image_with_class_labels_and_probabilities_summing_to_one(workdir, cli):
    assert _run(cli, "csv")["rc"] == 0
    frame = pd.read_csv(workdir / "out/preds.csv")
    assert list(frame.columns) == COLUMNS
    assert list(frame["path"]) == PREDICTED
    assert set(frame["label"]) <= set(CLASSES)
    probabilities = frame[COLUMNS[3:]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(frame["confidence"], probabilities.max(axis=1))
    chosen = [CLASSES[i] for i in probabilities.argmax(axis=1)]
    assert list(frame["label"]) == chosen
    assert len({tuple(row.round(6)) for row in probabilities}) == len(frame)  # input-dependent


@pytest.mark.slow
def test_predictions_are_the_champions_on_each_decoded_image(workdir, store, cli):
    """Batches of two with mixed sizes give what one image at a time gives, row by row
    (to float32 rounding: a batch of another size takes other CPU kernels)."""
    frame = pd.read_csv(workdir / "out/preds.csv")
    champion = load_champion(NAME)
    for _, row in frame.iterrows():
        expected = champion.predict(load_rgb(workdir / row["path"])[np.newaxis])
        assert row["label"] == expected["label"][0], row["path"]
        np.testing.assert_allclose(
            row[COLUMNS[3:]].to_numpy(float), expected.iloc[0, 1:].to_numpy(float), atol=1e-5
        )


@pytest.mark.slow
def test_json_holds_the_same_rows_as_csv_and_a_file_named_twice_once(workdir, cli):
    run = _run(cli, "json")
    assert run["rc"] == 0
    # Nothing else on stderr: no progress bar off a terminal, no MLflow type-hint nag.
    assert run["stderr"] == f"{len(PREDICTED)} prediction(s) written to out/preds.json\n"
    records = json.loads((workdir / "out/preds.json").read_text())
    assert [list(record) for record in records] == [COLUMNS] * len(PREDICTED)
    from_json = pd.DataFrame(records)
    pd.testing.assert_frame_equal(
        from_json, pd.read_csv(workdir / "out/preds.csv"), check_exact=False, atol=1e-5
    )


@pytest.mark.slow
def test_without_out_a_table_goes_to_stdout(cli):
    run = _run(cli, "table")
    assert run["rc"] == 0
    header, row = run["stdout"].strip().splitlines()
    assert header.split() == COLUMNS
    assert row.split()[0] == "loose.png"
    assert row.split()[1] in CLASSES


@pytest.mark.slow
def test_a_corrupt_image_stops_the_run_naming_the_file(cli):
    run = _run(cli, "corrupt")
    assert run["rc"] == 2
    assert "bad/broken.png" in run["stderr"]
    assert "--skip-bad" in run["stderr"]
    assert run["stdout"] == ""


@pytest.mark.slow
def test_skip_bad_predicts_the_rest_and_lists_what_it_skipped(workdir, cli):
    run = _run(cli, "skip")
    assert run["rc"] == 0
    assert "skipped 1 unreadable file(s)" in run["stderr"]
    assert "bad/broken.png" in run["stderr"]
    assert list(pd.read_csv(workdir / "out/skip.csv")["path"]) == ["bad/ok.png"]


@pytest.mark.slow
def test_no_champion_says_to_run_the_pipeline_or_pass_a_model(cli):
    run = _run(cli, "no_champion")
    assert run["rc"] == 2
    assert "models:/nobody-road-signs@champion" in run["stderr"]
    assert "run the pipeline" in run["stderr"]
    assert "--model" in run["stderr"]


@pytest.mark.slow
def test_an_explicit_model_uri_is_used(cli):
    run = _run(cli, "explicit_model")
    assert run["rc"] == 0
    assert _run(cli, "table")["stdout"] == run["stdout"]  # version 1 is the champion


@pytest.mark.slow
def test_an_unknown_output_suffix_is_refused_before_loading_the_model(cli):
    run = _run(cli, "bad_suffix")
    assert run["rc"] == 2
    assert "must end in .csv or .json" in run["stderr"]


# --------------------------------------------------------------------------- no model needed


def test_folders_are_scanned_recursively_for_image_extensions_only(workdir):
    found = find_images([workdir / "signs"], (".png", ".JPG"))
    assert [p.relative_to(workdir).as_posix() for p in found] == PREDICTED[:3]


def test_a_missing_path_or_an_imageless_folder_is_an_error(workdir, tmp_path):
    with pytest.raises(PredictError, match=r"nope\.png: no such file or folder"):
        find_images([workdir / "nope.png"])
    with pytest.raises(PredictError, match="no image files in this folder"):
        find_images([tmp_path])


def test_decoding_names_the_file_and_follows_the_training_colour_rule(workdir):
    with pytest.raises(PredictError, match=r"broken\.png: truncated"):
        decode_image(workdir / "bad/broken.png")
    grey = decode_image(workdir / "signs/a/deep/grey.png")
    assert grey.shape == (40, 40, 3) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey, load_rgb(workdir / "signs/a/deep/grey.png"))


def test_output_format_comes_from_the_suffix():
    assert output_format(Path("p.CSV")) == "csv"
    assert output_format(Path("p.json")) == "json"
    with pytest.raises(PredictError, match=r"must end in \.csv or \.json"):
        output_format(Path("p.parquet"))


def test_the_progress_bar_counts_files_on_stderr(capsys):
    with batch_progress(5, enabled=True) as on_batch:
        on_batch(4)
        on_batch(1)
    assert "5/5" in capsys.readouterr().err
    with batch_progress(5, enabled=False) as on_batch:
        assert on_batch is None


def test_the_default_alias_is_the_one_the_registry_promotes_to():
    assert CHAMPION_ALIAS == CHAMPION
