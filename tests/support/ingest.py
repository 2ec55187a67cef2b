"""Helpers for the ingestion tests: tiny images made in memory, zips, and the checks every bad
input must pass (status, problem+json, nothing written outside the data dir, nothing half-written).
No tests here."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import create_engine, text

from service.app import create_app

PROBLEM = "application/problem+json"


def noise(seed: int, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> Image.Image:
    """A small random picture: every seed gives a different perceptual hash."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png(seed: int, **kw) -> bytes:
    return encode(noise(seed, **kw), "PNG")


def make_zip(entries, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """`entries`: {name: bytes} or [(name or ZipInfo, bytes)]."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in (entries.items() if isinstance(entries, dict) else entries):
            zf.writestr(name, data)
    return buf.getvalue()


def class_folders(counts: dict[str, int], split: str | None = None, seed: int = 0) -> dict[str, bytes]:
    """{label: n} -> zip entries of n distinct images per class."""
    prefix = f"{split}/" if split else ""
    entries, s = {}, seed
    for label, n in counts.items():
        for i in range(n):
            s += 1
            entries[f"{prefix}{label}/img{i}.png"] = png(s)
    return entries


def upload(client, data: bytes, name: str | None = None, filename: str = "set.zip", content_type="application/zip"):
    return client.post("/v1/datasets", files={"file": (filename, data, content_type)},
                       data={"name": name} if name else {})


def assert_problem(resp, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers["content-type"]
    body = resp.json()
    assert body["status"] == status and body["title"] and body["type"] and body["detail"], body
    for word in words:
        assert word.lower() in body["detail"].lower(), body["detail"]
    return body


class Guard:
    """Snapshots the test's folder and database; then checks that a request wrote nothing
    outside the data dir, left no staging files, and (when refused) changed nothing at all."""

    def __init__(self, settings):
        self.settings = settings
        self.root = settings.data_dir.parent
        self.before_outside = self._outside()
        self.before_blobs = self._blobs()
        self.before_datasets = self._datasets()

    def _outside(self) -> set[Path]:
        return {p for p in self.root.rglob("*") if self.settings.data_dir not in p.parents and p != self.settings.data_dir}

    def _blobs(self) -> set[str]:
        return {p.name for p in self.settings.blobs_dir.rglob("*") if p.is_file()}

    def _datasets(self) -> int:
        engine = create_engine(self.settings.database_url)
        with engine.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM dataset")).scalar_one()
        engine.dispose()
        return n

    def check_clean(self) -> None:
        assert self._outside() == self.before_outside, "a file was written outside the data dir"
        assert not any(self.settings.tmp_dir.iterdir()), "staging files were left behind"
        assert not [p for p in self.settings.blobs_dir.rglob(".tmp-*")], "a half-written blob was left"
        for blob in self.settings.blobs_dir.rglob("*"):
            if blob.is_file():
                import hashlib
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"corrupt blob {blob}"

    def check_unchanged(self) -> None:
        """A refused request: the checks above, and no dataset and no blob was added."""
        self.check_clean()
        assert self._blobs() == self.before_blobs, "a refused upload stored files"
        assert self._datasets() == self.before_datasets, "a refused upload created a dataset"


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def guard(settings, client) -> Guard:
    return Guard(settings)
