"""A contact sheet of whatever data is configured (embedded or your own), from the manifests.

Reading samples from the prepared manifest rather than globbing folders makes it
work for every layout and file type the prepare stage accepts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from roadshift.data.decoded import load_rgb, manifest_limits

CELL, GAP, LABEL_WIDTH, HEADER = 72, 4, 170, 26
TEXT = (22, 22, 24)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def sample_paths(manifest: pd.DataFrame, per_class: int) -> dict[str, list[str]]:
    """Up to ``per_class`` paths per label, spread evenly over the sorted manifest."""
    samples = {}
    for label, group in manifest.sort_values("path").groupby("label", sort=True):
        paths = list(group["path"])
        step = max(1, len(paths) / per_class)
        samples[str(label)] = [paths[int(k * step)] for k in range(min(per_class, len(paths)))]
    return samples


def draw_contact_sheet(
    manifests: dict[str, pd.DataFrame], root: Path, out_path: Path, per_class: int = 6
) -> Path:
    """Per domain a header, then one labelled row of thumbnails per class."""
    samples = {domain: sample_paths(frame, per_class) for domain, frame in manifests.items()}
    rows = sum(len(by_class) for by_class in samples.values())
    width = LABEL_WIDTH + per_class * (CELL + GAP) + GAP
    height = len(samples) * HEADER + rows * (CELL + GAP) + GAP
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = GAP
    for domain, by_class in samples.items():
        draw.text(
            (GAP, y + 4), f"{domain}  ({len(manifests[domain])} images)", font=_font(16), fill=TEXT
        )
        y += HEADER
        limits = manifest_limits(manifests[domain])
        for label, paths in by_class.items():
            draw.text((GAP, y + CELL // 2), label[:22], font=_font(14), fill=TEXT, anchor="lm")
            for k, relative in enumerate(paths):
                pixels = Image.fromarray(load_rgb(root / relative, limits))
                thumb = pixels.resize((CELL, CELL), Image.Resampling.BILINEAR)
                sheet.paste(thumb, (LABEL_WIDTH + k * (CELL + GAP), y))
            y += CELL + GAP
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.png")
    sheet.save(tmp, format="PNG", optimize=True)
    tmp.replace(out_path)
    return out_path


def draw_numbered_sheet(
    items: list[tuple[Path, str]], out_path: Path, columns: int = 8, cell: int = 96
) -> Path:
    """Every image with its caption under it (``#3 give_way 0.41``), in the given order: the
    sheet a person sorts a labelling batch from."""
    caption_height = 30
    rows = max(1, -(-len(items) // columns))
    width = columns * (cell + GAP) + GAP
    height = rows * (cell + caption_height + GAP) + GAP
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (path, caption) in enumerate(items):
        x = GAP + (k % columns) * (cell + GAP)
        y = GAP + (k // columns) * (cell + caption_height + GAP)
        with Image.open(path) as image:
            thumb = image.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)
        sheet.paste(thumb, (x, y))
        for line, text in enumerate(caption.split("\n")[:2]):
            draw.text((x, y + cell + 2 + 14 * line), text[:16], font=_font(12), fill=TEXT)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp.png")
    sheet.save(tmp, format="PNG", optimize=True)
    tmp.replace(out_path)
    return out_path
