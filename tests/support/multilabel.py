"""Multi-label images made of real photos (issue 17): mosaics of 1-3 photos side by side, their
labels the union of the photos' classes. Used by the multi-label tests and bench/multilabel.py."""
from __future__ import annotations

import csv
import io
import random
from pathlib import Path

from PIL import Image, ImageOps

from tests.support.data import REPO, hymenoptera_files, make_zip

BLOODCELLS = REPO.parent / "shared" / "datasets" / "bloodcells"


def bloodcell_files(split: str, label: str) -> list[Path]:
    return sorted(p for p in (BLOODCELLS / split / label).iterdir() if p.is_file())


def photos(source: str, split: str, label: str) -> list[Path]:
    """A class's photos: source "hymenoptera" (ants, bees) or "bloodcells" (basophil, ...)."""
    return hymenoptera_files(split, label) if source == "hymenoptera" else bloodcell_files(split, label)


def mosaic(paths: list[Path], side: int = 192, quality: int = 90) -> bytes:
    """The photos side by side in vertical strips of one square (each photo centre-cropped to its
    strip), as JPEG: the square survives Graft's resize and centre crop with every strip in it."""
    canvas = Image.new("RGB", (side, side))
    width = side // len(paths)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            strip = ImageOps.fit(ImageOps.exif_transpose(img).convert("RGB"), (width, side))
        canvas.paste(strip, (i * width, 0))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def draw_mosaics(classes: dict[str, tuple[str, str]], split: str, n: int, seed: int, sizes=(1, 2, 3),
                 side: int = 192) -> list[tuple[bytes, tuple[str, ...]]]:
    """`n` mosaics of 1-3 photos of different classes ({label: (source, folder)}), each photo used at
    most once per call: [(jpeg bytes, sorted labels)]."""
    rng = random.Random(seed)
    pools = {label: photos(source, split, folder) for label, (source, folder) in classes.items()}
    for pool in pools.values():
        rng.shuffle(pool)
    out = []
    for _ in range(n):
        available = [c for c, pool in pools.items() if pool]
        k = min(rng.choice(sizes), len(available))
        if k == 0:
            break
        chosen = rng.sample(available, k)
        out.append((mosaic([pools[c].pop() for c in chosen], side), tuple(sorted(chosen))))
    return out


def multilabel_zip(items: list[tuple[bytes, tuple[str, ...]]], split: str | None = None) -> bytes:
    """A zip of images/<i>.jpg and a labels.csv with a `labels` column (';'-separated)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "labels"] + (["split"] if split else []))
    entries = {}
    for i, (data, labels) in enumerate(items):
        name = f"images/{i:04d}.jpg"
        entries[name] = data
        writer.writerow([name, ";".join(labels)] + ([split] if split else []))
    entries["labels.csv"] = buf.getvalue().encode()
    return make_zip(entries)
