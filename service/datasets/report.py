"""The dataset report: what a user must know before spending training time on a dataset.

Built from the dataset's image rows plus what the upload left out (rejected files, collapsed
duplicates, label conflicts). It says whether the dataset can train and, if not, why; warnings
each name what to do about them.
"""
from __future__ import annotations

from collections import Counter
from statistics import median
from typing import Protocol, Sequence

import numpy as np

from service.settings import Settings

# pHash Hamming distance (of 64 bits) at or below which two images are near-duplicates: re-encoded,
# resized or lightly edited copies land at 0-6; unrelated photos average ~32 (hymenoptera, 398
# photos, has no pair under 12).
NEAR_DUPLICATE_BITS = 6
MAX_LISTED = 100  # pairs listed per kind; the counts are always complete
IMBALANCE_WARNING_RATIO = 3.0
SMALL_IMAGE_SIDE = 64


class ImageLike(Protocol):
    sha256: str
    label: str
    split: str | None
    original_name: str
    width: int
    height: int
    mode: str | None
    format: str | None
    phash: str | None


def build_report(images: Sequence[ImageLike], *, rejected: list[dict], duplicates: list[dict],
                 conflicts: list[dict], settings: Settings) -> dict:
    class_counts = Counter(img.label for img in images)
    classes = sorted(class_counts)
    has_val = any(img.split == "val" for img in images)
    split_counts: dict[str, Counter] = {}
    for img in images:
        split_counts.setdefault(img.split or "unsplit", Counter())[img.label] += 1
    leakage, near, n_leakage, n_near = _near_duplicates(images, has_val)
    problems = _problems(classes, class_counts, split_counts, has_val, settings)
    imbalance = (max(class_counts.values()) / min(class_counts.values())) if class_counts else None
    warnings = _warnings(classes, class_counts, split_counts, has_val, imbalance, settings,
                         n_leakage=n_leakage, n_near=n_near, rejected=rejected, duplicates=duplicates,
                         conflicts=conflicts, images=images)
    return {
        "trainable": not problems,
        "problems": problems,
        "warnings": warnings,
        "num_images": len(images),
        "classes": classes,
        "class_counts": dict(sorted(class_counts.items())),
        "split_counts": {k: dict(sorted(v.items())) for k, v in sorted(split_counts.items())},
        "has_val_split": has_val,
        "imbalance_ratio": round(imbalance, 3) if imbalance is not None else None,
        "duplicates": duplicates,
        "conflicts": conflicts,
        "leakage": leakage,
        "leakage_count": n_leakage,
        "near_duplicates": near,
        "near_duplicate_count": n_near,
        "image_stats": _image_stats(images),
    }


def _problems(classes, class_counts, split_counts, has_val, settings: Settings) -> list[str]:
    minimum, recommended = settings.min_images_per_class, settings.recommended_images_per_class
    problems = []
    if len(classes) < 2:
        found = ", ".join(f"{c!r} ({class_counts[c]})" for c in classes) or "none"
        problems.append(f"a dataset needs at least 2 classes with usable images; it has {len(classes)}: {found}")
    for c in classes:
        if class_counts[c] < minimum:
            problems.append(f"class {c!r} has {class_counts[c]} image{'s' * (class_counts[c] != 1)}; at least "
                            f"{minimum} are needed to train, {recommended}+ recommended")
    if has_val:
        train = split_counts.get("train", Counter()) + split_counts.get("unsplit", Counter())
        for c in classes:
            if not train[c]:
                problems.append(f"class {c!r} has no training images (all are under val/); move some to train/")
    return problems


def _warnings(classes, class_counts, split_counts, has_val, imbalance, settings: Settings, *, n_leakage,
              n_near, rejected, duplicates, conflicts, images) -> list[str]:
    minimum, recommended = settings.min_images_per_class, settings.recommended_images_per_class
    warnings = [f"class {c!r} has {class_counts[c]} images; {recommended}+ are recommended for good accuracy"
                for c in classes if minimum <= class_counts[c] < recommended]
    if has_val:
        val = split_counts.get("val", Counter())
        warnings += [f"class {c!r} has no validation images; its accuracy will not be measured"
                     for c in classes if not val[c]]
        unsplit = sum(split_counts.get("unsplit", Counter()).values())
        if unsplit:
            warnings.append(f"{unsplit} image(s) have no split; they are used for training because other "
                            "images are in val")
    if imbalance is not None and imbalance >= IMBALANCE_WARNING_RATIO:
        big = max(classes, key=lambda c: class_counts[c])
        small = min(classes, key=lambda c: class_counts[c])
        warnings.append(f"classes are imbalanced: {big!r} has {imbalance:.1f}x as many images as {small!r}; "
                        f"add images to {small!r} or expect the model to favour {big!r}")
    if n_leakage:
        warnings.append(f"{n_leakage} near-duplicate pair(s) across train and val (see leakage): validation "
                        "accuracy will look better than it is; remove one image of each pair")
    if n_near:
        where = "may be split across train and val, or " if not has_val else ""
        warnings.append(f"{n_near} near-duplicate pair(s) within the dataset (see near_duplicates); they {where}"
                        "over-weight those pictures; pairs under different labels are likely mislabeled")
    if conflicts:
        warnings.append(f"{len(conflicts)} image(s) appeared under more than one label and were left out "
                        "(see conflicts); upload each under its one right label")
    if duplicates:
        dropped = sum(len(d["dropped"]) for d in duplicates)
        warnings.append(f"{dropped} exact duplicate file(s) within a class were collapsed (see duplicates)")
    if rejected:
        warnings.append(f"{len(rejected)} file(s) were left out (see rejected for the reason of each)")
    small = sum(1 for img in images if min(img.width, img.height) < SMALL_IMAGE_SIDE)
    if small:
        warnings.append(f"{small} image(s) are under {SMALL_IMAGE_SIDE} px on their short side; they will be "
                        "upscaled and may train poorly")
    return warnings


def _near_duplicates(images: Sequence[ImageLike], has_val: bool) -> tuple[list, list, int, int]:
    """Pairs within NEAR_DUPLICATE_BITS of each other: train/val pairs are leakage, the rest are
    listed as near-duplicates. Brute force on 64-bit hashes, in blocks to bound memory; pairs are
    counted in numpy and only the listed ones become Python objects."""
    hashed = [img for img in images if img.phash]
    n = len(hashed)
    if n < 2:
        return [], [], 0, 0
    hashes = np.array([int(img.phash, 16) for img in hashed], dtype=np.uint64)
    sides = np.array([{"train": 0, "val": 1}.get(_side(img, has_val), 2) for img in hashed])
    block = max(1, 4_000_000 // n)
    leakage, near, n_leakage, n_near = [], [], 0, 0
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        close = np.bitwise_count(hashes[rows][:, None] ^ hashes[None, :]) <= NEAR_DUPLICATE_BITS
        close &= np.arange(n)[None, :] > rows[:, None]  # each pair once
        i, j = np.nonzero(close)
        a = rows[i]
        across = (sides[a] != sides[j]) & (sides[a] < 2) & (sides[j] < 2)
        n_leakage += int(across.sum())
        n_near += int((~across).sum())
        for k in np.flatnonzero(across)[:MAX_LISTED - len(leakage)]:
            train, val = sorted((hashed[a[k]], hashed[j[k]]), key=lambda img: _side(img, has_val) != "train")
            leakage.append({"train": _ref(train), "val": _ref(val), "distance": _distance(train, val)})
        for k in np.flatnonzero(~across)[:MAX_LISTED - len(near)]:
            first, second = hashed[a[k]], hashed[j[k]]
            near.append({"a": _ref(first), "b": _ref(second), "distance": _distance(first, second)})
    return leakage, near, n_leakage, n_near


def _distance(a: ImageLike, b: ImageLike) -> int:
    return (int(a.phash, 16) ^ int(b.phash, 16)).bit_count()


def _side(img: ImageLike, has_val: bool) -> str | None:
    if has_val:
        return img.split or "train"
    return None


def _ref(img: ImageLike) -> dict:
    return {"id": img.sha256, "path": img.original_name, "label": img.label, "split": img.split}


def _image_stats(images: Sequence[ImageLike]) -> dict:
    def spread(values: list[int]) -> dict | None:
        return {"min": min(values), "median": float(median(values)), "max": max(values)} if values else None

    return {
        "width": spread([img.width for img in images]),
        "height": spread([img.height for img in images]),
        "modes": dict(Counter(img.mode or "unknown" for img in images).most_common()),
        "formats": dict(Counter(img.format or "unknown" for img in images).most_common()),
    }
