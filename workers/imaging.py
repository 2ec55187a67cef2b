"""The one routine that turns uploaded bytes into an RGB picture, for training and predict alike.

Pillow picks its parser from magic bytes, so the allow-list is explicit (EPS would run
Ghostscript); decompression-bomb warnings are errors; truncated files are rejected, never
half-loaded; EXIF orientation is applied before anything else sees the pixels.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


class ImageRejected(ValueError):
    """The bytes are not an image Graft accepts; the message says why, for the user."""


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode `data` to an RGB image (first frame, EXIF-transposed, alpha composited on white).

    `draft_size` lets JPEG decoding scale down in the DCT (much faster for big photos) while
    keeping both sides at least that many pixels; it must be the same in training and predict.
    """
    return to_rgb(_load(data, draft_size)[0])


def inspect_image(data: bytes) -> tuple[int, int]:
    """Check that `data` decodes completely and return its (width, height), cheaply."""
    return _load(data, draft_size=32)[1]


def _load(data: bytes, draft_size: int | None) -> tuple[Image.Image, tuple[int, int]]:
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            size = img.size
            if draft_size and img.format == "JPEG":
                img.draft("RGB", _draft_target(img.size, draft_size))
            img.load()  # raises on truncated data: Pillow's LOAD_TRUNCATED_IMAGES stays False
            img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageRejected(f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected(
            "not a supported image; allowed formats: " + ", ".join(ALLOWED_FORMATS)
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejected(f"corrupt or truncated image: {exc}") from None
    if size[0] < 1 or size[1] < 1:
        raise ImageRejected("image has no pixels")
    return img, size


def _draft_target(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    # draft() keeps the image at least as large as the requested box; scale the box so the
    # shorter side stays >= short_side whatever the aspect ratio.
    w, h = size
    scale = short_side / min(w, h)
    return (max(1, round(w * scale)), max(1, round(h * scale)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Every mode to RGB the same way: transparency composited on white, CMYK/16-bit/1-bit converted."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")  # 16-bit grey: keep the top 8 bits
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
