"""Which images roadshift accepts, the one guarded decode every reader goes through, and the
one rule that turns each image into 8-bit RGB.

Every decode (prepare's integrity pass, ``data validate``, ``data add``, ``predict``, the
training loader, the served model) goes through ``decode_image_file`` or
``decode_image_bytes``, which refuse, before a pixel is decoded, anything that is not a
regular file (a FIFO, a device, a link to ``/dev/zero``: checked with ``stat``, never opened
blocking), more bytes than ``max_file_bytes``, and a header declaring more than
``max_pixels`` or sides outside the allowed range. Pillow's own ``Image.MAX_IMAGE_PIXELS``
is left at its default as a second, looser line: the limits here are stricter.

Images with a side over ``REDUCED_SIDE`` are decoded reduced: JPEG at a smaller DCT scale
through ``Image.draft``, then each side to at most ``REDUCED_SIDE`` px (``Image.resize`` with
a box filter and ``reducing_gap``, which runs ``Image.reduce`` first). Every model input is
square and at most 1024 px (``base.image_size``), and the model resizes each side on its own,
so no detail the model could use is lost. So one image holds at most ``max_pixels`` (times
its bytes per pixel) while it decodes and ``REDUCED_SIDE``**2 RGB pixels (3 MB) once
decoded, and training and serving, which share this function, see the same pixels.

The manifest's integrity pass rejects every mode not listed here, the validate stage's
Great Expectations suite checks the same set, and the training loader (``load_rgb``) and the
registered pyfunc model both call ``to_rgb``: one rule for training and serving.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL import ImageFile as PilImageFile

from roadshift.config import (
    DEFAULT_MAX_IMAGE_FILE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLimitsSection,
    Params,
)
from roadshift.errors import RoadshiftError

REDUCED_SIDE = 1024
"""No side of a decoded image is longer (see the module doc); >= the largest model input."""

# Pillow warns on opening an image over Image.MAX_IMAGE_PIXELS (89 MP); the limits here are
# stricter and refuse such an image by name, so the warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

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


# --- the guarded decode ------------------------------------------------------------------------


class ImageRefusedError(RoadshiftError, ValueError):
    """An image that is refused before or while decoding; ``name`` is its path or its row."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be before it is decoded. ``min_side``/``max_side`` are checked on
    the declared size (predict and the served model apply ``validate``'s sides; prepare
    leaves them to the validate stage, which reports them with the data's other checks);
    ``accepted_formats`` (None: any) are the Pillow formats of ``prepare.extensions``."""

    max_file_bytes: int = DEFAULT_MAX_IMAGE_FILE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    min_side: int = 1
    max_side: int | None = None
    accepted_formats: frozenset[str] | None = None

    @classmethod
    def for_files(cls, section: ImageLimitsSection, extensions: Iterable[str]) -> ImageLimits:
        """prepare, ``data validate``, ``data add``: bytes, pixels and format."""
        formats = frozenset(formats_for_extensions(extensions))
        return cls(section.max_file_bytes, section.max_pixels, accepted_formats=formats)

    @classmethod
    def for_prediction(cls, params: Params) -> ImageLimits:
        """predict and the served model: training's rules, sides included, so a 1x1 image or
        GIF data named .png gets an error rather than a confident answer."""
        files = cls.for_files(params.prepare.image_limits, params.prepare.extensions)
        return cls(
            files.max_file_bytes,
            files.max_pixels,
            params.validate.min_image_side,
            params.validate.max_image_side,
            files.accepted_formats,
        )


@dataclass(frozen=True)
class DecodedImage:
    """An image that passed: its RGB pixels (reduced when large) and what its header said."""

    rgb: np.ndarray
    width: int
    height: int
    mode: str
    format: str


@dataclass(frozen=True)
class ImageFileFacts:
    """A decoded file: the image, and the hash and size of the bytes it came from."""

    image: DecodedImage
    sha256: str
    bytes: int


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` describes, in words (``a FIFO (named pipe)``), for messages."""
    for test, words in _FILE_KINDS:
        if test(mode):
            return words
    return "not a regular file"


def _refuse_non_regular(path: Path) -> None:
    """Refuse FIFOs, devices, sockets and links to them by ``stat`` alone: never opened, so
    a FIFO cannot block and ``/dev/zero`` cannot be read."""
    name = str(path)
    try:
        link = os.lstat(path)
        target = os.stat(path) if stat.S_ISLNK(link.st_mode) else link
    except FileNotFoundError:
        raise ImageRefusedError(name, "no such file (or a link to a missing file)") from None
    except OSError as error:
        raise ImageRefusedError(name, f"cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(target.st_mode):
        via = f"a link to {os.path.realpath(path)}, which is " if stat.S_ISLNK(link.st_mode) else ""
        raise ImageRefusedError(
            name, f"{via}{file_kind(target.st_mode)}, not a regular image file; remove it"
        )


def read_image_bytes(path: Path, limits: ImageLimits) -> bytes:
    """The file's bytes, if it is a regular file of at most ``limits.max_file_bytes``.

    Opened non-blocking and checked again on the open descriptor, so a file swapped for a
    FIFO after the first check cannot block either; at most one byte over the limit is read.
    """
    path = Path(path)
    _refuse_non_regular(path)
    name = str(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise ImageRefusedError(name, f"cannot be read ({error.strerror or error})") from None
    with os.fdopen(descriptor, "rb") as handle:
        opened = os.fstat(handle.fileno())
        if not stat.S_ISREG(opened.st_mode):
            raise ImageRefusedError(name, f"{file_kind(opened.st_mode)}, not a regular file")
        if opened.st_size > limits.max_file_bytes:
            raise ImageRefusedError(name, _too_many_bytes(opened.st_size, limits))
        try:
            data = handle.read(limits.max_file_bytes + 1)
        except OSError as error:
            raise ImageRefusedError(name, f"cannot be read ({error.strerror or error})") from None
    if len(data) > limits.max_file_bytes:
        raise ImageRefusedError(name, _too_many_bytes(len(data), limits))
    return data


def _too_many_bytes(size: int, limits: ImageLimits) -> str:
    return (
        f"{size} bytes, more than prepare.image_limits.max_file_bytes = "
        f"{limits.max_file_bytes}; shrink or re-export the image, or raise the limit"
    )


def _declared_size_problem(width: int, height: int, limits: ImageLimits) -> str | None:
    if width * height > limits.max_pixels:
        return (
            f"declares {width}x{height} = {width * height} pixels, more than "
            f"prepare.image_limits.max_pixels = {limits.max_pixels} (a decompression bomb, or "
            "a photo to downscale before use); refused without decoding it"
        )
    side = f"sides must be at least {limits.min_side} px"
    if limits.max_side is not None:
        side = f"sides must be {limits.min_side} to {limits.max_side} px"
    if min(width, height) < limits.min_side or (
        limits.max_side is not None and max(width, height) > limits.max_side
    ):
        return (
            f"{width}x{height} px; {side} (validate.min_image_side / validate.max_image_side), "
            "as for training images"
        )
    return None


def _format_problem(name: str, fmt: str, accepted: frozenset[str] | None) -> str | None:
    if accepted is None or fmt in accepted:
        return None
    suffix = Path(name).suffix
    where = f" (extension {suffix})" if suffix else ""
    return (
        f"holds {fmt or 'unknown'} data{where}, not one of the accepted "
        f"formats {', '.join(sorted(accepted))} (prepare.extensions); "
        "convert it to PNG or JPEG"
    )


def _reduced_size(width: int, height: int) -> tuple[int, int]:
    return min(width, REDUCED_SIDE), min(height, REDUCED_SIDE)


def _reduced_draft(image: Image.Image) -> None:
    """JPEG: decode at the smallest DCT scale that keeps each side >= its reduced size."""
    wanted = _reduced_size(*image.size)
    if wanted != image.size:
        image.draft(image.mode, wanted)  # a no-op for formats other than JPEG


def _reduced(image: Image.Image) -> Image.Image:
    """Each side to at most REDUCED_SIDE (box filter, whole-factor ``reduce`` first)."""
    wanted = _reduced_size(*image.size)
    if wanted == image.size:
        return image
    return image.resize(wanted, Image.Resampling.BOX, reducing_gap=2.0)


def decode_image_bytes(data: bytes, name: str, limits: ImageLimits) -> DecodedImage:
    """The guarded decode (module doc): every check that needs no pixels first, then the
    decode (reduced when large) and the ``to_rgb`` rule. ``ImageRefusedError`` names ``name``."""
    if PilImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncation would pass")
    if not data:
        raise ImageRefusedError(name, "empty file (0 bytes)")
    if len(data) > limits.max_file_bytes:
        raise ImageRefusedError(name, _too_many_bytes(len(data), limits))
    try:
        with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
            width, height = image.size
            refused = (
                _declared_size_problem(width, height, limits)
                or rejected_mode_reason(image.mode)
                or _format_problem(name, image.format or "", limits.accepted_formats)
            )
            if refused:
                raise ImageRefusedError(name, refused)
            _reduced_draft(image)
            image.load()
            mode, fmt = image.mode, image.format or ""
            rgb = _reduced(to_rgb(image))
    except UnidentifiedImageError:
        what = (  # a file has a name that may be wrong; request bytes have none
            "not an image Pillow can read (wrong extension or not an image)"
            if Path(name).suffix
            else "bytes are not an image Pillow can decode"
        )
        raise ImageRefusedError(name, what) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRefusedError(name, f"refused as a decompression bomb ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageRefusedError):
            raise
        raise ImageRefusedError(name, f"truncated or damaged image data ({error})") from None
    return DecodedImage(np.asarray(rgb), width, height, mode, fmt)


def decode_image_file(path: Path, limits: ImageLimits) -> ImageFileFacts:
    """``read_image_bytes`` then ``decode_image_bytes``, with the content hash of the bytes."""
    data = read_image_bytes(path, limits)
    image = decode_image_bytes(data, str(path), limits)
    return ImageFileFacts(image, hashlib.sha256(data).hexdigest(), len(data))
