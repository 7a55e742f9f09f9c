"""The embedded synthetic two-domain road-sign dataset: US roads (MUTCD) -> Indian roads (IRC:67).

Both domains share one label set but differ the way real roads do: sign conventions (yellow
diamonds and a rectangular speed plate against red-bordered triangles and a red-ring speed
circle), scenes, light, haze, wear, occlusion, blur, noise and compression. STOP and no-entry
look alike in both domains, so a source model transfers partly, never fully.

Every image gets its own generator, seeded from a sha256 of (seed, domain, split, class, file
name prefix, index): files are byte-identical across runs and processes, and any subset can be
generated alone or in parallel.

The unlabelled target pool (``target_unlabeled/``) is drawn like the target train images, from
generators of its own (split ``unlabeled``), so adding it changed no labelled file. Its files sit
in one folder under shuffled numbers: neither the name nor the order tells the class.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from roadshift.config import SynthSection

CLASSES: tuple[str, ...] = (
    "stop",
    "give_way",
    "no_entry",
    "speed_limit",
    "pedestrian_crossing",
    "school_zone",
    "signal_ahead",
    "no_left_turn",
)
DOMAINS: tuple[str, ...] = ("source", "target")
SPLITS: tuple[str, ...] = ("train", "val", "test")
UNLABELED_FOLDER = "target_unlabeled"
UNLABELED_STREAM = "unlabeled"  # the split key of the pool's generators: none of SPLITS
PRODUCTION_STREAM = "production"  # the split key of production batches' generators
# Lighting conditions a production batch can be drawn in. "day" is how every labelled and pool
# image is drawn; "night" is a visibly different one (dark, blue cast, headlight glow, sensor
# noise) to test shift monitoring. Only "night" draws extra random numbers, so "day" files stay
# byte-identical to those written before conditions existed.
CONDITIONS: tuple[str, ...] = ("day", "night")

Colour = tuple[int, int, int]
Point = tuple[float, float]
SignPainter = Callable[[ImageDraw.ImageDraw, int, np.random.Generator], None]

RED: Colour = (196, 22, 34)
WHITE: Colour = (244, 244, 240)
BLACK: Colour = (22, 22, 24)
MUTCD_YELLOW: Colour = (250, 196, 12)
FLUORESCENT_YELLOW_GREEN: Colour = (196, 232, 28)
AMBER: Colour = (250, 170, 20)
LAMP_GREEN: Colour = (30, 190, 90)

INTERNAL_MAX_SIDE = 256
"""Images are drawn at up to 3x their final side (at most this many pixels) and box-downsampled."""


# --- seeding -------------------------------------------------------------------------------------


def image_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator owned by one image; hashlib, not hash(), so it is stable across processes."""
    text = "roadshift-synth|" + "|".join(str(part) for part in (seed, *keys))
    entropy = int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")
    return np.random.default_rng(np.random.SeedSequence(entropy))


# --- geometry and glyph helpers ------------------------------------------------------------------


@lru_cache(maxsize=256)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _regular_polygon(centre: Point, radius: float, sides: int, rotation_deg: float) -> list[Point]:
    cx, cy = centre
    return [
        (
            cx + radius * math.cos(math.radians(rotation_deg + 360 * k / sides)),
            cy + radius * math.sin(math.radians(rotation_deg + 360 * k / sides)),
        )
        for k in range(sides)
    ]


def _scaled(points: Sequence[Point], about: Point, factor: float) -> list[Point]:
    ax, ay = about
    return [(ax + (x - ax) * factor, ay + (y - ay) * factor) for x, y in points]


def _centroid(points: Sequence[Point]) -> Point:
    return (sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points))


def _circle(draw: ImageDraw.ImageDraw, centre: Point, radius: float, fill: Colour) -> None:
    cx, cy = centre
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)


def _text(
    draw: ImageDraw.ImageDraw,
    centre: Point,
    text: str,
    max_width: float,
    max_height: float,
    fill: Colour,
) -> None:
    """Centred text scaled to fit a box; the default font's capitals are about 0.72 em tall."""
    width_at_100 = max(_font(100).getlength(text), 1.0)
    size = int(min(max_height / 0.72, max_width * 100 / width_at_100))
    draw.text(centre, text, font=_font(max(size, 4)), fill=fill, anchor="mm")


def _stick_figure(
    draw: ImageDraw.ImageDraw, centre: Point, height: float, fill: Colour, stride: float
) -> None:
    cx, cy = centre
    h = height
    line = max(int(h * 0.09), 2)
    _circle(draw, (cx + 0.04 * h, cy - 0.38 * h), 0.1 * h, fill)
    hip = (cx - 0.02 * h, cy + 0.08 * h)
    shoulder = (cx + 0.03 * h, cy - 0.22 * h)
    draw.line([(cx + 0.04 * h, cy - 0.28 * h), hip], fill=fill, width=line)
    draw.line([hip, (cx - 0.1 * h, cy + 0.26 * h), (cx - stride * h, cy + 0.47 * h)], fill, line)
    draw.line([hip, (cx + 0.12 * h, cy + 0.25 * h), (cx + stride * h, cy + 0.47 * h)], fill, line)
    draw.line([shoulder, (cx - 0.18 * h, cy - 0.02 * h)], fill=fill, width=line)
    draw.line([shoulder, (cx + 0.2 * h, cy - 0.04 * h)], fill=fill, width=line)


def _pedestrian(
    draw: ImageDraw.ImageDraw, centre: Point, height: float, with_zebra: bool, fill: Colour
) -> None:
    cx, cy = centre
    if with_zebra:
        stripe_w, stripe_h = height * 0.1, height * 0.07
        for k in range(-2, 3):
            x = cx + k * stripe_w * 1.9
            draw.rectangle(
                (
                    x - stripe_w / 2,
                    cy + 0.5 * height,
                    x + stripe_w / 2,
                    cy + 0.5 * height + stripe_h,
                ),
                fill=fill,
            )
        cy -= 0.06 * height
    _stick_figure(draw, (cx, cy), height, fill, stride=0.22)


def _children(draw: ImageDraw.ImageDraw, centre: Point, height: float, fill: Colour) -> None:
    cx, cy = centre
    _stick_figure(draw, (cx - 0.2 * height, cy), height, fill, stride=0.2)
    _stick_figure(draw, (cx + 0.24 * height, cy + 0.1 * height), height * 0.78, fill, stride=0.18)
    if height > 20:  # a satchel on the bigger child
        draw.rectangle(
            (cx - 0.42 * height, cy - 0.1 * height, cx - 0.3 * height, cy + 0.05 * height),
            fill=fill,
        )


def _traffic_light(draw: ImageDraw.ImageDraw, centre: Point, height: float) -> None:
    cx, cy = centre
    half_w = 0.18 * height
    draw.rounded_rectangle(
        (cx - half_w, cy - height / 2, cx + half_w, cy + height / 2),
        radius=half_w * 0.5,
        fill=BLACK,
    )
    for offset, lamp in ((-0.3, RED), (0.0, AMBER), (0.3, LAMP_GREEN)):
        _circle(draw, (cx, cy + offset * height), 0.12 * height, lamp)


def _left_turn_arrow(draw: ImageDraw.ImageDraw, centre: Point, size: float, fill: Colour) -> None:
    cx, cy = centre
    s = size
    width = max(int(0.14 * s), 2)
    draw.line(
        [
            (cx + 0.16 * s, cy + 0.42 * s),
            (cx + 0.16 * s, cy - 0.06 * s),
            (cx - 0.16 * s, cy - 0.06 * s),
        ],
        fill=fill,
        width=width,
        joint="curve",
    )
    draw.polygon(
        [
            (cx - 0.42 * s, cy - 0.06 * s),
            (cx - 0.14 * s, cy - 0.3 * s),
            (cx - 0.14 * s, cy + 0.18 * s),
        ],
        fill=fill,
    )


def _prohibition_slash(draw: ImageDraw.ImageDraw, centre: Point, radius: float, width: int) -> None:
    cx, cy = centre
    reach = radius * 0.7071
    draw.line([(cx - reach, cy - reach), (cx + reach, cy + reach)], fill=RED, width=width)


def _diamond(draw: ImageDraw.ImageDraw, p: int, face: Colour) -> Point:
    centre = (p / 2, p / 2)
    outer = _regular_polygon(centre, 0.49 * p, 4, 90)
    draw.polygon(outer, fill=BLACK)
    draw.polygon(_scaled(outer, centre, 0.94), fill=face)
    draw.polygon(_scaled(outer, centre, 0.89), fill=BLACK)
    draw.polygon(_scaled(outer, centre, 0.86), fill=face)
    return centre


def _bordered_triangle(draw: ImageDraw.ImageDraw, p: int, pointing_up: bool) -> Point:
    """Red-bordered white triangle; returns the centroid, where the glyph goes."""
    side = 0.98 * p
    height = side * math.sqrt(3) / 2
    top = (p - height) / 2
    if pointing_up:
        outer = [(p / 2, top), (p / 2 + side / 2, top + height), (p / 2 - side / 2, top + height)]
    else:
        outer = [(p / 2 - side / 2, top), (p / 2 + side / 2, top), (p / 2, top + height)]
    centre = _centroid(outer)
    draw.polygon(outer, fill=RED)
    draw.polygon(_scaled(outer, centre, 0.64), fill=WHITE)
    return centre


def _white_square(draw: ImageDraw.ImageDraw, p: int, width: float, height: float) -> None:
    x0, y0 = (p - width) / 2, (p - height) / 2
    box = (x0, y0, x0 + width, y0 + height)
    draw.rounded_rectangle(box, radius=0.05 * p, fill=BLACK)
    inset = max(0.015 * p, 1)
    draw.rounded_rectangle(
        (box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset),
        radius=0.045 * p,
        fill=WHITE,
    )


# --- source signs (US MUTCD) ---------------------------------------------------------------------


def _us_stop(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre = (p / 2, p / 2)
    _octagon_stop(draw, p, centre)


def _octagon_stop(draw: ImageDraw.ImageDraw, p: int, centre: Point) -> None:
    outer = _regular_polygon(centre, 0.5 * p, 8, 22.5)
    draw.polygon(outer, fill=WHITE)
    draw.polygon(_scaled(outer, centre, 0.92), fill=RED)
    _text(draw, centre, "STOP", max_width=0.72 * p, max_height=0.3 * p, fill=WHITE)


def _us_yield(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre = _bordered_triangle(draw, p, pointing_up=False)
    _text(draw, (p / 2, centre[1] - 0.04 * p), "YIELD", 0.38 * p, 0.1 * p, RED)


def _us_do_not_enter(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    _white_square(draw, p, 0.96 * p, 0.96 * p)
    centre = (p / 2, p / 2)
    _circle(draw, centre, 0.43 * p, RED)
    draw.rectangle((0.2 * p, 0.44 * p, 0.8 * p, 0.56 * p), fill=WHITE)
    _text(draw, (p / 2, 0.33 * p), "DO NOT", 0.44 * p, 0.09 * p, WHITE)
    _text(draw, (p / 2, 0.67 * p), "ENTER", 0.44 * p, 0.09 * p, WHITE)


def _us_speed_limit(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    _white_square(draw, p, 0.74 * p, 0.96 * p)
    limit = str(int(rng.choice([15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70])))
    _text(draw, (p / 2, 0.2 * p), "SPEED", 0.54 * p, 0.12 * p, BLACK)
    _text(draw, (p / 2, 0.37 * p), "LIMIT", 0.54 * p, 0.12 * p, BLACK)
    _text(draw, (p / 2, 0.68 * p), limit, 0.6 * p, 0.34 * p, BLACK)


def _us_pedestrian(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre = _diamond(draw, p, MUTCD_YELLOW)
    _pedestrian(draw, centre, 0.5 * p, with_zebra=False, fill=BLACK)


def _us_school(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    outline = [(0.5, 0.02), (0.95, 0.42), (0.95, 0.98), (0.05, 0.98), (0.05, 0.42)]
    outer = [(x * p, y * p) for x, y in outline]
    centre = (p / 2, 0.58 * p)
    draw.polygon(outer, fill=BLACK)
    draw.polygon(_scaled(outer, centre, 0.93), fill=FLUORESCENT_YELLOW_GREEN)
    _children(draw, (p / 2, 0.6 * p), 0.5 * p, BLACK)


def _us_signal_ahead(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre = _diamond(draw, p, MUTCD_YELLOW)
    _traffic_light(draw, centre, 0.54 * p)


def _us_no_left_turn(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    _white_square(draw, p, 0.96 * p, 0.96 * p)
    centre = (p / 2, p / 2)
    _left_turn_arrow(draw, centre, 0.62 * p, BLACK)
    ring = max(int(0.07 * p), 2)
    radius = 0.4 * p
    draw.ellipse(
        (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius),
        outline=RED,
        width=ring,
    )
    _prohibition_slash(draw, centre, radius, ring)


# --- target signs (Indian IRC:67) ----------------------------------------------------------------


def _in_stop(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    _octagon_stop(draw, p, (p / 2, p / 2))


def _in_give_way(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre = _bordered_triangle(draw, p, pointing_up=False)
    _text(draw, (p / 2, centre[1] - 0.1 * p), "GIVE", 0.3 * p, 0.09 * p, RED)
    _text(draw, (p / 2, centre[1] + 0.02 * p), "WAY", 0.3 * p, 0.09 * p, RED)


def _in_no_entry(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre = (p / 2, p / 2)
    _circle(draw, centre, 0.49 * p, WHITE)
    _circle(draw, centre, 0.46 * p, RED)
    draw.rectangle((0.18 * p, 0.43 * p, 0.82 * p, 0.57 * p), fill=WHITE)


def _red_ring(draw: ImageDraw.ImageDraw, p: int) -> tuple[Point, float]:
    centre = (p / 2, p / 2)
    _circle(draw, centre, 0.49 * p, RED)
    _circle(draw, centre, 0.38 * p, WHITE)
    return centre, 0.38 * p


def _in_speed_limit(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre, inner = _red_ring(draw, p)
    limit = str(int(rng.choice([20, 25, 30, 40, 50, 60, 70, 80])))
    _text(draw, centre, limit, 1.4 * inner, 0.8 * inner, BLACK)


def _in_pedestrian(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre = _bordered_triangle(draw, p, pointing_up=True)
    _pedestrian(draw, (centre[0], centre[1] + 0.02 * p), 0.3 * p, with_zebra=True, fill=BLACK)


def _in_school(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre = _bordered_triangle(draw, p, pointing_up=True)
    _children(draw, (centre[0], centre[1] + 0.03 * p), 0.3 * p, BLACK)


def _in_signal_ahead(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre = _bordered_triangle(draw, p, pointing_up=True)
    _traffic_light(draw, (centre[0], centre[1] + 0.03 * p), 0.32 * p)


def _in_no_left_turn(draw: ImageDraw.ImageDraw, p: int, rng: np.random.Generator) -> None:
    centre, inner = _red_ring(draw, p)
    _left_turn_arrow(draw, centre, 1.25 * inner, BLACK)
    _prohibition_slash(draw, centre, inner * 1.05, max(int(0.08 * p), 2))


SIGN_PAINTERS: dict[str, dict[str, SignPainter]] = {
    "source": {
        "stop": _us_stop,
        "give_way": _us_yield,
        "no_entry": _us_do_not_enter,
        "speed_limit": _us_speed_limit,
        "pedestrian_crossing": _us_pedestrian,
        "school_zone": _us_school,
        "signal_ahead": _us_signal_ahead,
        "no_left_turn": _us_no_left_turn,
    },
    "target": {
        "stop": _in_stop,
        "give_way": _in_give_way,
        "no_entry": _in_no_entry,
        "speed_limit": _in_speed_limit,
        "pedestrian_crossing": _in_pedestrian,
        "school_zone": _in_school,
        "signal_ahead": _in_signal_ahead,
        "no_left_turn": _in_no_left_turn,
    },
}


# --- scenes --------------------------------------------------------------------------------------


def _uniform_colour(rng: np.random.Generator, low: Colour, high: Colour) -> np.ndarray:
    return rng.uniform(np.array(low, float), np.array(high, float))


def _smooth_field(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), mode="L")
    return np.asarray(coarse.resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255


SCENE_PALETTES: dict[str, dict[str, tuple[Colour, Colour]]] = {
    "source": {
        "sky_top": ((60, 115, 190), (110, 165, 235)),
        "sky_horizon": ((150, 185, 220), (200, 220, 245)),
        "ground": ((85, 88, 95), (130, 132, 140)),
        "verge": ((55, 110, 40), (100, 160, 75)),
        "clutter": ((40, 60, 40), (170, 175, 185)),
    },
    "target": {
        "sky_top": ((140, 160, 180), (225, 215, 190)),
        "sky_horizon": ((200, 185, 160), (240, 225, 200)),
        "ground": ((120, 100, 75), (185, 160, 125)),
        "verge": ((110, 100, 55), (170, 145, 90)),
        "clutter": ((60, 40, 30), (240, 200, 170)),
    },
}


VIVID_CLUTTER: tuple[Colour, ...] = (
    (190, 30, 35),
    (235, 235, 230),
    (240, 190, 30),
    (30, 80, 170),
    (230, 110, 30),
    (25, 25, 28),
)


def _scene(domain: str, rng: np.random.Generator, side: int) -> Image.Image:
    palette = SCENE_PALETTES[domain]
    horizon = int(side * rng.uniform(0.3, 0.65))
    rows = np.arange(side, dtype=np.float32)[:, None] / max(horizon, 1)
    sky_top, sky_horizon = (_uniform_colour(rng, *palette[k]) for k in ("sky_top", "sky_horizon"))
    sky = sky_top + (sky_horizon - sky_top) * np.clip(rows, 0, 1)[..., None]
    canvas = np.broadcast_to(sky, (side, side, 3)).astype(np.float32)
    canvas[horizon:] = _uniform_colour(rng, *palette["ground"])
    verge_top = horizon + int(rng.uniform(0.0, 0.15) * side)
    verge_bottom = verge_top + int(rng.uniform(0.05, 0.25) * side)
    canvas[verge_top:verge_bottom] = _uniform_colour(rng, *palette["verge"])
    texture = _smooth_field(rng, side, 8) - 0.5
    canvas += texture[..., None] * (30 if domain == "source" else 55)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="RGB")
    _clutter(ImageDraw.Draw(image), domain, rng, side, horizon)
    return image


def _clutter(
    draw: ImageDraw.ImageDraw, domain: str, rng: np.random.Generator, side: int, horizon: int
) -> None:
    """Buildings, trees, vehicles and shop boards along the horizon; Indian streets are busier."""
    low, high = SCENE_PALETTES[domain]["clutter"]
    count = int(rng.integers(1, 5) if domain == "source" else rng.integers(3, 8))
    vivid_chance = 0.2 if domain == "source" else 0.35
    for _ in range(count):
        if rng.random() < vivid_chance:  # red cars, white vans, painted shop boards
            colour = VIVID_CLUTTER[int(rng.integers(len(VIVID_CLUTTER)))]
        else:
            colour = tuple(int(c) for c in _uniform_colour(rng, low, high))
        width, height = rng.uniform(0.1, 0.45) * side, rng.uniform(0.1, 0.4) * side
        x0 = rng.uniform(-0.2, 1.0) * side
        y1 = horizon + rng.uniform(0.0, 0.12) * side
        box = (x0, y1 - height, x0 + width, y1)
        if rng.random() < 0.4:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)


def _pole(
    draw: ImageDraw.ImageDraw,
    domain: str,
    rng: np.random.Generator,
    x: float,
    y: float,
    side: int,
    sign: int,
) -> None:
    half = max(0.035 * sign, 1.5)
    if domain == "target" and rng.random() < 0.5:  # black-and-white banded poles
        band = max(0.09 * side, 2)
        top = y
        k = 0
        while top < side:
            draw.rectangle((x - half, top, x + half, top + band), fill=BLACK if k % 2 else WHITE)
            top += band
            k += 1
        return
    shade = int(rng.uniform(110, 170))
    draw.rectangle((x - half, y, x + half, side), fill=(shade, shade, shade + 5))


# --- sign placement, wear and camera -------------------------------------------------------------


def _perspective_coefficients(destination: Sequence[Point], source: Sequence[Point]) -> list[float]:
    """PIL's 8 PERSPECTIVE coefficients mapping output (destination) pixels back to the source."""
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(destination, source, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return [float(c) for c in np.linalg.solve(np.array(rows, float), np.array(rhs, float))]


def _worn_sign(domain: str, sign: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Sun-bleaching towards a dusty white and blotchy grime; Indian signs are more weathered."""
    array = np.asarray(sign, np.float32).copy()
    rgb = array[..., :3]
    side = sign.width
    if domain == "source":
        fade, grime = rng.uniform(0.0, 0.1), rng.uniform(0.0, 0.08)
    else:
        fade, grime = rng.uniform(0.05, 0.4), rng.uniform(0.1, 0.3)
    bleach = np.array((232, 222, 200), np.float32)
    rgb += (bleach - rgb) * fade
    rgb *= 1 - grime * _smooth_field(rng, side, 5)[..., None]
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="RGBA")


def _place_sign(
    domain: str, scene: Image.Image, sign: Image.Image, rng: np.random.Generator
) -> tuple[float, float]:
    """Rotate, tilt and paste the sign onto the scene (with its pole); returns its centre."""
    side, size = scene.width, sign.width
    cx = rng.uniform(0.5 * size, side - 0.5 * size) if size < side else side / 2
    cy = rng.uniform(0.5 * size, side - 0.5 * size) if size < side else side / 2
    if rng.random() < 0.7:
        _pole(ImageDraw.Draw(scene), domain, rng, cx, cy, side, size)
    angle = math.radians(rng.uniform(-10, 10))
    corners = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    destination = []
    for x, y in corners:
        jx, jy = rng.uniform(-0.07, 0.07, size=2)
        rx = (x + jx) * math.cos(angle) - (y + jy) * math.sin(angle)
        ry = (x + jx) * math.sin(angle) + (y + jy) * math.cos(angle)
        destination.append((cx + rx * size, cy + ry * size))
    source = [((x + 0.5) * size, (y + 0.5) * size) for x, y in corners]
    warped = sign.transform(
        scene.size,
        Image.Transform.PERSPECTIVE,
        _perspective_coefficients(destination, source),
        Image.Resampling.BILINEAR,
    )
    scene.paste(warped, (0, 0), warped)
    return cx, cy


def _occlude(
    domain: str,
    scene: Image.Image,
    centre: tuple[float, float],
    size: int,
    rng: np.random.Generator,
) -> None:
    """Branches, wires, other vehicles: a blob that covers part of the sign."""
    chance, reach = (0.12, 0.2) if domain == "source" else (0.4, 0.3)
    if rng.random() >= chance:
        return
    low, high = SCENE_PALETTES[domain]["clutter"]
    colour = tuple(int(c) for c in _uniform_colour(rng, low, high))
    angle = rng.uniform(0, 2 * math.pi)
    distance = rng.uniform(0.45, 0.75) * size
    bx = centre[0] + math.cos(angle) * distance
    by = centre[1] + math.sin(angle) * distance
    radius = rng.uniform(0.25, reach + 0.15) * size
    ImageDraw.Draw(scene).ellipse((bx - radius, by - radius, bx + radius, by + radius), fill=colour)


def _shadow(rng: np.random.Generator, side: int) -> np.ndarray:
    """A hard-edged cast shadow over one side of a random line (buildings, trees, flyovers)."""
    angle = rng.uniform(0, 2 * math.pi)
    offset = rng.uniform(-0.3, 0.3) * side
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) - side / 2
    shaded = xs * math.cos(angle) + ys * math.sin(angle) > offset
    return np.where(shaded, np.float32(rng.uniform(0.55, 0.8)), np.float32(1.0))


def _motion_blur(array: np.ndarray, rng: np.random.Generator, length: int) -> np.ndarray:
    if length < 2:
        return array
    angle = rng.uniform(0, math.pi)
    dx, dy = math.cos(angle), math.sin(angle)
    pad = length
    padded = np.pad(array, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = array.shape[:2]
    total = np.zeros_like(array)
    for step in range(length):
        t = step - (length - 1) / 2
        ox, oy = round(t * dx), round(t * dy)
        total += padded[pad + oy : pad + oy + h, pad + ox : pad + ox + w]
    return total / length


def _camera(domain: str, scene: Image.Image, rng: np.random.Generator, scale: int) -> np.ndarray:
    """Light, haze and blur at the drawing resolution; float HxWx3 out."""
    array = np.asarray(scene, np.float32)
    side = scene.width
    if domain == "source":
        tint = np.array((0.95, 1.0, 1.06)) * rng.uniform(0.97, 1.03, size=3)
        gain = rng.uniform(0.8, 1.2)
        haze, blur_chance, blur_reach = rng.uniform(0.0, 0.15), 0.2, 2.0
    else:
        tint = np.array((1.04, 1.0, 0.93)) * rng.uniform(0.95, 1.05, size=3)
        gain = rng.uniform(0.75, 1.2)
        haze, blur_chance, blur_reach = rng.uniform(0.05, 0.3), 0.5, 3.0
    dust = np.array((205, 185, 150), np.float32)
    haze_rows = haze * (1.2 - 0.4 * np.arange(side, dtype=np.float32) / side)
    array = array + (dust - array) * haze_rows[:, None, None]
    lighting = 1 + rng.uniform(-0.2, 0.2) * (np.linspace(-1, 1, side, dtype=np.float32))
    if rng.random() < 0.5:
        array = array * lighting[None, :, None]
    else:
        array = array * lighting[:, None, None]
    array = array * (gain * tint).astype(np.float32)
    if rng.random() < 0.35:
        array = array * _shadow(rng, side)[..., None]
    if rng.random() < blur_chance:
        array = _motion_blur(array, rng, int(rng.uniform(1, blur_reach) * scale))
    return array


def _sensor(domain: str, array: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """Downsample, add sensor noise and, for the cheaper dash cameras, JPEG artefacts."""
    small = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="RGB")
    small = small.resize((size, size), Image.Resampling.BOX)
    sigma = rng.uniform(1, 6) if domain == "source" else rng.uniform(4, 11)
    noisy = np.asarray(small, np.float32) + rng.normal(0, sigma, size=(size, size, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")
    if domain == "target":
        return _jpeg_round_trip(image, int(rng.integers(18, 55)))
    if rng.random() < 0.3:
        return _jpeg_round_trip(image, int(rng.integers(75, 95)))
    return image


def _jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _drawing_scale(size: int) -> int:
    return max(1, min(3, INTERNAL_MAX_SIDE // size))


def render_sign_image(
    domain: str, class_name: str, rng: np.random.Generator, size: int, condition: str = "day"
) -> Image.Image:
    """One RGB ``size`` x ``size`` photo-like image of ``class_name`` as seen in ``domain``,
    in a lighting ``condition`` (``CONDITIONS``)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    if domain not in SIGN_PAINTERS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if class_name not in SIGN_PAINTERS[domain]:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
    scale = _drawing_scale(size)
    side = size * scale
    scene = _scene(domain, rng, side)
    sign_size = max(int(side * rng.uniform(0.32, 0.85)), 8)
    sign = Image.new("RGBA", (sign_size, sign_size), (0, 0, 0, 0))
    SIGN_PAINTERS[domain][class_name](ImageDraw.Draw(sign), sign_size, rng)
    centre = _place_sign(domain, scene, _worn_sign(domain, sign, rng), rng)
    _occlude(domain, scene, centre, sign_size, rng)
    array = _camera(domain, scene, rng, scale)
    if condition == "night":
        array = _night(array, rng)
    return _sensor(domain, array, size, rng)


def _night(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark, blue-cast, a headlight glow from below and heavy sensor noise."""
    side = array.shape[0]
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float32) / side
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.8, 1.1)
    glow = np.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / rng.uniform(0.05, 0.15))
    light = rng.uniform(0.12, 0.25) + 0.6 * glow
    cast = np.array((0.65, 0.8, 1.2), np.float32)
    dark = array * light[..., None] * cast
    return dark + rng.normal(0, 14, size=array.shape).astype(np.float32)


# --- writing datasets ----------------------------------------------------------------------------


def _png_bytes(image: Image.Image) -> bytes:
    """Fixed encoder options and no metadata chunks, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _remove_stale_numbered_files(class_dir: Path, prefix: str, keep: int) -> None:
    """Files written earlier with this prefix and an index beyond the count now wanted."""
    pattern = re.compile(re.escape(prefix) + r"(\d{5})\.png")
    for path in class_dir.glob(f"{prefix}*.png"):
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= keep:
            path.unlink()


def synthesize_domain(
    domain: str,
    out_dir: Path,
    per_split_per_class: dict[str, int],
    image_size: int,
    seed: int,
    prefix: str = "",
) -> int:
    """Write ``out_dir/<split>/<class>/<prefix><index:05d>.png``; returns how many were written."""
    written = 0
    for split, count in per_split_per_class.items():
        for class_name in CLASSES:
            class_dir = Path(out_dir) / split / class_name
            class_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_numbered_files(class_dir, prefix, count)
            for index in range(count):
                rng = image_rng(seed, domain, split, class_name, prefix, index)
                image = render_sign_image(domain, class_name, rng, image_size)
                _write_atomically(class_dir / f"{prefix}{index:05d}.png", _png_bytes(image))
                written += 1
    return written


def source_split_counts(per_class: int) -> dict[str, int]:
    """70/15/15 in whole images, at least one per split."""
    if per_class < 3:
        raise ValueError(f"need at least 3 source images per class to split, got {per_class}")
    held_out = max(1, per_class * 15 // 100)
    return {"train": per_class - 2 * held_out, "val": held_out, "test": held_out}


def _pool_draws(per_class: int, seed: int) -> list[tuple[str, int]]:
    """(class, index) of each pool file in file-number order: a seeded shuffle."""
    drawn = [(class_name, index) for class_name in CLASSES for index in range(per_class)]
    order = image_rng(seed, "target", UNLABELED_STREAM, "order").permutation(len(drawn))
    return [drawn[position] for position in order]


def synthesize_unlabeled_pool(out_dir: Path, per_class: int, image_size: int, seed: int) -> int:
    """Write ``per_class`` unlabelled target images of every class to ``out_dir/<n:05d>.png``.

    File ``n`` is the class and index at position ``n`` of a seeded shuffle, so the pool holds
    a known number of each class that only the seed reveals. Returns how many were written;
    ``per_class`` 0 leaves an empty folder (a pool of none, which DVC still versions).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draws = _pool_draws(per_class, seed)
    _remove_stale_numbered_files(out_dir, "", len(draws))
    for number, (class_name, index) in enumerate(draws):
        rng = image_rng(seed, "target", UNLABELED_STREAM, class_name, "", index)
        image = render_sign_image("target", class_name, rng, image_size)
        _write_atomically(out_dir / f"{number:05d}.png", _png_bytes(image))
    return len(draws)


def unlabeled_pool_classes(per_class: int, seed: int) -> list[str]:
    """The class of each pool file ``<n:05d>.png`` in ``n`` order: the synthetic pool's answer
    key, to measure pseudo-labels against in tests and benchmarks (never a training input)."""
    return [class_name for class_name, _ in _pool_draws(per_class, seed)]


def synthesize_dataset(
    raw_dir: Path, cfg: SynthSection, seed: int, unlabeled_dir: Path | None = None
) -> dict[str, int]:
    """Source, target and the unlabelled target pool (``unlabeled_dir``, by default
    ``raw_dir/target_unlabeled``) under ``raw_dir``; image counts per folder."""
    raw_dir = Path(raw_dir)
    target_counts = {
        "train": cfg.target_train_per_class,
        "val": cfg.target_val_per_class,
        "test": cfg.target_test_per_class,
    }
    return {
        "source": synthesize_domain(
            "source",
            raw_dir / "source",
            source_split_counts(cfg.source_per_class),
            cfg.image_size,
            seed,
        ),
        "target": synthesize_domain(
            "target", raw_dir / "target", target_counts, cfg.image_size, seed
        ),
        UNLABELED_FOLDER: synthesize_unlabeled_pool(
            unlabeled_dir or raw_dir / UNLABELED_FOLDER,
            cfg.target_unlabeled_per_class,
            cfg.image_size,
            seed,
        ),
    }


def add_target_batch(
    target_dir: Path, per_class: int, image_size: int, seed: int, batch_id: str
) -> int:
    """New labelled target train images, as new labels arrive; earlier files are never touched."""
    if not re.fullmatch(r"[A-Za-z0-9_.]+", batch_id):
        raise ValueError(f"batch_id {batch_id!r} must be letters, digits, '_' or '.'")
    prefix = f"{batch_id}-"
    existing = sorted(Path(target_dir).glob(f"train/*/{prefix}*.png"))
    if existing:
        raise FileExistsError(
            f"target batch {batch_id!r} already exists ({existing[0]}); choose a new batch id"
        )
    return synthesize_domain(
        "target", Path(target_dir), {"train": per_class}, image_size, seed, prefix
    )


def synthesize_production_batch(
    out_dir: Path, per_class: int, image_size: int, seed: int, condition: str, batch_id: str
) -> list[str]:
    """A folder of unlabelled target photos as production would send them: ``per_class`` of
    every class in ``condition`` light, flat files ``<batch_id>-<n:05d>.png`` in a seeded
    shuffle. Returns each file's class in file order: the answer key, never an input."""
    if not re.fullmatch(r"[A-Za-z0-9_.]+", batch_id):
        raise ValueError(f"batch_id {batch_id!r} must be letters, digits, '_' or '.'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = [(class_name, index) for class_name in CLASSES for index in range(per_class)]
    order = image_rng(seed, "target", PRODUCTION_STREAM, batch_id, condition).permutation(
        len(drawn)
    )
    classes = []
    for number, position in enumerate(order):
        class_name, index = drawn[position]
        rng = image_rng(seed, "target", PRODUCTION_STREAM, class_name, batch_id, condition, index)
        image = render_sign_image("target", class_name, rng, image_size, condition)
        _write_atomically(out_dir / f"{batch_id}-{number:05d}.png", _png_bytes(image))
        classes.append(class_name)
    return classes


# --- contact sheet -------------------------------------------------------------------------------


def write_contact_sheet(domain_dirs: dict[str, Path], out_path: Path, per_class: int = 6) -> Path:
    """The sheet the pipeline logs, drawn from the synthesised folders before any manifest."""
    import pandas as pd

    from roadshift.data.contact_sheet import draw_contact_sheet

    frames = {}
    for domain, domain_dir in domain_dirs.items():
        paths = sorted(Path(domain_dir).resolve().glob("*/*/*.png"))
        frames[domain] = pd.DataFrame(
            {"path": [str(p) for p in paths], "label": [p.parent.name for p in paths]}
        )
    return draw_contact_sheet(frames, Path("/"), Path(out_path), per_class)
