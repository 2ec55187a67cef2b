"""A brief mutation fuzzer for archive and image decoding, run in CI (a few seconds).

Seeds are valid zips and images of every allowed format; hypothesis flips, inserts, deletes and
truncates bytes. The contract under fuzzing: the archive reader raises nothing but GraftError
(a 4xx for the caller), the decoder nothing but ImageRejected, and what decodes is RGB.

For a longer run with coverage guidance: `pip install atheris` and
`python tests/test_fuzz_ingest.py [-max_total_time=600]` (libFuzzer flags).
"""
from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from service.store.blobs import BlobStore
from service.errors import GraftError
from service.datasets.ingest import ingest_zip
from service.settings import Settings
from workers.imaging import ImageRejected, decode_image, decode_pixels, inspect_image

from tests.support.ingest import class_folders, encode, make_zip, noise

ZIP_EXAMPLES, IMAGE_EXAMPLES = 150, 300  # the run sizes CI uses
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow notes on corrupt TIFF tags


def _image_seeds() -> list[bytes]:
    img, rgba = noise(1, size=(12, 10)), noise(2, size=(12, 10), mode="RGBA")
    return [encode(img, "JPEG"), encode(img, "JPEG", progressive=True), encode(rgba, "PNG"), encode(img, "GIF"),
            encode(img, "WEBP"), encode(img, "BMP"), encode(img, "TIFF"), encode(noise(3, mode="CMYK"), "JPEG"),
            encode(noise(4, mode="L"), "TIFF", compression="tiff_deflate")]


def _zip_seeds() -> list[bytes]:
    folders = class_folders({"ants": 2, "bees": 2}, "train")
    manifest = {"a.png": folders["train/ants/img0.png"], "b.png": folders["train/bees/img0.png"],
                "labels.csv": b"path,label,split\na.png,ants,train\nb.png,bees,val\n"}
    return [make_zip(folders), make_zip(manifest), make_zip(class_folders({"x": 1, "y": 1}), compression=0)]


IMAGE_SEEDS, ZIP_SEEDS = _image_seeds(), _zip_seeds()


def mutate(seed: bytes, edits: list[tuple[int, int, int, bytes]], cut: int | None) -> bytes:
    """edits: (kind, position, length, bytes) applied in order; kind 0 overwrite, 1 insert, 2 delete."""
    data = bytearray(seed)
    for kind, pos, length, chunk in edits:
        pos %= max(len(data), 1)
        if kind == 0:
            data[pos:pos + len(chunk)] = chunk
        elif kind == 1:
            data[pos:pos] = chunk
        else:
            del data[pos:pos + length]
    return bytes(data[:cut] if cut is not None else data)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(1, 64),
                           st.binary(min_size=1, max_size=8)), max_size=6)
CUT = st.none() | st.integers(0, 4096)


def check_zip(data: bytes, settings: Settings, blobs: BlobStore) -> None:
    with blobs.staging(settings.tmp_dir) as stage:
        try:
            ingest_zip(io.BytesIO(data), stage, settings)
        except GraftError as exc:
            assert 400 <= exc.status < 500 and exc.detail


def check_image(data: bytes) -> None:
    try:  # what predict decodes: TorchCodec for most JPEGs, so hostile bytes reach it too
        pixels = decode_pixels(data, draft_size=256)
        assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3 and pixels.numel() > 0
    except ImageRejected as exc:
        assert str(exc)
    try:
        img = decode_image(data)
    except ImageRejected as exc:
        assert str(exc)
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    inspect_image(data)  # what decodes for training also passes the upload's checks


def _fuzz_settings(root: Path) -> tuple[Settings, BlobStore]:
    settings = Settings(data_dir=root / "data", max_entry_bytes=1 << 20, max_archive_bytes=8 << 20)
    settings.ensure_dirs()
    return settings, BlobStore(settings.blobs_dir)


@hsettings(max_examples=ZIP_EXAMPLES, deadline=None, database=None)
@given(seed=st.sampled_from(ZIP_SEEDS), edits=EDITS, cut=CUT)
def test_fuzz_archive_reader(seed, edits, cut):
    with tempfile.TemporaryDirectory() as root:
        check_zip(mutate(seed, edits, cut), *_fuzz_settings(Path(root)))


@hsettings(max_examples=IMAGE_EXAMPLES, deadline=None, database=None)
@given(seed=st.sampled_from(IMAGE_SEEDS), edits=EDITS, cut=CUT)
def test_fuzz_image_decoder(seed, edits, cut):
    check_image(mutate(seed, edits, cut))


def _atheris_main() -> None:  # pragma: no cover - a manual, longer fuzzing session
    import atheris

    root = Path(tempfile.mkdtemp())
    settings, blobs = _fuzz_settings(root)

    def one_input(data: bytes) -> None:
        check_zip(data, settings, blobs) if data[:2] == b"PK" else check_image(data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    _atheris_main()
