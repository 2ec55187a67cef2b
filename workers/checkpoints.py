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

import torch


def checkpoint_dir(data_dir: Path, job_id: str) -> Path:
    return data_dir / "checkpoints" / job_id


def write_checkpoint(data_dir: Path, job_id: str, lease_token: str, epoch: int, state: dict) -> str:
    """Write atomically; returns the path relative to the data dir."""
    folder = checkpoint_dir(data_dir, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{lease_token}-epoch{epoch}.pt"
    tmp = folder / f".{final.name}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, final)
    return str(final.relative_to(data_dir))


def read_checkpoint(data_dir: Path, relative: str) -> dict:
    return torch.load(data_dir / relative, map_location="cpu", weights_only=True)


def prune_checkpoints(data_dir: Path, job_id: str, keep: str | None) -> None:
    """Remove every checkpoint file of the job except `keep` (all of them when None)."""
    folder = checkpoint_dir(data_dir, job_id)
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.glob("*"):
        if str(path.relative_to(data_dir)) != keep:
            path.unlink(missing_ok=True)
