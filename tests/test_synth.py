"""The embedded synthetic dataset: deterministic, ImageFolder layout, and really shifted."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadshift.config import SynthSection
from roadshift.data.synth import (
    CLASSES,
    add_target_batch,
    image_rng,
    render_sign_image,
    source_split_counts,
    synthesize_dataset,
    synthesize_domain,
    write_contact_sheet,
)

TINY = SynthSection(
    source_per_class=4,
    target_train_per_class=2,
    target_val_per_class=1,
    target_test_per_class=2,
    target_unlabeled_per_class=2,
    image_size=32,
)


def file_digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    synthesize_dataset(raw, TINY, seed=7)
    return raw


def test_same_seed_gives_byte_identical_files(tiny_raw: Path, tmp_path: Path) -> None:
    synthesize_dataset(tmp_path, TINY, seed=7)
    first, second = file_digests(tiny_raw), file_digests(tmp_path)
    assert first == second
    assert len(first) == 8 * (4 + 5 + 2)


def test_different_seed_gives_different_images(tiny_raw: Path, tmp_path: Path) -> None:
    synthesize_dataset(tmp_path, TINY, seed=8)
    first, second = file_digests(tiny_raw), file_digests(tmp_path)
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first)


def test_layout_counts_and_returned_totals(tmp_path: Path) -> None:
    counts = synthesize_dataset(tmp_path, TINY, seed=1)
    assert counts == {"source": 8 * 4, "target": 8 * 5, "target_unlabeled": 8 * 2}
    expected = {
        "source": source_split_counts(4),
        "target": {"train": 2, "val": 1, "test": 2},
    }
    for domain, per_split in expected.items():
        assert sorted(p.name for p in (tmp_path / domain).iterdir()) == ["test", "train", "val"]
        for split, count in per_split.items():
            split_dir = tmp_path / domain / split
            assert sorted(p.name for p in split_dir.iterdir()) == sorted(CLASSES)
            for class_name in CLASSES:
                names = sorted(p.name for p in (split_dir / class_name).iterdir())
                assert names == [f"{i:05d}.png" for i in range(count)]


@pytest.mark.parametrize(
    ("per_class", "expected"),
    [
        (3, {"train": 1, "val": 1, "test": 1}),
        (10, {"train": 8, "val": 1, "test": 1}),
        (220, {"train": 154, "val": 33, "test": 33}),
    ],
)
def test_source_split_is_70_15_15_with_at_least_one_each(
    per_class: int, expected: dict[str, int]
) -> None:
    assert source_split_counts(per_class) == expected


def test_images_are_rgb_of_the_configured_size(tiny_raw: Path) -> None:
    paths = sorted(tiny_raw.rglob("*.png"))
    assert paths
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (32, 32)


@pytest.mark.parametrize("domain", ["source", "target"])
@pytest.mark.parametrize("class_name", CLASSES)
def test_render_is_deterministic_for_every_class(domain: str, class_name: str) -> None:
    first = render_sign_image(domain, class_name, image_rng(3, domain, class_name), 48)
    second = render_sign_image(domain, class_name, image_rng(3, domain, class_name), 48)
    assert first.mode == "RGB" and first.size == (48, 48)
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_render_rejects_unknown_domain_and_class() -> None:
    with pytest.raises(ValueError, match="domain"):
        render_sign_image("mars", "stop", image_rng(0), 32)
    with pytest.raises(ValueError, match="class"):
        render_sign_image("source", "roundabout", image_rng(0), 32)


def test_target_batch_adds_only_new_files(tmp_path: Path) -> None:
    synthesize_dataset(tmp_path, TINY, seed=7)
    target = tmp_path / "target"
    before = file_digests(target)

    added = add_target_batch(target, per_class=2, image_size=32, seed=7, batch_id="batch1")

    after = file_digests(target)
    assert added == 8 * 2
    assert {name: after[name] for name in before} == before
    new_names = sorted(set(after) - set(before))
    assert len(new_names) == added
    assert all(name.startswith("train/") and "/batch1-" in name for name in new_names)


def test_target_batches_differ_and_cannot_be_written_twice(tmp_path: Path) -> None:
    add_target_batch(tmp_path, per_class=1, image_size=32, seed=7, batch_id="batch1")
    add_target_batch(tmp_path, per_class=1, image_size=32, seed=7, batch_id="batch2")
    digests = file_digests(tmp_path)
    for class_name in CLASSES:
        first = digests[f"train/{class_name}/batch1-00000.png"]
        assert first != digests[f"train/{class_name}/batch2-00000.png"]
    with pytest.raises(FileExistsError, match="batch1"):
        add_target_batch(tmp_path, per_class=1, image_size=32, seed=7, batch_id="batch1")
    assert file_digests(tmp_path) == digests


def test_resynthesising_fewer_images_drops_stale_files_but_keeps_batches(tmp_path: Path) -> None:
    synthesize_domain("target", tmp_path, {"train": 3}, image_size=32, seed=7)
    add_target_batch(tmp_path, per_class=1, image_size=32, seed=7, batch_id="b1")
    synthesize_domain("target", tmp_path, {"train": 1}, image_size=32, seed=7)
    names = sorted(p.name for p in (tmp_path / "train" / "stop").iterdir())
    assert names == ["00000.png", "b1-00000.png"]


def test_contact_sheet_is_a_valid_png(tiny_raw: Path, tmp_path: Path) -> None:
    out = write_contact_sheet(
        {"source": tiny_raw / "source", "target": tiny_raw / "target"},
        tmp_path / "sheets" / "contact.png",
        per_class=3,
    )
    assert out == tmp_path / "sheets" / "contact.png"
    with Image.open(out) as sheet:
        sheet.verify()
    with Image.open(out) as sheet:
        assert sheet.format == "PNG" and sheet.mode == "RGB"
        assert sheet.height > 2 * len(CLASSES) * 32
        pixels = np.asarray(sheet)
        assert pixels.std() > 10  # not a blank page


def colour_fractions(domain: str, class_name: str, count: int = 12) -> tuple[float, float]:
    """Fractions of sign-yellow and sign-red pixels over ``count`` renders."""
    yellow, red = [], []
    for index in range(count):
        image = render_sign_image(domain, class_name, image_rng(11, domain, class_name, index), 48)
        rgb = np.asarray(image, np.int32)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        yellow.append(np.mean((r > 150) & (g > 130) & (b < 90) & (r - b > 100)))
        red.append(np.mean((r > 110) & (r - g > 60) & (r - b > 50)))
    return float(np.mean(yellow)), float(np.mean(red))


@pytest.mark.parametrize("class_name", ["pedestrian_crossing", "signal_ahead"])
def test_warning_signs_are_yellow_in_source_and_red_bordered_in_target(class_name: str) -> None:
    source_yellow, source_red = colour_fractions("source", class_name)
    target_yellow, target_red = colour_fractions("target", class_name)
    assert source_yellow > 3 * target_yellow
    assert target_red > 3 * source_red


def test_stop_signs_stay_red_in_both_domains() -> None:
    _, source_red = colour_fractions("source", "stop")
    _, target_red = colour_fractions("target", "stop")
    assert source_red > 0.05 and target_red > 0.05
