"""``roadshift data validate <folder>``: the pipeline's checks on any tree, one line per problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadshift.cli import main

CLASSES = ("give_way", "no_entry", "stop")


def write_png(path: Path, seed: int, side: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory) -> Path:
    """A target tree in split folders that passes every check; GX imported once here."""
    import great_expectations  # noqa: F401

    root = tmp_path_factory.mktemp("clean") / "my-target"
    seed = 0
    for split, count in {"train": 3, "test": 1}.items():
        for label in CLASSES:
            for i in range(count):
                write_png(root / split / label / f"{i}.png", seed)
                seed += 1
    return root


@pytest.fixture
def folder(clean_folder, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(clean_folder, tmp_path / "my-target")
    return Path("my-target")


def run(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["data", "validate", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out.splitlines()


def test_a_clean_folder_passes_with_a_one_line_summary(folder, capsys):
    code, lines = run(capsys, str(folder))

    assert code == 0
    assert len(lines) == 1
    assert lines[0].startswith("OK my-target: 12 images in 3 classes (train 9, val 0, test 3); ")
    assert lines[0].endswith("checks passed")


def test_every_problem_is_printed_one_line_each_naming_the_file(folder, capsys):
    (folder / "train" / "stop" / "empty.png").write_bytes(b"")
    (folder / "train" / "stop" / "notes.png").write_text("not an image")
    write_png(folder / "train" / "give_way" / "tiny.png", 99, side=8)
    shutil.copyfile(folder / "train" / "no_entry" / "0.png", folder / "test" / "no_entry" / "x.png")

    code, lines = run(capsys, str(folder))

    assert code == 1
    assert lines[0] == "roadshift: data validate: my-target: 6 problem(s)"
    assert lines[1:3] == [
        "my-target/train/stop/empty.png: empty file (0 bytes)",
        "my-target/train/stop/notes.png: not an image Pillow can read "
        "(wrong extension or not an image)",
    ]
    tiny = [line for line in lines if line.startswith("my-target/train/give_way/tiny.png")]
    assert [line.split("; fix:")[0] for line in tiny] == [
        "my-target/train/give_way/tiny.png (width=8): "
        "fails expect_column_values_to_be_between on width",
        "my-target/train/give_way/tiny.png (height=8): "
        "fails expect_column_values_to_be_between on height",
    ]
    leaked = [line for line in lines if "splits_sharing_content" in line]
    assert sorted(line.split(":")[0] for line in leaked) == [
        "my-target/test/no_entry/x.png",
        "my-target/train/no_entry/0.png",
    ]
    assert len(lines) == 1 + 6


def test_class_sets_are_compared_against_another_tree(folder, capsys, tmp_path):
    other = tmp_path / "my-source"
    for i, label in enumerate(("give_way", "stop", "school_zone")):
        write_png(other / label / "a.png", 500 + i)

    code, lines = run(capsys, str(folder), "--against", str(other))

    assert code == 1
    assert any("only in source: school_zone; only in target: no_entry" in line for line in lines)
    assert any(line.startswith("school_zone (train_images=0): fails") for line in lines)


def test_a_folder_that_is_not_an_image_tree_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    code, lines = run(capsys, "missing")

    assert code == 1
    assert lines == [
        "roadshift: data validate: missing: 1 problem(s)",
        "missing: data folder not found",
    ]


def test_thresholds_come_from_the_params_file(folder, capsys, tmp_path):
    (tmp_path / "strict.yaml").write_text("validate:\n  min_images_per_class: 5\n")

    code, lines = run(capsys, str(folder), "--params", "strict.yaml")

    assert code == 1
    assert len(lines) == 1 + len(CLASSES)
    assert all(
        "(train_images=3): fails expect_column_values_to_be_between" in line for line in lines[1:]
    )
