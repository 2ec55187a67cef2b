"""The one routine that turns uploaded bytes into an RGB picture, for training and predict alike.

Pillow picks its parser from magic bytes, so the allow-list is explicit (EPS would run
Ghostscript); images over the pixel limit are refused from their header, before any pixel is
decoded, and Pillow's own decompression-bomb warning is an error; truncated files are rejected,
never half-loaded; EXIF orientation is applied before anything else sees the pixels; every mode
becomes RGB the same way. Whatever the bytes, the only exception that leaves is ImageRejected.
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Pillow's own decompression-bomb threshold (it warns above this and raises above twice this).
MAX_PIXELS = 89_478_485
_ORIENTATION_SWAPS_SIDES = {5, 6, 7, 8}

log = logging.getLogger("graft.imaging")


class ImageRejected(ValueError):
    """The bytes are not an image Graft accepts; the message says why, for the user."""


@dataclass(frozen=True)
class ImageInfo:
    """What an upload needs to know about an accepted image."""

    width: int  # as displayed, after EXIF orientation
    height: int
    mode: str  # as stored in the file, before conversion to RGB
    format: str
    phash: str  # 64-bit perceptual hash, 16 hex digits


def decode_image(data: bytes, draft_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `data` to an RGB image (first frame, EXIF-transposed, alpha composited on white).

    `draft_size` lets JPEG decoding scale down in the DCT (much faster for big photos) while
    keeping both sides at least that many pixels; it must be the same in training and predict.
    """
    return _decode(data, draft_size, max_pixels)[0]


def inspect_image(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Decode `data` completely, the way training will, and describe it; cheap for big JPEGs."""
    rgb, (width, height), mode, fmt = _decode(data, 32, max_pixels)
    return ImageInfo(width, height, mode, fmt, perceptual_hash(rgb))


def perceptual_hash(img: Image.Image) -> str:
    """pHash (DCT of a 32x32 grey thumbnail): near-identical pictures differ in few bits."""
    import imagehash  # imported here: only uploads need it, and it pulls in scipy

    return str(imagehash.phash(img))


def _decode(data: bytes, draft_size: int | None, max_pixels: int) -> tuple[Image.Image, tuple[int, int], str, str]:
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageRejected("image has no pixels")
            if width * height > max_pixels:
                raise ImageRejected(f"image too large: {width}x{height} is {width * height} pixels; "
                                    f"at most {max_pixels} are allowed")
            mode, fmt = img.mode, img.format or "unknown"
            if draft_size and img.format == "JPEG":
                img.draft("RGB", _draft_target(img.size, draft_size))
            img.load()  # raises on truncated data: Pillow's LOAD_TRUNCATED_IMAGES stays False
            orientation = img.getexif().get(0x0112)
            img = to_rgb(ImageOps.exif_transpose(img))
    except ImageRejected:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageRejected(f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected(
            "not a supported image; allowed formats: " + ", ".join(ALLOWED_FORMATS)
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejected(f"corrupt or truncated image: {exc}") from None
    except Exception as exc:  # a Pillow plugin bug on hostile bytes must not take the caller down
        log.warning("unexpected %s decoding an image: %s", type(exc).__name__, exc)
        raise ImageRejected(f"corrupt image: the decoder failed ({type(exc).__name__})") from None
    if orientation in _ORIENTATION_SWAPS_SIDES:
        width, height = height, width
    return img, (width, height), mode, fmt


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
    if img.mode.startswith("I;16"):  # 16-bit grey, either byte order: keep the top 8 bits
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L")
    elif img.mode == "I":
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
