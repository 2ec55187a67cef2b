"""Per-epoch training checkpoints, so a retried job resumes instead of starting over.

A checkpoint is written by `torch.save` of plain state dicts (tensors, numbers, lists) and read
back with `weights_only=True`: Graft wrote every file it loads, and nothing can unpickle code.
Files are named by the lease that wrote them; the job row says which one is current, and only a
worker that still holds the lease can point it there. They are objects of the store
(service/store/objects.py): written locally, then committed (uploaded, with an object store), so
another machine's worker resumes from them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from service.store.objects import StorageUnavailable, store_for

if TYPE_CHECKING:
    from service.settings import Settings


def checkpoint_dir(settings: Settings, job_id: str) -> Path:
    return settings.checkpoints_dir / job_id


def write_checkpoint(settings: Settings, job_id: str, lease_token: str, epoch: int, state: dict) -> str:
    """Write atomically; returns the path as the job row stores it (relative to the data dir)."""
    folder = checkpoint_dir(settings, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{lease_token}-epoch{epoch}.pt"
    tmp = folder / f".{final.name}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, final)
    relative = settings.relative_to_data(final)
    try:
        store_for(settings).commit(relative)  # raises StorageUnavailable: the caller skips this checkpoint
    except StorageUnavailable:
        final.unlink(missing_ok=True)
        raise
    return relative


def read_checkpoint(settings: Settings, relative: str) -> dict:
    return torch.load(store_for(settings).fetch(relative), map_location="cpu", weights_only=True)


def remove_checkpoint(settings: Settings, relative: str) -> None:
    try:
        store_for(settings).delete(relative)
    except StorageUnavailable:  # a stale file no row points at: it costs space, never a job
        settings.data_path(relative).unlink(missing_ok=True)


def prune_checkpoints(settings: Settings, job_id: str, keep: str | None) -> None:
    """Remove every checkpoint file of the job except `keep` (all of them when None)."""
    storage = store_for(settings)
    prefix = settings.relative_to_data(checkpoint_dir(settings, job_id))
    try:
        if keep is None:
            storage.delete_prefix(prefix)
            return
        for key in storage.keys(prefix):
            if key != keep:
                storage.delete(key)
    except StorageUnavailable:  # best effort: files no row points at cost space, never a job
        if keep is None:
            shutil.rmtree(checkpoint_dir(settings, job_id), ignore_errors=True)
