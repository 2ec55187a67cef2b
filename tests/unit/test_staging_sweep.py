"""sweep_staging removes only what a dead upload left: staging folders untouched for the age limit."""
from __future__ import annotations

import logging
import os
import time

from service.store.blobs import BlobStore, sweep_staging


def aged(path, seconds: float):
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_only_staging_folders_untouched_for_the_limit_are_removed(tmp_path, caplog):
    blobs = BlobStore(tmp_path / "blobs")
    tmp_dir = tmp_path / "tmp"
    with blobs.staging(tmp_dir) as dead, blobs.staging(tmp_dir) as live, blobs.staging(tmp_dir) as young:
        dead.put(b"a" * 100)
        aged(next(dead.folder.iterdir()), 7200)
        aged(dead.folder, 7200)
        live.put(b"b")  # an old folder a live upload is still writing into
        aged(live.folder, 7200)
        young.put(b"c")
        other = tmp_dir / "not-staging"
        other.mkdir()
        aged(other, 7200)
        with caplog.at_level(logging.WARNING, logger="graft.store"):
            removed = sweep_staging(tmp_dir, max_age_s=3600)
        assert removed == [dead.folder] and not dead.folder.exists()
        assert live.folder.exists() and young.folder.exists() and other.exists()
        assert "1 files, 100 bytes" in caplog.text
    assert sorted(p.name for p in tmp_dir.iterdir()) == ["not-staging"]  # the live ones cleaned up after themselves
