"""decode_pixels: TorchCodec decodes most JPEGs, and must give exactly the pixels Pillow gives.

Training caches what decode_pixels returned and predict decodes again, so any difference between
the two decoders would be a train/serve skew; the tests compare them byte for byte on real photos
and on the JPEG variants that need care (EXIF orientation, grey, CMYK, progressive).
"""
from __future__ import annotations

import io
import struct

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from tests.support.data import hymenoptera_files
from workers import imaging
from workers.imaging import ImageRejected, decode_image, decode_pixels


@pytest.fixture
def torchcodec_calls(monkeypatch) -> list[int]:
    """Counts the images TorchCodec decoded (the real decoder still runs)."""
    calls: list[int] = []
    real = imaging.decode_jpeg

    def counting(data, **kwargs):
        calls.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(imaging, "decode_jpeg", counting)
    return calls


def pillow_pixels(data: bytes, draft_size: int | None = None) -> torch.Tensor:
    return pil_to_tensor(decode_image(data, draft_size))


def jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def photo() -> Image.Image:
    return decode_image(hymenoptera_files("val", "bees")[0].read_bytes())


def test_photos_decode_to_pillows_pixels_without_pillow(torchcodec_calls):
    files = hymenoptera_files("val", "ants")[:20] + hymenoptera_files("val", "bees")[:20]
    for path in files:
        data = path.read_bytes()
        assert torch.equal(decode_pixels(data, draft_size=256), pillow_pixels(data, 256)), path.name
    assert len(torchcodec_calls) >= len(files) - 2  # a couple may be big enough for draft scaling


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_applies_it(torchcodec_calls, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(photo().resize((300, 200)), exif=exif)
    ours = decode_pixels(data)
    assert ours.shape == ((3, 300, 200) if orientation >= 5 else (3, 200, 300))
    assert torch.equal(ours, pillow_pixels(data))
    assert torchcodec_calls


@pytest.mark.parametrize("variant", ["grey", "cmyk", "progressive", "4:4:4"])
def test_jpeg_variants_decode_to_pillows_pixels(torchcodec_calls, variant):
    img = photo()
    data = {"grey": lambda: jpeg(img.convert("L")), "cmyk": lambda: jpeg(img.convert("CMYK")),
            "progressive": lambda: jpeg(img, progressive=True), "4:4:4": lambda: jpeg(img, subsampling=0)}[variant]()
    ours = decode_pixels(data)
    assert ours.shape[0] == 3 and ours.dtype == torch.uint8
    assert torch.equal(ours, pillow_pixels(data))
    assert torchcodec_calls


def test_big_jpegs_keep_pillows_draft_scaling(torchcodec_calls):
    """A photo twice the resize size decodes at half size in the DCT (8x less work for a phone
    photo): TorchCodec has no such scaling, so Pillow decodes these."""
    data = jpeg(photo().resize((1200, 900)))
    ours = decode_pixels(data, draft_size=256)
    assert ours.shape == (3, 450, 600)
    assert torch.equal(ours, pillow_pixels(data, 256))
    assert not torchcodec_calls
    assert decode_pixels(data).shape == (3, 900, 1200)  # no draft size: full size, TorchCodec
    assert torchcodec_calls


def with_sof_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size."""
    at = data.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height, width
    return data[:at] + struct.pack(">HH", height, width) + data[at + 4:]


def test_a_jpeg_over_the_pixel_limit_is_refused_from_its_header(torchcodec_calls):
    data = with_sof_size(jpeg(photo().resize((64, 48))), 12_000, 9_000)
    with pytest.raises(ImageRejected, match="too large"):
        decode_pixels(data, draft_size=256)
    assert not torchcodec_calls  # refused before any decoder allocates 324 MB for it


@pytest.mark.parametrize("cut", ["half", "last bytes", "header only"])
def test_truncated_jpegs_are_rejected_in_pillows_words(torchcodec_calls, cut):
    data = hymenoptera_files("val", "ants")[0].read_bytes()
    data = {"half": data[: len(data) // 2], "last bytes": data[:-10], "header only": data[:400]}[cut]
    with pytest.raises(ImageRejected, match="corrupt or truncated"):
        decode_pixels(data)


def test_other_formats_decode_through_pillow(torchcodec_calls):
    img = photo().resize((120, 90))
    for fmt in ("PNG", "WEBP", "BMP"):
        buf = io.BytesIO()
        img.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert torch.equal(decode_pixels(buf.getvalue()), pil_to_tensor(img)), fmt
    assert not torchcodec_calls
