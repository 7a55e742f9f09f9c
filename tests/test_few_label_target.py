"""The default validate bounds accept a few-label target and still catch a broken split.

A few-label target has about 10 labelled train images a class and most of its images in the
test split. Real Great Expectations runs over tiny generated trees, with the default params.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadshift.config import Params, load_params
from roadshift.layout import Layout
from roadshift.stages.prepare import run_prepare
from roadshift.stages.validate import DataValidationError, ValidationSummary, run_validate
from tests.helpers import PROJECT_ROOT

CLASSES = ("give_way", "stop")
SOURCE = {"train": 6, "val": 2, "test": 2}  # per class
DEFAULTS = Params()


def write_tree(root: Path, domain: str, per_class: dict[str, int], seed: int) -> None:
    """``data/raw/<domain>/<split>/<class>/<n>.png``, every image's bytes unique."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label in CLASSES:
            folder = root / "data" / "raw" / domain / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:05d}.png")


def project(root: Path, target: dict[str, int]) -> Path:
    write_tree(root, "source", SOURCE, seed=1)
    write_tree(root, "target", target, seed=2)
    return root


def validate(root: Path) -> ValidationSummary:
    run_prepare(DEFAULTS, root)
    return run_validate(DEFAULTS, root)


@pytest.fixture(scope="module", autouse=True)
def great_expectations_imported() -> None:
    import great_expectations  # noqa: F401  (pay the import once, not in the first test)


def test_the_defaults_in_params_yaml_are_the_pydantic_defaults():
    assert load_params(PROJECT_ROOT / "params.yaml").validate == DEFAULTS.validate


@pytest.mark.parametrize(
    ("target", "test_share"),
    [
        pytest.param({"train": 10, "test": 40}, 0.80, id="80-percent-test"),
        pytest.param({"train": 10, "val": 5, "test": 135}, 0.90, id="90-percent-test-with-val"),
        pytest.param({"train": 10, "test": 90}, 0.90, id="90-percent-test"),
        pytest.param({"train": 10, "test": 190}, 0.95, id="95-percent-test"),
    ],
)
def test_a_target_with_10_train_images_a_class_and_most_images_in_test_validates(
    tmp_path, target, test_share
):
    summary = validate(project(tmp_path, target))

    assert summary.success
    counts = summary.images["target"]
    assert counts["train"] == 10 * len(CLASSES)
    assert counts["test"] / counts["total"] == pytest.approx(test_share)
    assert Layout(tmp_path).validated_manifest("target").is_file()


def failure(root: Path) -> tuple[str, list[str]]:
    """The error message, and its lines about the target's split shares."""
    with pytest.raises(DataValidationError) as caught:
        validate(root)
    message = str(caught.value)
    summary = json.loads((Layout(root).validation_dir / "summary.json").read_text())
    assert summary["domains"]["source"]["success"] is True
    assert summary["domains"]["target"]["success"] is False
    assert not Layout(root).validated_manifest("target").exists()
    shares = [
        line for line in message.splitlines() if "target" in line and "share_within_bounds" in line
    ]
    return message, shares


def test_a_target_test_split_holding_995_per_mille_of_the_images_fails_naming_the_split(tmp_path):
    _, shares = failure(project(tmp_path, {"train": 3, "test": 597}))  # 99.5 % in test

    # 99.5 % in test leaves 0.5 % in train: both sides of the lopsided split are named.
    assert len(shares) == 1
    assert (
        "2 of 3 splits fail, e.g. train (share_within_bounds=False), "
        "test (share_within_bounds=False)"
    ) in shares[0]
    assert "train 0.01-0.98, val 0-0.5, test 0.02-0.97 (validate.split_fractions)" in shares[0]


def test_a_target_with_an_empty_train_split_fails_naming_the_split(tmp_path):
    message, shares = failure(project(tmp_path, {"test": 40}))

    assert "missing 'train'" in message  # validate.require_splits
    assert "validate.min_images_per_class" in message
    assert len(shares) == 1
    assert (
        "2 of 3 splits fail, e.g. train (share_within_bounds=False), "
        "test (share_within_bounds=False)"
    ) in shares[0]
