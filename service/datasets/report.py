"""The dataset report: what a user must know before spending training time on a dataset.

Built from the dataset's image rows plus what the upload left out (rejected files, collapsed
duplicates, label conflicts). It says whether the dataset can train and, if not, why; warnings
each name what to do about them. Test images (split "test") are counted and checked for leakage
but never count towards what a class needs to train: they are held out of training and selection.
Unlabeled images (issue 16) are counted (`unlabeled_count`) and checked like every image (their
near-duplicates of labeled images apart), but belong to no class and no split.
A multi-label dataset (issue 17) counts each image toward each of its labels, and adds labels per
image, co-occurrence and the images with none of the labels (service/datasets/multilabel.py).
"""
from __future__ import annotations

from collections import Counter
from statistics import median
from typing import Protocol, Sequence

import numpy as np

from service.datasets import multilabel
from service.datasets.ingest import is_unlabeled
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
    everything = images
    # Unlabeled images (issue 16) are checked like every image but count toward no class or split.
    images = [img for img in everything if not is_unlabeled(img)]
    n_unlabeled = len(everything) - len(images)
    # A multi-label image (issue 17) counts toward each of its labels (a class is then a label).
    multi = multilabel.is_multi_label(images)
    class_counts = Counter(label for img in images for label in multilabel.labels_of(img))
    classes = sorted(class_counts)
    has_val = any(img.split == "val" for img in images)
    split_counts: dict[str, Counter] = {}
    for img in images:
        split_counts.setdefault(img.split or "unsplit", Counter()).update(multilabel.labels_of(img))
    # What trains and chooses the model: every image but the test split's.
    learn_counts = Counter({c: class_counts[c] - split_counts.get("test", Counter())[c] for c in classes})
    leakage, near, n_leakage, n_test_leakage, n_near, unlabeled_near, n_unlabeled_near = _near_duplicates(everything,
                                                                                                   has_val)
    problems = _problems(classes, learn_counts, split_counts, has_val, settings)
    extras, more = multilabel.report_extras(images, classes, learn_counts) if multi else ({}, [])
    problems += more
    if n_unlabeled and len([c for c in classes if learn_counts[c]]) < 2:
        problems.insert(0, f"{n_unlabeled} image(s) are unlabeled and count toward no class; label at least "
                        f"{settings.min_images_per_class} images in each of 2 or more classes (PATCH "
                        "/v1/datasets/{id}/images/{image_id}, or GET /v1/models/{id}/suggestions for which first)")
    sizes = [n for n in learn_counts.values() if n]
    imbalance = (max(sizes) / min(sizes)) if sizes else None
    warnings = _warnings(classes, learn_counts, split_counts, has_val, imbalance, settings,
                         n_leakage=n_leakage, n_test_leakage=n_test_leakage, n_near=n_near, rejected=rejected,
                         duplicates=duplicates, conflicts=conflicts, images=everything)
    if n_unlabeled_near:
        warnings.append(f"{n_unlabeled_near} unlabeled image(s) are near-duplicates of labeled ones (see "
                        "unlabeled_near_duplicates); label them alike or remove them")
    return {
        "trainable": not problems,
        "problems": problems,
        "warnings": warnings,
        "num_images": len(everything),
        "num_labeled": len(images),
        "unlabeled_count": n_unlabeled,
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
        "unlabeled_near_duplicates": unlabeled_near,
        "unlabeled_near_duplicate_count": n_unlabeled_near,
        "image_stats": _image_stats(everything),
        "task": multilabel.SINGLE_LABEL,
        **extras,  # multi-label: task, labels_per_image, images_without_labels, label_cooccurrence
    }


def _problems(classes, learn_counts, split_counts, has_val, settings: Settings) -> list[str]:
    """`learn_counts`: images per class outside the test split, the ones that can train."""
    minimum, recommended = settings.min_images_per_class, settings.recommended_images_per_class
    problems = []
    outside = _outside_test(split_counts)
    learnable = [c for c in classes if learn_counts[c]]
    if len(learnable) < 2:
        found = ", ".join(f"{c!r} ({learn_counts[c]})" for c in learnable) or "none"
        problems.append(f"a dataset needs at least 2 classes with usable images{outside}; it has "
                        f"{len(learnable)}: {found}")
    for c in classes:
        if not learn_counts[c]:
            problems.append(f"class {c!r} has images only under test/; a model cannot learn it from test images "
                            f"(they are held out): add at least {minimum} to train/")
        elif learn_counts[c] < minimum:
            problems.append(f"class {c!r} has {learn_counts[c]} image{'s' * (learn_counts[c] != 1)}{outside}; "
                            f"at least {minimum} are needed to train, {recommended}+ recommended")
    if has_val:
        train = split_counts.get("train", Counter()) + split_counts.get("unsplit", Counter())
        for c in learnable:
            if not train[c]:
                problems.append(f"class {c!r} has no training images (all are under val/); move some to train/")
    return problems


def _outside_test(split_counts) -> str:
    """How a count of trainable images is named: plainly, unless a test split holds some back."""
    return " outside test/" if "test" in split_counts else ""


def _warnings(classes, learn_counts, split_counts, has_val, imbalance, settings: Settings, *, n_leakage,
              n_test_leakage, n_near, rejected, duplicates, conflicts, images) -> list[str]:
    minimum, recommended = settings.min_images_per_class, settings.recommended_images_per_class
    outside = _outside_test(split_counts)
    warnings = [f"class {c!r} has {learn_counts[c]} images{outside}; {recommended}+ are recommended for good "
                "accuracy" for c in classes if minimum <= learn_counts[c] < recommended]
    if has_val:
        val = split_counts.get("val", Counter())
        warnings += [f"class {c!r} has no validation images; its accuracy will not be measured"
                     for c in classes if not val[c]]
        unsplit = sum(split_counts.get("unsplit", Counter()).values())
        if unsplit:
            warnings.append(f"{unsplit} image(s) have no split; they are used for training because other "
                            "images are in val")
    if "test" in split_counts:
        test = split_counts["test"]
        warnings += [f"class {c!r} has no test images; its test accuracy will not be measured"
                     for c in classes if not test[c]]
    if imbalance is not None and imbalance >= IMBALANCE_WARNING_RATIO:
        present = [c for c in classes if learn_counts[c]]
        big = max(present, key=lambda c: learn_counts[c])
        small = min(present, key=lambda c: learn_counts[c])
        warnings.append(f"classes are imbalanced: {big!r} has {imbalance:.1f}x as many images as {small!r}; "
                        f"add images to {small!r} or expect the model to favour {big!r}")
    if n_leakage - n_test_leakage:
        warnings.append(f"{n_leakage - n_test_leakage} near-duplicate pair(s) across train and val (see leakage): "
                        "validation accuracy will look better than it is; remove one image of each pair")
    if n_test_leakage:
        warnings.append(f"{n_test_leakage} near-duplicate pair(s) across test and the images that train or "
                        "validate (see leakage): test accuracy will look better than it is; remove one image "
                        "of each pair")
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


_SIDES = ("train", "val", "test")  # a leakage pair's keys, in this order
_TEST = _SIDES.index("test")


def _near_duplicates(images: Sequence[ImageLike], has_val: bool) -> tuple[list, list, int, int, int, list, int]:
    """Pairs within NEAR_DUPLICATE_BITS of each other: pairs across train, val and test are leakage
    (counted in all, and apart when one image is in test), the rest are listed as near-duplicates;
    an unlabeled image near a labeled one is a pair of its own kind (issue 16; two unlabeled images
    are not counted: nothing trains on them as they are). Brute force on 64-bit hashes, in blocks
    to bound memory; pairs are counted in numpy and only the listed ones become Python objects."""
    hashed = [img for img in images if img.phash]
    n = len(hashed)
    if n < 2:
        return [], [], 0, 0, 0, [], 0
    hashes = np.array([int(img.phash, 16) for img in hashed], dtype=np.uint64)
    unlabeled_side = len(_SIDES) + 1
    sides = np.array([unlabeled_side if is_unlabeled(img) else
                      _SIDES.index(side) if (side := _side(img, has_val)) else len(_SIDES) for img in hashed])
    block = max(1, 4_000_000 // n)
    leakage, near, n_leakage, n_test_leakage, n_near = [], [], 0, 0, 0
    unlabeled, n_unlabeled = [], 0
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        close = np.bitwise_count(hashes[rows][:, None] ^ hashes[None, :]) <= NEAR_DUPLICATE_BITS
        close &= np.arange(n)[None, :] > rows[:, None]  # each pair once
        i, j = np.nonzero(close)
        a = rows[i]
        free_a, free_j = sides[a] == unlabeled_side, sides[j] == unlabeled_side
        labeled = ~free_a & ~free_j
        with_unlabeled = free_a ^ free_j
        # Without a val split every non-test image has the one "unknown" side (a job splits them),
        # so a pair is across exactly when its sides differ.
        across = (sides[a] != sides[j]) & labeled
        within = ~across & labeled
        n_leakage += int(across.sum())
        n_test_leakage += int((across & ((sides[a] == _TEST) | (sides[j] == _TEST))).sum())
        n_near += int(within.sum())
        n_unlabeled += int(with_unlabeled.sum())
        for k in np.flatnonzero(across)[:MAX_LISTED - len(leakage)]:
            leakage.append(_leakage_pair(hashed[a[k]], hashed[j[k]], has_val))
        for k in np.flatnonzero(within)[:MAX_LISTED - len(near)]:
            first, second = hashed[a[k]], hashed[j[k]]
            near.append({"a": _ref(first), "b": _ref(second), "distance": _distance(first, second)})
        for k in np.flatnonzero(with_unlabeled)[:MAX_LISTED - len(unlabeled)]:
            first, second = sorted((hashed[a[k]], hashed[j[k]]), key=is_unlabeled)  # the labeled one first
            unlabeled.append({"a": _ref(first), "b": _ref(second), "distance": _distance(first, second)})
    return leakage, near, n_leakage, n_test_leakage, n_near, unlabeled, n_unlabeled

def _leakage_pair(x: ImageLike, y: ImageLike, has_val: bool) -> dict:
    # Each image under its side's key; an unsplit image (no val split) is on the training side.
    first, second = sorted((x, y), key=lambda img: _SIDES.index(_side(img, has_val) or "train"))
    return {(_side(first, has_val) or "train"): _ref(first), (_side(second, has_val) or "train"): _ref(second),
            "distance": _distance(first, second)}


def _distance(a: ImageLike, b: ImageLike) -> int:
    return (int(a.phash, 16) ^ int(b.phash, 16)).bit_count()


def _side(img: ImageLike, has_val: bool) -> str | None:
    """train/val/test, or None for an unsplit image whose side a job decides (no val split)."""
    if img.split == "test":
        return "test"
    if has_val:
        return img.split or "train"
    return None


def _ref(img: ImageLike) -> dict:
    return {"id": img.sha256, "path": img.original_name,
            "label": None if is_unlabeled(img) else multilabel.shown_label(img),
            "split": img.split}


def _image_stats(images: Sequence[ImageLike]) -> dict:
    def spread(values: list[int]) -> dict | None:
        return {"min": min(values), "median": float(median(values)), "max": max(values)} if values else None

    return {
        "width": spread([img.width for img in images]),
        "height": spread([img.height for img in images]),
        "modes": dict(Counter(img.mode or "unknown" for img in images).most_common()),
        "formats": dict(Counter(img.format or "unknown" for img in images).most_common()),
    }
