"""The shared data the tests use: the hymenoptera photos (../shared), zips made in memory, and
where the PostgreSQL server is."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# GRAFT_HYMENOPTERA: where the shared set is on a machine without ../shared (a lent GPU)
HYMENOPTERA = Path(os.environ.get("GRAFT_HYMENOPTERA") or REPO.parent / "shared" / "datasets" / "hymenoptera")
PG_ADMIN_URL = os.environ.get("GRAFT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")



def hymenoptera_files(split: str, label: str) -> list[Path]:
    return sorted(p for p in (HYMENOPTERA / split / label).iterdir() if p.is_file())


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def subset_zip(per_class_train: int, per_class_val: int, wrap: str | None = "photos") -> bytes:
    """A stratified slice of hymenoptera in the train/val layout (first files by name, so stable)."""
    entries = {}
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for label in ("ants", "bees"):
            for p in hymenoptera_files(split, label)[:n]:
                prefix = f"{wrap}/" if wrap else ""
                entries[f"{prefix}{split}/{label}/{p.name}"] = p.read_bytes()
    return make_zip(entries)
