"""From a dataset's rows to decoded tensors: the split, then each image decoded exactly once.

Decoding is the slow part of a short job (Lite0 trains faster on a GPU than Pillow decodes), so
the decoded uint8 squares are cached (`DecodedCache`, workers/decoded_cache.py): every later job on
the same images at the same preprocessing, on any dataset version that still has them in that
order, skips decoding. They are decoded a batch at a time straight into the cache's memory-mapped
file, and each split is a slice of it: a worker's memory does not grow with the dataset (issue 22).
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from workers.backbones import Preprocessing
from workers.config import TrainConfig
from workers.decoded_cache import (
    DEFAULT_MEMORY_BYTES,
    DecodedCache,
    chunk_rows,
    in_memory,
    layout_id,
)
from workers.errors import JobError
from workers.preprocessing import decode_square
from workers.progress import PhaseMeter
from workers.training.contract import Control, PreparedData


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> list[str]:
    """'train'/'val' per item: each class keeps at least one image on each side."""
    gen = torch.Generator().manual_seed(seed)
    splits = ["train"] * len(labels)
    for cls in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == cls]
        if len(members) < 2:
            continue
        order = torch.randperm(len(members), generator=gen).tolist()
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        for j in order[:n_val]:
            splits[members[j]] = "val"
    return splits


@dataclass(frozen=True)
class LabeledImage:
    sha256: str
    label: str
    split: str | None  # "train", "val", "test", or None: Graft splits it
    labels: tuple[str, ...] | None = None  # a multi-label dataset's image: its labels, maybe none (issue 17)


@dataclass(frozen=True)
class DatasetImages:
    """A dataset version as training reads it (the catalog builds it from its rows)."""
    classes: list[str]
    images: list[LabeledImage]  # in upload order: the decoded cache's key depends on it
    unlabeled: list[str] = field(default_factory=list)  # sha256s of the images without a label (issue 16)
    multi_label: bool = False  # each image has any of the classes (LabeledImage.labels; issue 17)


def decoded_batches(read: Callable[[str], bytes], image_shas: list[str], pre: Preprocessing, batch: int,
                    on_decoded: Callable[[int], None] | None = None,
                    control: Control | None = None) -> Iterator[torch.Tensor]:
    """The images decoded in order, in parallel threads (decoders release the GIL), `batch` at a
    time: uint8 [k, 3, S, S] each, a new tensor per batch. Each thread decodes into its image's row
    of the batch, and the next batch is decoding while this one is used (two in memory at most).
    `on_decoded(1)` is called, on this thread, as each image is ready (in order); `control` may
    stop the job between batches."""
    side, n = pre.resize_size, len(image_shas)

    def decode_into(rows: torch.Tensor, j: int, sha: str) -> None:
        rows[j] = decode_square(read(sha), pre)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        def start(first: int) -> tuple[torch.Tensor, list] | None:
            if first >= n:
                return None
            shas = image_shas[first:first + batch]
            rows = torch.empty((len(shas), 3, side, side), dtype=torch.uint8)
            return rows, [pool.submit(decode_into, rows, j, sha) for j, sha in enumerate(shas)]

        upcoming = start(0)
        try:
            for first in range(0, n, batch):
                rows, futures = upcoming
                upcoming = start(first + batch)
                for future in futures:
                    future.result()
                    if on_decoded is not None:
                        on_decoded(1)
                yield rows
                if control is not None:
                    control.stop_if_asked()
        finally:
            for future in (upcoming[1] if upcoming else []):
                future.cancel()


def prepare_data(dataset: DatasetImages, read: Callable[[str], bytes], config: TrainConfig,
                 pre: Preprocessing, control: Control, cache: DecodedCache | None = None,
                 owner: str = "") -> PreparedData:
    """The dataset's images decoded (`read` gives an image's bytes by sha256) and split. What is
    cached of them (decoded pixels; through `source_key`, a probe's features) is the owner's alone.

    The rows are laid out as the job reads them: its train images, then val, then test (each in
    upload order), so every split is a slice of one array: of the decoded cache's memory map when
    there is a cache (nothing of the dataset is then held in this process's memory), else of one
    tensor. The images are decoded once, a batch at a time, straight into it."""
    rows, classes = dataset.images, list(dataset.classes)
    index = {c: i for i, c in enumerate(classes)}
    targets = multi_hot(rows, index) if dataset.multi_label else None  # issue 17: [N, classes] of 0/1
    # What the split stratifies by: the class, or a multi-label image's rarest label.
    labels = rarest_labels(targets) if targets is not None else [index[r.label] for r in rows]
    val_given = any(r.split == "val" for r in rows)
    splits = _assign_splits(rows, labels, val_given, config)
    if "val" not in splits:
        raise JobError("no_validation_images", "the dataset has no images to validate on")
    shas = [r.sha256 for r in rows]
    key = DecodedCache.key(shas, pre, owner)
    order = np.array([i for split in _SPLITS for i, s in enumerate(splits) if s == split], dtype=np.int64)
    images = _decoded(read, shas, pre, order, key, control, cache)
    control.stop_if_asked()
    n_train, n_val, n_test = (splits.count(split) for split in _SPLITS)
    y = (targets[torch.from_numpy(order)] if targets is not None
         else torch.tensor([labels[i] for i in order.tolist()], dtype=torch.long))
    train_x, train_y = images[:n_train], y[:n_train]
    val_x, val_y = images[n_train:n_train + n_val], y[n_train:n_train + n_val]
    test_x, test_y = (images[n_train + n_val:], y[n_train + n_val:]) if n_test else (None, None)
    # The pixels (the decoded cache's key: owner, decoder, preprocessing, ordered sha256s) and the split.
    source_key = hashlib.sha256(f"{key}:{','.join(splits)}".encode()).hexdigest()
    ids = {split: [sha for sha, s in zip(shas, splits) if s == split] for split in _SPLITS}
    unlabeled_x, unlabeled_ids = _unlabeled(dataset, read, config, pre, control, cache, owner)
    return PreparedData(classes, pre, train_x, train_y, val_x, val_y, source_key, val_given=val_given,
                        test_x=test_x, test_y=test_y, train_ids=ids["train"], val_ids=ids["val"],
                        test_ids=ids["test"] if test_x is not None else None,
                        unlabeled_x=unlabeled_x, unlabeled_ids=unlabeled_ids, multi_label=targets is not None)


def multi_hot(rows: list[LabeledImage], index: dict[str, int]) -> torch.Tensor:
    """float32 [N, classes]: 1 where the image has the label (issue 17)."""
    y = torch.zeros(len(rows), len(index), dtype=torch.float32)
    for i, r in enumerate(rows):
        for label in r.labels or ():
            y[i, index[label]] = 1.0
    return y


def rarest_labels(y: torch.Tensor) -> list[int]:
    """Each image's rarest label (classes: it has none): stratifying by it spreads every label,
    the rare ones first, over train and val (and over folds)."""
    counts = y.sum(0)
    rank = torch.where(y > 0, counts[None, :], torch.full_like(y, float("inf")))
    rarest = rank.argmin(1)
    return torch.where(y.sum(1) > 0, rarest, torch.full_like(rarest, y.shape[1])).tolist()


def _unlabeled(dataset: DatasetImages, read, config: TrainConfig, pre: Preprocessing, control: Control,
               cache: DecodedCache | None, owner: str) -> tuple[torch.Tensor | None, list[str] | None]:
    """The unlabeled images decoded (issue 16), when the job may learn from them: strategy auto and
    `unlabeled` not "ignore". They are a block of their own, apart from every split."""
    if (not dataset.unlabeled or config.unlabeled == "ignore" or config.strategy != "auto"
            or getattr(dataset, "multi_label", False)):  # multi-label: no self-training (yet)
        return None, None
    shas = list(dataset.unlabeled)
    key = DecodedCache.key(shas, pre, owner)
    return _decoded(read, shas, pre, np.arange(len(shas), dtype=np.int64), key, control, cache), shas


_SPLITS = ("train", "val", "test")


def _decoded(read: Callable[[str], bytes], shas: list[str], pre: Preprocessing, order: np.ndarray, key: str,
             control: Control, cache: DecodedCache | None) -> torch.Tensor:
    """uint8 [N, 3, S, S]: row j is image order[j]; from the cache (the same layout, or the same
    pixels in another layout, copied a batch at a time), else decoded into it (or into memory)."""
    side = pre.resize_size
    shape = (len(order), 3, side, side)
    batch = chunk_rows(cache.memory_bytes if cache is not None else DEFAULT_MEMORY_BYTES, 3 * side * side)
    in_order = [shas[i] for i in order.tolist()]

    def decode() -> Iterator[torch.Tensor]:
        meter = PhaseMeter(control, "decoding images", len(order), "images")
        return decoded_batches(read, in_order, pre, batch, on_decoded=meter, control=control)

    if cache is None:
        return in_memory(shape, decode())
    name = f"{key}.{layout_id(order)}"
    if (images := cache.get(name)) is not None:
        return images
    if (other := cache.find_layout(key)) is not None:
        source, source_order = other
        where = np.empty(len(source_order), dtype=np.int64)
        where[source_order] = np.arange(len(source_order))
        rows = torch.from_numpy(where[order])
        return cache.build(name, shape, lambda: (source[rows[i:i + batch]] for i in range(0, len(rows), batch)),
                           order)
    return cache.build(name, shape, decode, order)


def _assign_splits(rows, labels: list[int], val_given: bool, config: TrainConfig) -> list[str]:
    """'train'/'val'/'test' per row. Test rows stay test; without a user's val split, val is held
    out of the other rows only, exactly as if the test rows were not there."""
    if val_given:
        return [r.split or "train" for r in rows]
    pool = [y for r, y in zip(rows, labels) if r.split != "test"]
    drawn = iter(stratified_split(pool, config.val_fraction, config.seed))
    return ["test" if r.split == "test" else next(drawn) for r in rows]
