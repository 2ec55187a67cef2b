"""Per-epoch training checkpoints, so a retried job resumes instead of starting over.

A checkpoint is written by `torch.save` of plain state dicts (tensors, numbers, lists) and read
back with `weights_only=True`: Graft wrote every file it loads, and nothing can unpickle code.
Files are named by the lease that wrote them; the job row says which one is current, and only a
worker that still holds the lease can point it there.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

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
    return settings.relative_to_data(final)


def read_checkpoint(settings: Settings, relative: str) -> dict:
    return torch.load(settings.data_path(relative), map_location="cpu", weights_only=True)


def remove_checkpoint(settings: Settings, relative: str) -> None:
    settings.data_path(relative).unlink(missing_ok=True)


def prune_checkpoints(settings: Settings, job_id: str, keep: str | None) -> None:
    """Remove every checkpoint file of the job except `keep` (all of them when None)."""
    folder = checkpoint_dir(settings, job_id)
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.glob("*"):
        if settings.relative_to_data(path) != keep:
            path.unlink(missing_ok=True)
