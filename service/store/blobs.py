"""Content-addressed file store: the same bytes are kept once, named by their sha256.

Uploads write through a Staging area (a private folder under the data dir's tmp/) and move their
files into the store only once the whole upload has been accepted, so a refused or failed upload
leaves nothing behind, and a half-written file is never visible under its final name. A process
killed mid-upload cannot clean up: `sweep_staging` removes what it left, at the next start-up.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


STAGING_PREFIX = "upload-"
log = logging.getLogger("graft.store")


class BlobStore:
    def __init__(self, root: Path):
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.exists(digest):
            fd, tmp = tempfile.mkstemp(dir=self._folder(digest), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path(digest))  # atomic: concurrent writers of the same bytes agree
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return digest

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    @contextmanager
    def staging(self, tmp_dir: Path) -> Iterator["Staging"]:
        """A private folder for one upload's files; removed on exit, whatever happened."""
        folder = tmp_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        try:
            yield Staging(self, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _folder(self, sha256: str) -> Path:
        folder = self.path(sha256).parent
        folder.mkdir(parents=True, exist_ok=True)
        return folder


class Staging:
    """Files of one upload, held back until `commit` moves the accepted ones into the store."""

    def __init__(self, store: BlobStore, folder: Path):
        self.store, self.folder = store, folder
        self._staged: set[str] = set()

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self._staged and not self.store.exists(digest):
            (self.folder / digest).write_bytes(data)
            self._staged.add(digest)
        return digest

    def commit(self, keep: Iterable[str]) -> None:
        """Move the staged files named in `keep` into the store (same file system: atomic renames)."""
        for digest in set(keep) & self._staged:
            os.replace(self.folder / digest, self.store._folder(digest) / digest)
        self._staged.clear()


def sweep_staging(tmp_dir: Path, max_age_s: float) -> list[Path]:
    """Remove the staging folders that killed processes left behind (their `finally` never ran):
    those untouched for max_age_s. A live upload writes into its folder as it goes, so it stays
    younger, even one of another process sharing this data dir."""
    removed = []
    for folder in tmp_dir.glob(f"{STAGING_PREFIX}*"):
        try:
            age = time.time() - _last_change(folder)
            if age <= max_age_s:
                continue
            files = [f.stat().st_size for f in folder.iterdir()]
        except (FileNotFoundError, NotADirectoryError):  # finished meanwhile, or not ours
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.warning("removed %s, left by a process that died mid-upload: %d files, %d bytes, %.0f s old",
                    folder, len(files), sum(files), age,
                    extra={"action": "sweep_staging", "files": len(files), "bytes": sum(files)})
    return removed


def _last_change(folder: Path) -> float:
    """The newest mtime of a folder and of the files in it."""
    return max([folder.stat().st_mtime] + [entry.stat().st_mtime for entry in os.scandir(folder)])
