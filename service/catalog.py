"""Datasets, jobs and models as the API reads and writes them (lookups raise NotFound)."""
from __future__ import annotations

from collections import Counter

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import InvalidInput, NotFound
from service.ingest import IngestResult
from service.tables import Dataset, DatasetImage, Job, Model

# Training needs one image to learn from and one to validate on, per class.
MIN_IMAGES_PER_CLASS = 2


def get_or_404(session: Session, table, id_: str, what: str):
    obj = session.get(table, id_)
    if obj is None:
        raise NotFound(f"no {what} with id {id_!r}")
    return obj


def create_dataset(session: Session, name: str, result: IngestResult) -> Dataset:
    counts = Counter(img.label for img in result.images)
    if len(counts) < 2:
        found = ", ".join(f"{k!r} ({v})" for k, v in counts.items()) or "none"
        raise InvalidInput(f"a dataset needs at least 2 classes with usable images; found {found}",
                           rejected=result.rejected)
    split_counts: dict[str, Counter] = {}
    for img in result.images:
        split_counts.setdefault(img.split or "unsplit", Counter())[img.label] += 1
    if result.has_val_split:
        no_train = sorted(set(counts) - set(split_counts.get("train", {})))
        if no_train:
            raise InvalidInput(f"class(es) {', '.join(map(repr, no_train))} have no images under train/; "
                               "every class needs training images", rejected=result.rejected)
    else:
        too_few = sorted(k for k, v in counts.items() if v < MIN_IMAGES_PER_CLASS)
        if too_few:
            raise InvalidInput(f"class(es) {', '.join(map(repr, too_few))} have fewer than "
                               f"{MIN_IMAGES_PER_CLASS} usable images; each class needs at least "
                               f"{MIN_IMAGES_PER_CLASS} (one to train on, one to validate)",
                               rejected=result.rejected)
    dataset = Dataset(name=name, classes=sorted(counts), class_counts=dict(sorted(counts.items())),
                      split_counts={k: dict(sorted(v.items())) for k, v in split_counts.items()},
                      num_images=len(result.images), has_val_split=result.has_val_split,
                      rejected=result.rejected)
    session.add(dataset)
    session.flush()
    session.add_all(DatasetImage(dataset_id=dataset.id, sha256=i.sha256, label=i.label, split=i.split,
                                 original_name=i.original_name, width=i.width, height=i.height)
                    for i in result.images)
    return dataset


def list_rows(session: Session, table, limit: int, offset: int) -> list:
    return list(session.scalars(select(table).order_by(table.created_at.desc()).limit(limit).offset(offset)))
