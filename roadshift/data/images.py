"""Which decoded images roadshift accepts, and the one rule that turns each into 8-bit RGB.

The manifest's integrity pass rejects every mode not listed here, the validate stage's
Great Expectations suite checks the same set, and the training loader (``load_rgb``) and the
registered pyfunc model both call ``to_rgb``: one rule for training and serving.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B"})

MODE_RULES: dict[str, str] = {
    "RGB": "kept as is",
    "L": "grey value copied to R, G and B",
    "1": "black and white to 0 and 255 in R, G and B",
    "P": "palette colours looked up; palette transparency ignored",
    "PA": "palette colours looked up; alpha dropped",
    "RGBA": "alpha dropped: each pixel keeps its stored colour, however transparent",
    "LA": "alpha dropped; grey value copied to R, G and B",
    "CMYK": "Pillow's profile-free rule: R = 255 - min(255, C + K), G from M, B from Y",
    "I;16": "16-bit grey scaled to 8 bits by keeping the high byte (value >> 8)",
    "I;16L": "16-bit grey scaled to 8 bits by keeping the high byte (value >> 8)",
    "I;16B": "16-bit grey scaled to 8 bits by keeping the high byte (value >> 8)",
}
ACCEPTED_MODES: tuple[str, ...] = tuple(MODE_RULES)

REJECTED_MODE_REASONS: dict[str, str] = {
    "I": "32-bit integer pixels have no defined 8-bit range",
    "F": "32-bit float pixels have no defined 8-bit range",
}


def rejected_mode_reason(mode: str) -> str | None:
    """Why an image of this mode is refused, or None if ``to_rgb`` handles it."""
    if mode in MODE_RULES:
        return None
    why = REJECTED_MODE_REASONS.get(mode, "not a colour mode roadshift converts")
    return f"pixel mode {mode} is not accepted ({why}); re-export it as 8-bit RGB PNG or JPEG"


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the documented rule for ``image.mode`` (MODE_RULES); ValueError for other modes."""
    reason = rejected_mode_reason(image.mode)
    if reason:
        raise ValueError(reason)
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> RGB conversion clips at 255, turning most pixels white.
        high_bytes = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high_bytes).convert("RGB")
    return image.convert("RGB")


def formats_for_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Pillow format names (JPEG, PNG, ...) that files with these extensions should hold."""
    registered = Image.registered_extensions()
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    formats = {registered[e] for e in wanted if e in registered}
    if "JPEG" in formats:
        formats.add("MPO")  # camera JPEGs with an embedded preview; Pillow names them MPO
    return tuple(sorted(formats))
