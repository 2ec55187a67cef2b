"""From a dataset's rows to decoded tensors: the split, then each image decoded exactly once."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from sqlalchemy import select

from service.blobs import BlobStore
from service.db import Database
from service.tables import Dataset, DatasetImage
from workers.backbones import Preprocessing
from workers.config import TrainConfig
from workers.errors import JobError
from workers.preprocessing import decode_square
from workers.training import Control, PreparedData


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


def prepare_data(db: Database, blobs: BlobStore, dataset_id: str, config: TrainConfig,
                 pre: Preprocessing, control: Control) -> PreparedData:
    with db.session() as s:
        dataset = s.get(Dataset, dataset_id)
        if dataset is None:
            raise JobError("dataset_missing", f"dataset {dataset_id} no longer exists")
        rows = s.execute(select(DatasetImage.sha256, DatasetImage.label, DatasetImage.split)
                         .where(DatasetImage.dataset_id == dataset_id)
                         .order_by(DatasetImage.id)).all()
        classes = list(dataset.classes)
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[r.label] for r in rows]
    splits = ([r.split or "train" for r in rows] if any(r.split == "val" for r in rows)
              else stratified_split(labels, config.val_fraction, config.seed))
    if "val" not in splits:
        raise JobError("no_validation_images", "the dataset has no images to validate on")
    control.progress({"phase": "decoding images", "images": len(rows)})
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # Pillow releases the GIL
        squares = list(pool.map(lambda r: decode_square(blobs.read(r.sha256), pre), rows))
    control.checkpoint()

    def pick(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [i for i, s in enumerate(splits) if s == split]
        return torch.stack([squares[i] for i in idx]), torch.tensor([labels[i] for i in idx])

    (train_x, train_y), (val_x, val_y) = pick("train"), pick("val")
    return PreparedData(classes, pre, train_x, train_y, val_x, val_y)
