"""The one routine that turns uploaded bytes into an RGB picture, for training and predict alike.

Pillow picks its parser from magic bytes, so the allow-list is explicit (EPS would run
Ghostscript); images over the pixel limit are refused from their header, before any pixel is
decoded, and Pillow's own decompression-bomb warning is an error; truncated files are rejected,
never half-loaded; EXIF orientation is applied before anything else sees the pixels; every mode
becomes RGB the same way. Whatever the bytes, the only exception that leaves is ImageRejected.

Training and predict take the pixels as a tensor (`decode_pixels`): most JPEGs decode in
TorchCodec there, which gives Pillow's pixels exactly but does not hold the GIL while it works.
"""
from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchcodec.decoders import decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

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


def decode_pixels(data: bytes, draft_size: int | None = None, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """decode_image's pixels as uint8 [3, H, W] (a view of HWC memory), the same for the same bytes.

    A JPEG that passes the header checks and that draft scaling would not shrink decodes in
    TorchCodec: the same libjpeg-turbo pixels as Pillow, EXIF orientation included (tests hold
    this), a sixth faster, and mostly without the GIL: Pillow held it for ~0.9 ms of each 500x375
    photo (TorchCodec 0.4 ms, most of it Pillow's header check), which capped one API process's
    parallel decoding of a batch predict near 1,100 images/s. The rest, and any JPEG TorchCodec
    refuses, go through Pillow, which also words the rejection.
    """
    if data[:2] == b"\xff\xd8" and _full_size_jpeg(data, draft_size, max_pixels):
        try:
            return decode_jpeg(data, mode="RGB")
        except RuntimeError:
            pass
    return pil_to_tensor(decode_image(data, draft_size, max_pixels))


def _full_size_jpeg(data: bytes, draft_size: int | None, max_pixels: int) -> bool:
    """Whether `data` has an acceptable JPEG header and JPEG draft scaling would leave it whole
    (Pillow's draft() decides, from the header only)."""
    try:
        with _rejecting():
            img = _open(data, max_pixels)
            if img.format != "JPEG":
                return False
            if draft_size:
                size = img.size
                img.draft("RGB", _draft_target(size, draft_size))
                return img.size == size
            return True
    except ImageRejected:
        return False


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The lazily opened image, once its header passes the format and size checks."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageRejected("image has no pixels")
    if width * height > max_pixels:
        raise ImageRejected(f"image too large: {width}x{height} is {width * height} pixels; "
                            f"at most {max_pixels} are allowed")
    return img


@contextmanager
def _rejecting():
    """Whatever Pillow raises on these bytes leaves as ImageRejected, in words for the user."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
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


def _decode(data: bytes, draft_size: int | None, max_pixels: int) -> tuple[Image.Image, tuple[int, int], str, str]:
    with _rejecting():
        img = _open(data, max_pixels)
        width, height = img.size
        mode, fmt = img.mode, img.format or "unknown"
        if draft_size and img.format == "JPEG":
            img.draft("RGB", _draft_target(img.size, draft_size))
        img.load()  # raises on truncated data: Pillow's LOAD_TRUNCATED_IMAGES stays False
        orientation = img.getexif().get(0x0112)
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright image's pixels
        img = to_rgb(img)
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
