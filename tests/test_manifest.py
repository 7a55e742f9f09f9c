"""The manifest: layouts, stable content-hash splits, determinism and image integrity."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadshift.config import SPLITS, PrepareSection, parse_params
from roadshift.data.manifest import (
    MANIFEST_COLUMNS,
    CorruptImageError,
    DatasetLayoutError,
    build_manifest,
    class_names,
    read_manifest,
    split_for_content,
    write_manifest,
)
from roadshift.stages.prepare import run_prepare

CFG = PrepareSection()


def write_png(path: Path, seed: int, side: int = 12, mode: str = "RGB") -> Path:
    """A small PNG whose bytes are unique to ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def flat_tree(domain_dir: Path, classes: dict[str, int], first_seed: int = 0) -> None:
    seed = first_seed
    for label, count in classes.items():
        for i in range(count):
            write_png(domain_dir / label / f"{label}_{i:03d}.png", seed)
            seed += 1


def test_split_folder_layout_takes_splits_and_labels_from_folders(tmp_path):
    domain_dir = tmp_path / "data" / "raw" / "target"
    write_png(domain_dir / "train" / "stop" / "a.png", 1)
    write_png(domain_dir / "train" / "give_way" / "b.png", 2, side=20)
    write_png(domain_dir / "test" / "stop" / "c.png", 3, mode="L")
    write_png(domain_dir / "test" / "give_way" / "nested" / "d.png", 4)

    frame = build_manifest(domain_dir, "target", CFG, tmp_path)

    assert tuple(frame.columns) == MANIFEST_COLUMNS
    assert list(frame["path"]) == [
        "data/raw/target/test/give_way/nested/d.png",
        "data/raw/target/test/stop/c.png",
        "data/raw/target/train/give_way/b.png",
        "data/raw/target/train/stop/a.png",
    ]
    assert list(frame["split"]) == ["test", "test", "train", "train"]
    assert list(frame["label"]) == ["give_way", "stop", "give_way", "stop"]
    assert set(frame["domain"]) == {"target"}
    row = frame.set_index("path").loc["data/raw/target/test/stop/c.png"]
    assert (row["width"], row["height"], row["mode"], row["format"]) == (12, 12, "L", "PNG")
    assert row["bytes"] == (domain_dir / "test" / "stop" / "c.png").stat().st_size
    assert class_names(frame) == ("give_way", "stop")


def test_flat_layout_assigns_splits_from_the_content_hash(tmp_path):
    domain_dir = tmp_path / "source"
    flat_tree(domain_dir, {"stop": 30, "give_way": 30})

    frame = build_manifest(domain_dir, "source", CFG, tmp_path)

    assert set(frame["split"]) == set(SPLITS)
    for sha, split in zip(frame["sha256"], frame["split"], strict=True):
        assert split == split_for_content(sha, CFG.split_fractions)
    assert (frame["split"] == "train").sum() > (frame["split"] == "test").sum()


def test_adding_files_leaves_every_earlier_split_unchanged(tmp_path):
    domain_dir = tmp_path / "source"
    flat_tree(domain_dir, {"stop": 20, "give_way": 20})
    before = build_manifest(domain_dir, "source", CFG, tmp_path).set_index("path")["split"]

    for i in range(25):
        write_png(domain_dir / "stop" / f"batch2_{i:03d}.png", 1000 + i)
    write_png(domain_dir / "no_entry" / "first.png", 5000)
    after = build_manifest(domain_dir, "source", CFG, tmp_path).set_index("path")["split"]

    assert len(after) == len(before) + 26
    assert after.loc[before.index].equals(before)


def test_byte_identical_duplicates_never_cross_splits(tmp_path):
    domain_dir = tmp_path / "source"
    flat_tree(domain_dir, {"stop": 15, "give_way": 15})
    originals = sorted(domain_dir.rglob("*.png"))
    for i, original in enumerate(originals):
        shutil.copyfile(original, domain_dir / "give_way" / f"copy_{i:03d}.png")

    frame = build_manifest(domain_dir, "source", CFG, tmp_path)

    splits_per_content = frame.groupby("sha256")["split"].nunique()
    assert (frame.groupby("sha256").size() == 2).all()
    assert (splits_per_content == 1).all()


def test_manifest_csv_is_deterministic_and_round_trips(tmp_path):
    domain_dir = tmp_path / "source"
    flat_tree(domain_dir, {"stop": 6, "give_way": 6})
    first = write_manifest(
        build_manifest(domain_dir, "source", CFG, tmp_path), tmp_path / "a" / "m.csv"
    )
    second = write_manifest(build_manifest(domain_dir, "source", CFG, tmp_path), tmp_path / "b.csv")

    assert first.read_bytes() == second.read_bytes()
    assert not list(first.parent.glob(".*tmp"))
    frame = read_manifest(first)
    assert list(frame["path"]) == sorted(frame["path"])
    assert frame["width"].dtype == "int64"
    assert frame["bytes"].dtype == "int64"
    assert frame.equals(build_manifest(domain_dir, "source", CFG, tmp_path))


def test_only_listed_extensions_count_and_hidden_files_are_skipped(tmp_path):
    domain_dir = tmp_path / "source"
    write_png(domain_dir / "stop" / "a.png", 1)
    image = Image.open(write_png(tmp_path / "tmp.png", 2))
    image.save(domain_dir / "stop" / "b.JPG", format="JPEG")
    image.save(domain_dir / "stop" / "c.gif")  # not in prepare.extensions
    (domain_dir / "stop" / "notes.txt").write_text("not an image")
    (domain_dir / "stop" / ".DS_Store").write_bytes(b"\x00\x01")
    (domain_dir / "stop" / "._a.png").write_bytes(b"macOS resource fork")
    (domain_dir / ".cache" / "x").mkdir(parents=True)
    (domain_dir / ".cache" / "x" / "y.png").write_bytes(b"")

    frame = build_manifest(domain_dir, "source", CFG, tmp_path)

    assert [Path(p).name for p in frame["path"]] == ["a.png", "b.JPG"]
    assert list(frame["format"]) == ["PNG", "JPEG"]


def _truncated_png(path: Path) -> None:
    data = write_png(path, 9, side=32).read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated": (_truncated_png, "truncated"),
    "zero_byte": (lambda path: path.write_bytes(b""), "empty file"),
    "text_file": (lambda path: path.write_text("hello, not a PNG"), "not an image"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_image_raises_naming_the_file_and_the_fix(tmp_path, kind):
    domain_dir = tmp_path / "target"
    flat_tree(domain_dir, {"stop": 3})
    bad = domain_dir / "stop" / "bad.png"
    corrupt, reason = CORRUPTIONS[kind]
    corrupt(bad)

    with pytest.raises(CorruptImageError) as caught:
        build_manifest(domain_dir, "target", CFG, tmp_path)

    assert caught.value.path == bad
    assert reason in caught.value.reason
    message = str(caught.value)
    assert f"{bad}: " in message and reason in message
    assert "remove or replace" in message


def test_every_corrupt_image_is_listed_in_one_error(tmp_path):
    domain_dir = tmp_path / "target"
    flat_tree(domain_dir, {"stop": 3, "give_way": 3})
    bad_files = []
    for i, (corrupt, _) in enumerate(CORRUPTIONS.values()):
        bad_files.append(domain_dir / "give_way" / f"bad_{i}.png")
        corrupt(bad_files[-1])

    with pytest.raises(CorruptImageError) as caught:
        build_manifest(domain_dir, "target", CFG, tmp_path)

    assert [p.path for p in caught.value.problems] == bad_files
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("3 image files failed the integrity check")
    assert [line.split(": ")[0].strip() for line in lines[1:]] == [str(p) for p in bad_files]


def test_empty_class_folders_and_empty_trees_are_named(tmp_path):
    domain_dir = tmp_path / "source"
    write_png(domain_dir / "stop" / "a.png", 1)
    (domain_dir / "give_way").mkdir()
    (domain_dir / "no_entry").mkdir()
    (domain_dir / "no_entry" / "readme.txt").write_text("images go here")
    with pytest.raises(DatasetLayoutError, match="2 class folder") as caught:
        build_manifest(domain_dir, "source", CFG, tmp_path)
    assert str(domain_dir / "give_way") in str(caught.value)
    assert str(domain_dir / "no_entry") in str(caught.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match=f"{empty}: no images"):
        build_manifest(empty, "source", CFG, tmp_path)


def test_mixing_split_folders_with_class_folders_is_refused(tmp_path):
    domain_dir = tmp_path / "source"
    write_png(domain_dir / "train" / "stop" / "a.png", 1)
    write_png(domain_dir / "stop" / "b.png", 2)
    with pytest.raises(DatasetLayoutError, match="mixes split folders"):
        build_manifest(domain_dir, "source", CFG, tmp_path)


def test_prepare_writes_both_manifests_and_names_a_missing_folder_by_its_key(tmp_path):
    flat_tree(tmp_path / "data" / "raw" / "source", {"stop": 3})
    write_png(tmp_path / "elsewhere" / "test" / "stop" / "x.png", 7)
    params = parse_params({"data": {"target": {"path": str(tmp_path / "elsewhere")}}})

    written = run_prepare(params, tmp_path)

    assert written == {
        "source": tmp_path / "data" / "prepared" / "source.csv",
        "target": tmp_path / "data" / "prepared" / "target.csv",
        "target_unlabeled": tmp_path / "data" / "prepared" / "target_unlabeled.csv",  # no pool
    }
    assert read_manifest(written["target_unlabeled"]).empty
    assert read_manifest(written["target"])["path"].tolist() == ["elsewhere/test/stop/x.png"]

    missing = parse_params({"data": {"target": {"path": "data/raw/nowhere"}}})
    with pytest.raises(FileNotFoundError, match=r"data\.target\.path"):
        run_prepare(missing, tmp_path)
