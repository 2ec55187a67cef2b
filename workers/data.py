"""From a dataset's rows to decoded tensors: the split, then each image decoded exactly once.

Decoding is the slow part of a short job (Lite0 trains faster on a GPU than Pillow decodes), so
the decoded uint8 squares are cached (`DecodedCache`): every later job on the same images at the
same preprocessing, on any dataset version that still has them in that order, skips decoding.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workers.backbones import Preprocessing
from workers.config import TrainConfig
from workers.errors import JobError
from workers.preprocessing import decode_square
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


log = logging.getLogger("graft.worker")

# Part of every cache key: bump it when decode_square's output changes for the same bytes.
DECODER_VERSION = 3  # 2: torch's resize instead of Pillow's; 3: TorchCodec decodes most JPEGs


class DecodedCache:
    """Decoded uint8 squares [N, 3, S, S] of an ordered list of images at one preprocessing.

    On disk as safetensors (no pickle) under `root`, named by the sha256 of the decoder version,
    the resize size, the interpolation and the images' blob sha256s in order; files beyond
    `max_bytes` are removed oldest-used first. The last `memory_entries` (within `max_bytes`, but
    always the newest) stay in this process's memory, so a warm worker re-running a dataset reads
    nothing at all.
    """

    def __init__(self, root: Path, max_bytes: int, memory_entries: int = 2):
        self.root, self.max_bytes, self.memory_entries = root, max_bytes, memory_entries
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(image_shas: list[str], pre: Preprocessing, owner: str = "") -> str:
        """`owner` (the job's project) keeps tenants apart: a hit on another project's images would
        tell a tenant, by its speed or by `features_reused`, what someone else trained on."""
        h = hashlib.sha256(f"v{DECODER_VERSION}:{owner}:{pre.resize_size}:{pre.interpolation}:".encode())
        for sha in image_shas:
            h.update(sha.encode())
        return h.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        path = self.root / f"{key}.safetensors"
        try:
            images = load_file(str(path))["images"]
            os.utime(path)  # most recently used: evicted last
        except (OSError, KeyError, SafetensorError):  # absent, or a damaged file: decode again
            return None
        self._remember(key, images)
        return images

    def put(self, key: str, images: torch.Tensor) -> None:
        self._remember(key, images)
        if images.nbytes > self.max_bytes:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        try:
            save_file({"images": images.contiguous()}, str(tmp))
            os.replace(tmp, self.root / f"{key}.safetensors")  # readers never see half a file
        except OSError:  # a full disk costs a decode next time, never the job
            log.warning("could not write the decoded-image cache", exc_info=True)
            tmp.unlink(missing_ok=True)
            return
        self._evict()

    def _remember(self, key: str, images: torch.Tensor) -> None:
        with self._lock:
            self._memory[key] = images
            self._memory.move_to_end(key)
            # the newest stays (its job holds it anyway); older ones go beyond the count or the bytes
            while len(self._memory) > 1 and (len(self._memory) > self.memory_entries or
                                             sum(t.nbytes for t in self._memory.values()) > self.max_bytes):
                self._memory.popitem(last=False)

    def _evict(self) -> None:
        files = []
        for path in self.root.glob("*.safetensors"):
            try:
                st = path.stat()
            except OSError:
                continue  # removed by another worker meanwhile
            files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


@dataclass(frozen=True)
class LabeledImage:
    sha256: str
    label: str
    split: str | None  # "train", "val", "test", or None: Graft splits it


@dataclass(frozen=True)
class DatasetImages:
    """A dataset version as training reads it (the catalog builds it from its rows)."""
    classes: list[str]
    images: list[LabeledImage]  # in upload order: the decoded cache's key depends on it


def decode_all(read: Callable[[str], bytes], image_shas: list[str], pre: Preprocessing) -> torch.Tensor:
    """Decode each image once, in parallel threads (decoders release the GIL), into one uint8 tensor."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        squares = list(pool.map(lambda sha: decode_square(read(sha), pre), image_shas))
    return torch.stack(squares)


def prepare_data(dataset: DatasetImages, read: Callable[[str], bytes], config: TrainConfig,
                 pre: Preprocessing, control: Control, cache: DecodedCache | None = None,
                 owner: str = "") -> PreparedData:
    """The dataset's images decoded (`read` gives an image's bytes by sha256) and split. What is
    cached of them (decoded pixels; through `source_key`, a probe's features) is the owner's alone."""
    rows, classes = dataset.images, list(dataset.classes)
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[r.label] for r in rows]
    val_given = any(r.split == "val" for r in rows)
    splits = _assign_splits(rows, labels, val_given, config)
    if "val" not in splits:
        raise JobError("no_validation_images", "the dataset has no images to validate on")
    shas = [r.sha256 for r in rows]
    key = DecodedCache.key(shas, pre, owner)
    images = cache.get(key) if cache is not None else None
    if images is None:
        control.progress({"phase": "decoding images", "images": len(rows)})
        images = decode_all(read, shas, pre)
        if cache is not None:
            cache.put(key, images)
    control.stop_if_asked()

    def pick(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([i for i, s in enumerate(splits) if s == split], dtype=torch.long)
        return images[idx], torch.tensor([labels[i] for i in idx.tolist()])

    (train_x, train_y), (val_x, val_y) = pick("train"), pick("val")
    test_x, test_y = pick("test") if "test" in splits else (None, None)
    # The pixels (the decoded cache's key: owner, decoder, preprocessing, ordered sha256s) and the split.
    source_key = hashlib.sha256(f"{key}:{','.join(splits)}".encode()).hexdigest()
    return PreparedData(classes, pre, train_x, train_y, val_x, val_y, source_key, val_given=val_given,
                        test_x=test_x, test_y=test_y)


def _assign_splits(rows, labels: list[int], val_given: bool, config: TrainConfig) -> list[str]:
    """'train'/'val'/'test' per row. Test rows stay test; without a user's val split, val is held
    out of the other rows only, exactly as if the test rows were not there."""
    if val_given:
        return [r.split or "train" for r in rows]
    pool = [y for r, y in zip(rows, labels) if r.split != "test"]
    drawn = iter(stratified_split(pool, config.val_fraction, config.seed))
    return ["test" if r.split == "test" else next(drawn) for r in rows]
