"""Each kind of awkward image file: rejected with the file named, or converted by its rule."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadshift.config import PrepareSection
from roadshift.data.images import ACCEPTED_MODES, formats_for_extensions, to_rgb
from roadshift.data.manifest import CorruptImageError, build_manifest

CFG = PrepareSection()


def noise(seed: int, side: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def good_tree(domain_dir: Path) -> None:
    for i in range(2):
        path = domain_dir / "stop" / f"good_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(i)).save(path)


def manifest_row(domain_dir: Path, name: str, cfg: PrepareSection = CFG) -> dict:
    frame = build_manifest(domain_dir, "target", cfg, domain_dir.parent)
    return frame.set_index("path").loc[f"{domain_dir.name}/stop/{name}"].to_dict()


def rejection(domain_dir: Path, bad: Path, cfg: PrepareSection = CFG) -> str:
    with pytest.raises(CorruptImageError) as caught:
        build_manifest(domain_dir, "target", cfg, domain_dir.parent)
    assert [p.path for p in caught.value.problems] == [bad]
    assert f"  {bad}: {caught.value.reason}" in str(caught.value).splitlines()
    return caught.value.reason


def _truncated(fmt: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        Image.fromarray(noise(7, side=64)).save(path, format=fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return write


REJECTED = {
    "truncated_png": ("bad.png", _truncated("PNG"), "truncated or damaged image data"),
    "truncated_jpeg": ("bad.jpg", _truncated("JPEG"), "truncated or damaged image data"),
    "zero_byte": ("bad.png", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "non_image": (
        "bad.png",
        lambda p: p.write_text("not an image"),
        "not an image Pillow can read (wrong extension or not an image)",
    ),
    "gif_named_png": (
        "bad.png",
        lambda p: Image.fromarray(noise(3)).save(p, format="GIF"),
        "holds GIF data (extension .png), not one of the accepted formats "
        "BMP, JPEG, MPO, PNG, WEBP (prepare.extensions); convert it to PNG or JPEG",
    ),
}


@pytest.mark.parametrize("kind", sorted(REJECTED))
def test_a_bad_file_is_rejected_naming_it(tmp_path, kind):
    domain_dir = tmp_path / "target"
    good_tree(domain_dir)
    name, write, reason = REJECTED[kind]
    bad = domain_dir / "stop" / name
    write(bad)

    assert rejection(domain_dir, bad).startswith(reason)


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("I", "32-bit integer pixels have no defined 8-bit range"),
        ("F", "32-bit float pixels have no defined 8-bit range"),
    ],
)
def test_32_bit_images_are_rejected_naming_the_mode(tmp_path, mode, why):
    domain_dir = tmp_path / "target"
    good_tree(domain_dir)
    bad = domain_dir / "stop" / "deep.tif"
    Image.new(mode, (16, 16), 70000).save(bad)
    cfg = PrepareSection(extensions=(".png", ".tif"))

    reason = rejection(domain_dir, bad, cfg)

    assert reason == (
        f"pixel mode {mode} is not accepted ({why}); re-export it as 8-bit RGB PNG or JPEG"
    )


def test_every_rejected_file_is_listed_once(tmp_path):
    domain_dir = tmp_path / "target"
    good_tree(domain_dir)
    bad_files = []
    for kind, (name, write, _) in sorted(REJECTED.items()):
        bad_files.append(domain_dir / "stop" / f"{kind}_{name}")
        write(bad_files[-1])

    with pytest.raises(CorruptImageError) as caught:
        build_manifest(domain_dir, "target", CFG, tmp_path)

    assert sorted(p.path for p in caught.value.problems) == sorted(bad_files)
    assert str(caught.value).startswith(f"{len(bad_files)} image files failed the integrity check")


def test_a_jpeg_named_png_is_accepted_and_recorded_as_jpeg(tmp_path):
    domain_dir = tmp_path / "target"
    good_tree(domain_dir)
    Image.fromarray(noise(5)).save(domain_dir / "stop" / "photo.png", format="JPEG")

    row = manifest_row(domain_dir, "photo.png")

    assert (row["format"], row["mode"]) == ("JPEG", "RGB")


def _save(path: Path, image: Image.Image, fmt: str = "PNG") -> Path:
    image.save(path, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return path


CONVERTED = {
    # name: (image written, format, recorded mode, expected RGB of pixel (0, 0))
    "cmyk.jpg": (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", "CMYK", (255, 0, 0)),
    "cmyk_grey.jpg": (Image.new("CMYK", (16, 16), (0, 0, 0, 128)), "JPEG", "CMYK", (127,) * 3),
    "palette.png": (
        Image.new("RGB", (16, 16), (30, 60, 90)).quantize(4),
        "PNG",
        "P",
        (30, 60, 90),
    ),
    "rgba.png": (Image.new("RGBA", (16, 16), (200, 100, 50, 0)), "PNG", "RGBA", (200, 100, 50)),
    "la.png": (Image.new("LA", (16, 16), (200, 0)), "PNG", "LA", (200, 200, 200)),
    "grey16.png": (
        Image.fromarray(np.full((16, 16), 0x12AB, dtype=np.uint16)),
        "PNG",
        "I;16",
        (0x12, 0x12, 0x12),
    ),
    "bilevel.png": (Image.new("1", (16, 16), 1), "PNG", "1", (255, 255, 255)),
}


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_a_convertible_image_is_accepted_and_converted_by_its_rule(tmp_path, name):
    domain_dir = tmp_path / "target"
    good_tree(domain_dir)
    image, fmt, mode, expected_rgb = CONVERTED[name]
    path = _save(domain_dir / "stop" / name, image, fmt)

    row = manifest_row(domain_dir, name)
    with Image.open(path) as reopened:
        rgb = np.asarray(to_rgb(reopened))

    assert (row["mode"], row["format"]) == (mode, fmt)
    assert mode in ACCEPTED_MODES
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert tuple(int(v) for v in rgb[0, 0]) == expected_rgb


def test_sixteen_bit_grey_keeps_its_full_range_where_pillow_alone_would_clip():
    ramp = Image.fromarray(np.array([[0, 256, 32768, 65535]], dtype=np.uint16))

    assert np.asarray(to_rgb(ramp))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(ramp.convert("RGB"))[0, :, 0].tolist() == [0, 255, 255, 255]


def test_to_rgb_refuses_modes_without_a_rule():
    with pytest.raises(ValueError, match="pixel mode F is not accepted"):
        to_rgb(Image.new("F", (2, 2)))


def test_accepted_formats_follow_the_configured_extensions():
    assert formats_for_extensions((".png", "JPG")) == ("JPEG", "MPO", "PNG")
    assert formats_for_extensions((".png", ".tif")) == ("PNG", "TIFF")
