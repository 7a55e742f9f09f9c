"""The decoded-image cache and batched transforms: decode once, never trust a bad file,
and give exactly what decoding every image again would give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from roadshift.config import AugmentSection, PrepareSection
from roadshift.data import decoded
from roadshift.data.batch_transforms import create_batch_transform
from roadshift.data.dataset import ManifestDataset, load_rgb, split_frame
from roadshift.data.manifest import build_manifest
from roadshift.data.transforms import create_eval_transform
from roadshift.layout import Layout
from roadshift.train.loaders import make_loader
from roadshift.train.models import IMAGENET_MEAN, IMAGENET_STD

SIZE = 16
CLASSES = ("a", "b")


def _write_images(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder = root / "data" / "raw" / "target"
    rng = np.random.default_rng(0)
    for i, (name, (width, height)) in enumerate(sizes.items()):
        label = CLASSES[i % 2]
        path = folder / "train" / label / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return folder


def _manifest(root: Path) -> pd.DataFrame:
    folder = root / "data" / "raw" / "target"
    return split_frame(build_manifest(folder, "target", PrepareSection(), root), "train")


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    # square images at the model's size, and odd sizes that must be resized like the eval transform
    sizes = {f"img{i}": (SIZE, SIZE) for i in range(5)}
    sizes.update({"wide": (40, 20), "tall": (9, 30)})
    _write_images(tmp_path, sizes)
    return tmp_path


def _dataset(root: Path, *, cache: bool = True, augment: AugmentSection | None = None):
    transform = create_batch_transform(SIZE, IMAGENET_MEAN, IMAGENET_STD, augment)
    return ManifestDataset(_manifest(root), root, CLASSES, transform, cache=cache)


def _cache_files(root: Path) -> list[Path]:
    return sorted(Layout(root).decoded_cache_dir.glob("*.npy"))


def test_cached_batches_are_bitwise_the_per_image_eval_transform(project):
    dataset = _dataset(project)
    images, targets = dataset.__getitems__(list(range(len(dataset))))
    reference = create_eval_transform(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    expected = torch.stack([reference(image=load_rgb(p))["image"] for p in dataset.paths])
    assert torch.equal(images, expected)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert targets.tolist() == [CLASSES.index(p.parent.name) for p in dataset.paths]


def test_the_cache_gives_what_decoding_again_gives(project):
    cached = _dataset(project, augment=AugmentSection())
    uncached = _dataset(project, cache=False, augment=AugmentSection())
    np.testing.assert_array_equal(np.asarray(cached.images), uncached.images)
    for loader_pair in zip(
        make_loader(cached, 3, shuffle=True, seed=5),
        make_loader(uncached, 3, shuffle=True, seed=5),
        strict=True,
    ):
        (a, ya), (b, yb) = loader_pair
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_a_second_load_reuses_the_cache_without_decoding(project, monkeypatch):
    first = _dataset(project)
    [entry] = _cache_files(project)
    written = entry.stat().st_ino

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache was valid")

    monkeypatch.setattr(decoded, "decode_all", no_decoding)
    second = _dataset(project)
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(second.images, first.images)
    assert _cache_files(project) == [entry] and entry.stat().st_ino == written


def test_a_changed_manifest_is_a_new_entry_with_the_new_pixels(project):
    _dataset(project)
    [old] = _cache_files(project)
    changed = project / "data" / "raw" / "target" / "train" / "a" / "img0.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 7, dtype=np.uint8)).save(changed)
    dataset = _dataset(project)
    row = [p.name for p in dataset.paths].index("img0.png")
    assert (np.asarray(dataset.images[row]) == 7).all()
    assert old in _cache_files(project) and len(_cache_files(project)) == 2


def test_only_the_newest_entries_of_a_split_are_kept(project):
    target = project / "data" / "raw" / "target" / "train" / "a" / "img0.png"
    for value in range(decoded.KEEP_PER_SPLIT + 2):
        Image.fromarray(np.full((SIZE, SIZE, 3), value, dtype=np.uint8)).save(target)
        _dataset(project)
    assert len(_cache_files(project)) == decoded.KEEP_PER_SPLIT


@pytest.mark.parametrize("damage", ["truncate", "flip_a_pixel", "drop_sidecar"])
def test_a_damaged_cache_file_is_rebuilt_not_trusted(project, damage):
    good = np.asarray(_dataset(project).images).copy()
    [entry] = _cache_files(project)
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flip_a_pixel":
        entry.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        entry.with_suffix(".json").unlink()
    rebuilt = _dataset(project)
    np.testing.assert_array_equal(np.asarray(rebuilt.images), good)
    assert entry.read_bytes() == data  # rewritten whole


def test_no_temporary_files_are_left_behind(project):
    _dataset(project)
    leftovers = [p.name for p in Layout(project).decoded_cache_dir.iterdir() if p.suffix == ".tmp"]
    assert leftovers == []


def test_train_augmentations_are_a_function_of_the_batch_seed_only():
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (6, SIZE, SIZE, 3)))
    images = images.to(torch.uint8)
    transform = create_batch_transform(SIZE, IMAGENET_MEAN, IMAGENET_STD, AugmentSection())
    first = transform(images, torch.Generator().manual_seed(3))
    again = transform(images, torch.Generator().manual_seed(3))
    other = transform(images, torch.Generator().manual_seed(4))
    assert first.shape == (6, 3, SIZE, SIZE) and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    clean = create_batch_transform(SIZE, IMAGENET_MEAN, IMAGENET_STD)(images)
    assert not torch.equal(first, clean)
    # the normalised range stays what clipped [0, 1] pixels give
    low = (0.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    per_channel = first.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= low - 1e-5).all()
    assert (per_channel.max(1).values <= high + 1e-5).all()


def test_disabled_augmentation_is_the_eval_transform():
    transform = create_batch_transform(
        SIZE, IMAGENET_MEAN, IMAGENET_STD, AugmentSection(enabled=False)
    )
    images = torch.zeros((2, SIZE, SIZE, 3), dtype=torch.uint8)
    assert torch.equal(
        transform(images), create_batch_transform(SIZE, IMAGENET_MEAN, IMAGENET_STD)(images)
    )
