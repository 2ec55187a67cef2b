"""Properties (hypothesis) of the label and name cleaners and of the archive reader: whatever the
names and bytes, every file is accounted for exactly once, unsafe archives are refused whole, and
nothing is written except content-addressed files in the upload's staging folder."""
from __future__ import annotations

import hashlib
import io
import unicodedata
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from service.store.blobs import BlobStore
from service.errors import GraftError
from service.datasets.ingest import ingest_zip
from service.datasets.names import MAX_NAME_BYTES, MAX_PATH_CHARS, LabelRejected, clean_label, clean_name, label_key
from service.settings import Settings
from tests.support.ingest import encode, noise, png

PROPERTY_SETTINGS = hsettings(max_examples=150, deadline=None, database=None)


@PROPERTY_SETTINGS
@given(raw=st.text(), max_length=st.integers(1, 60))
def test_clean_label_returns_a_safe_idempotent_label_or_says_why(raw, max_length):
    try:
        label = clean_label(raw, max_length)
    except LabelRejected as exc:
        assert str(exc)
        return
    assert label == label.strip() and unicodedata.is_normalized("NFC", label)
    assert 1 <= len(label) <= max_length
    assert not any(c in label for c in "/\\\x00") and label not in (".", "..")
    assert not any(unicodedata.category(c) == "Cc" for c in label)
    assert not label.startswith(("=", "+", "@"))
    assert clean_label(label, max_length) == label
    assert label_key(label) == label_key(label.upper()) == label_key(label.lower()) or not label.isascii()


@PROPERTY_SETTINGS
@given(raw=st.text(alphabet=st.characters(codec="utf-8"), max_size=600))
def test_clean_name_is_displayable_bounded_and_idempotent(raw):
    name = clean_name(raw)
    assert name and unicodedata.is_normalized("NFC", name) and len(name) <= MAX_PATH_CHARS
    assert not any(unicodedata.category(c) == "Cc" or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                   for c in name)
    assert all(part and len(part.encode()) <= MAX_NAME_BYTES for part in name.split("/"))
    assert clean_name(name) == name


IMAGES = [png(i) for i in range(4)] + [encode(noise(9), "JPEG"), encode(noise(10), "GIF")]
SEGMENTS = st.sampled_from(["ants", "bees", "train", "val", "Ants", "caf\u00e9", "cafe\u0301", "__MACOSX", ".hidden",
                            "x.png", "y.jpg", "a b", "..", "", " ", "C:", "n\u202eo", "labels.txt", "z.zip"])
LAYOUT = st.tuples(st.sampled_from(["ants", "bees", "Ants", "caf\u00e9", "cafe\u0301", "train/ants", "val/bees",
                                     "wrap/ants", "wrap/val/bees", " x "]),
                   st.sampled_from(["a.png", "b.jpg", "c", "d.gif"])).map("/".join)
NAMES = st.one_of(LAYOUT, LAYOUT, LAYOUT, st.lists(SEGMENTS, min_size=1, max_size=4).map("/".join), st.text(max_size=30))
CONTENTS = st.one_of(st.sampled_from(IMAGES), st.sampled_from(IMAGES), st.binary(max_size=64), st.just(b""))
ENTRIES = st.lists(st.tuples(NAMES, CONTENTS), max_size=12)


def _zip(entries) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are part of the input space
        for name, data in entries:
            if not zipfile.ZipInfo(name or "unnamed").filename:
                continue  # zipfile itself cannot write a name that is empty once cut at a NUL
            zf.writestr(name or "unnamed", data)
    return buf.getvalue()


def _is_unsafe(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    settings = Settings(data_dir=root / "data")
    settings.ensure_dirs()
    return settings, BlobStore(settings.blobs_dir)


@hsettings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=ENTRIES)
def test_the_archive_reader_accounts_for_every_file_or_refuses_the_archive(store, entries):
    settings, blobs = store
    data = _zip(entries)
    infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    with blobs.staging(settings.tmp_dir) as stage:
        try:
            result = ingest_zip(io.BytesIO(data), stage, settings)
        except GraftError as exc:
            event(f"refused {exc.status}")
            assert exc.status in (413, 422) and exc.detail
            if any(_is_unsafe(i.filename) for i in infos):
                assert "outside the archive" in exc.detail
            return
        finally:
            staged = list(Path(stage.folder).iterdir())
        event(f"accepted with {min(len(result.images), 3)}+ images")
        assert not any(_is_unsafe(i.filename) for i in infos), "an unsafe entry was not refused"
        # Every file is accounted for exactly once: kept, or listed with a reason.
        expected = Counter(clean_name(i.filename) for i in infos if not i.is_dir())
        seen = Counter(img.original_name for img in result.images) + Counter(r["path"] for r in result.rejected)
        assert seen == expected
        assert all(r["reason"] for r in result.rejected)
        for img in result.images:
            assert clean_label(img.label, settings.max_label_length) == img.label
            assert img.split in (None, "train", "val") and img.width >= 1 and img.height >= 1
        kept = {img.sha256 for img in result.images}
        assert len(kept) == len(result.images), "the same bytes were kept twice"
        assert {p.name for p in staged} >= kept - {p.name for p in settings.blobs_dir.rglob("*")}
        for p in staged:
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name
    assert not any(settings.tmp_dir.iterdir()), "the staging folder outlived the upload"
