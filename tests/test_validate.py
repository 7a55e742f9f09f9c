"""The validate stage: a real Great Expectations run on tiny two-domain datasets.

GX is imported once for the module (seconds); each run_validate call then costs well under
a second, so every failure mode gets its own small project copied from one clean tree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadshift.config import parse_params
from roadshift.layout import Layout
from roadshift.stages.prepare import run_prepare
from roadshift.stages.validate import DataValidationError, ValidationSummary, run_validate

CLASSES = ("give_way", "no_entry", "stop")
SPLIT_SIZES = {"source": {"train": 4, "val": 1, "test": 2}, "target": {"train": 3, "test": 2}}
PARAMS = parse_params({"validate": {"min_images_per_class": 2}})


def write_png(path: Path, seed: int, side: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def raw(root: Path, domain: str) -> Path:
    return root / "data" / "raw" / domain


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory) -> Path:
    """Both domains in the split-folder layout, every image unique; GX imported once here."""
    import great_expectations  # noqa: F401  (pay the import once, not in the first test)

    root = tmp_path_factory.mktemp("clean")
    seed = 0
    for domain, sizes in SPLIT_SIZES.items():
        for split, count in sizes.items():
            for label in CLASSES:
                for i in range(count):
                    write_png(raw(root, domain) / split / label / f"{i}.png", seed)
                    seed += 1
    return root


@pytest.fixture
def project(clean_tree, tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(clean_tree, root)
    return root


def validate(root: Path) -> ValidationSummary:
    run_prepare(PARAMS, root)
    return run_validate(PARAMS, root)


def failure_of(root: Path) -> str:
    with pytest.raises(DataValidationError) as caught:
        validate(root)
    summary = json.loads((Layout(root).validation_dir / "summary.json").read_text())
    assert summary["success"] is False
    assert summary["failures"] == list(caught.value.failures)
    return str(caught.value)


def test_a_clean_dataset_passes_and_writes_every_report(project):
    summary = validate(project)

    assert summary.success
    assert summary.images["source"] == {"train": 12, "val": 3, "test": 6, "total": 21}
    assert summary.images["target"] == {"train": 9, "val": 0, "test": 6, "total": 15}
    assert summary.classes["target"]["train"] == dict.fromkeys(CLASSES, 3)
    assert summary.metrics["target_test_images"] == 6.0

    layout = Layout(project)
    report = json.loads((layout.validation_dir / "summary.json").read_text())
    assert report["success"] and report["labels"] == list(CLASSES)
    expectations = report["domains"]["target"]["expectations"]
    assert all(e["success"] for e in expectations)
    assert {"expect_column_values_to_be_between", "expect_column_values_to_be_in_set"} <= {
        e["expectation"] for e in expectations
    }
    for domain in ("source", "target"):
        gx_result = json.loads((layout.validation_dir / f"{domain}.json").read_text())
        assert gx_result["images"]["success"] and gx_result["classes"]["success"]
    html = (layout.validation_dir / "index.html").read_text()
    assert 'Data validation: <span class="pass">PASS</span>' in html
    assert html.count("<h2>source: ") == 1 and html.count("<h2>target: ") == 1
    assert "expect_column_values_to_be_in_set" in html and "http" not in html
    metrics = json.loads(layout.metrics("validate").read_text())
    assert metrics["images"]["source"]["train"] == 12
    assert metrics["classes"] == 3


def test_class_sets_that_differ_name_the_classes_on_each_side(project):
    for i in range(3):
        write_png(raw(project, "source") / "train" / "school_zone" / f"{i}.png", 900 + i)
        write_png(raw(project, "target") / "train" / "cow_crossing" / f"{i}.png", 950 + i)

    message = failure_of(project)

    assert "only in source: school_zone; only in target: cow_crossing" in message


def test_the_same_image_bytes_in_train_and_test_is_leakage_naming_both_files(project):
    train_file = raw(project, "target") / "train" / "stop" / "0.png"
    test_copy = raw(project, "target") / "test" / "stop" / "copy_of_train.png"
    shutil.copyfile(train_file, test_copy)

    message = failure_of(project)

    html = (Layout(project).validation_dir / "index.html").read_text()
    assert "FAIL" in html and "data/raw/target/test/stop/copy_of_train.png" in html
    leakage = [line for line in message.splitlines() if "splits_sharing_content" in line]
    assert len(leakage) == 1
    assert "target expect_column_values_to_be_in_set" in leakage[0]
    assert "2 of 16 images fail" in leakage[0]
    assert "data/raw/target/train/stop/0.png" in leakage[0]
    assert "data/raw/target/test/stop/copy_of_train.png" in leakage[0]
    assert "leakage" in leakage[0]


def test_an_image_below_the_minimum_side_fails_naming_it(project):
    write_png(raw(project, "source") / "val" / "stop" / "tiny.png", 999, side=8)

    message = failure_of(project)

    failed = [line for line in message.splitlines() if line.startswith("  - source")]
    assert len(failed) == 2  # width and height
    assert "on width: 1 of 22 images fail, e.g. data/raw/source/val/stop/tiny.png (width=8)" in (
        failed[0] + failed[1]
    )
    assert "validate.min_image_side" in message


def test_a_missing_target_test_split_fails(project):
    shutil.rmtree(raw(project, "target") / "test")

    message = failure_of(project)

    assert "target expect_column_distinct_values_to_contain_set on split" in message
    assert "missing 'test'" in message
    report = json.loads((Layout(project).validation_dir / "summary.json").read_text())
    assert report["domains"]["source"]["success"] is True
    assert report["domains"]["target"]["success"] is False


def test_a_split_holding_too_large_a_share_of_the_images_fails_naming_the_split(project):
    val = raw(project, "source") / "val"
    for label in CLASSES:
        for i in range(12):
            write_png(val / label / f"extra-{i}.png", 5000 + 100 * CLASSES.index(label) + i)

    message = failure_of(project)

    assert "on share_within_bounds: 1 of 3 splits fail, e.g. val" in message
    assert "validate.split_fractions" in message
