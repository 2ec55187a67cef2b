"""Content-addressed file store: the same bytes are kept once, named by their sha256.

Uploads write through a Staging area (a private folder under the data dir's tmp/) and move their
files into the store only once the whole upload has been accepted, so a refused or failed upload
leaves nothing behind, and a half-written file is never visible under its final name. A process
killed mid-upload cannot clean up: `sweep_staging` removes what it left, at the next start-up.

The files are objects `blobs/<sha[:2]>/<sha>` of the object store (service/store/objects.py): in the
data dir, or in an S3 bucket with this machine's cache. Every read checks the bytes' sha256
against their name. With a bucket, staged files are uploaded by `commit` (in parallel, each object
whole or not at all) and only then counted as stored; the database row that refers to them is
committed after that, so a failure half-way leaves no visible dataset.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from service.store.objects import LocalObjects, ObjectCorrupt, store_for

if TYPE_CHECKING:
    from service.settings import Settings


STAGING_PREFIX = "upload-"
UPLOAD_THREADS = 16  # parallel PUTs (and GETs) to an object store: each waits on the network
log = logging.getLogger("graft.store")


class BlobCorrupt(ObjectCorrupt):
    """A stored image whose bytes no longer have the sha256 it is named by."""


class BlobStore:
    def __init__(self, root: Path, objects: LocalObjects | None = None):
        """`root`: the blobs folder in the data dir (the local default); or the settings' object store."""
        self.objects = objects or LocalObjects(root.parent)
        self.prefix = root.name if objects is None else "blobs"
        self.root = self.objects.local(self.prefix)

    @classmethod
    def for_settings(cls, settings: Settings) -> "BlobStore":
        return cls(settings.blobs_dir, store_for(settings))

    def key(self, sha256: str) -> str:
        return f"{self.prefix}/{sha256[:2]}/{sha256}"

    def path(self, sha256: str) -> Path:
        return self.objects.local(self.key(sha256))

    def exists(self, sha256: str) -> bool:
        return self.objects.exists(self.key(sha256))

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.exists(digest):
            fd, tmp = tempfile.mkstemp(dir=self._folder(digest), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                if self.objects.remote:
                    self.objects.put_file(self.key(digest), Path(tmp))
                else:
                    os.replace(tmp, self.path(digest))  # atomic: concurrent writers of the same bytes agree
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return digest

    def read(self, sha256: str) -> bytes:
        """The image's bytes, checked against their sha256 (raises BlobCorrupt, FileNotFoundError,
        StorageUnavailable)."""
        data = self.objects.fetch(self.key(sha256)).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            if self.objects.remote:
                self.path(sha256).unlink(missing_ok=True)  # a damaged cached copy: fetched again next time
            raise BlobCorrupt(f"stored image {sha256} does not match its sha256")
        return data

    def reader(self, shas: list[str]) -> Callable[[str], bytes]:
        """`read` for a job that will read all of `shas`: from an object store, the first read starts
        downloading every one of them in parallel into the cache."""
        if not self.objects.remote:
            return self.read
        started = threading.Lock()
        pool: list[ThreadPoolExecutor] = []

        def read(sha256: str) -> bytes:
            if started.acquire(blocking=False):
                pool.append(ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="graft-prefetch"))
                for sha in shas:
                    if not self.objects.known_locally(self.key(sha)):
                        pool[0].submit(_quietly, self.objects.fetch, self.key(sha))
                pool[0].shutdown(wait=False)
            return self.read(sha256)
        return read

    def delete(self, sha256: str) -> None:
        self.objects.delete(self.key(sha256))

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
        if digest not in self._staged and not self.store.objects.known_locally(self.store.key(digest)):
            (self.folder / digest).write_bytes(data)
            self._staged.add(digest)
        return digest

    def commit(self, keep: Iterable[str]) -> None:
        """Move the staged files named in `keep` into the store (same file system: atomic renames;
        an object store: parallel uploads of those it does not hold yet, then raises the first error)."""
        digests = set(keep) & self._staged
        if self.store.objects.remote:
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="graft-upload") as pool:
                for future in [pool.submit(self._upload, d) for d in digests]:
                    future.result()
        else:
            for digest in digests:
                os.replace(self.folder / digest, self.store._folder(digest) / digest)
        self._staged.clear()

    def _upload(self, digest: str) -> None:
        key = self.store.key(digest)
        if self.store.objects.exists(key):  # another upload stored the same bytes: keep ours in the cache
            target = self.store.path(digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.folder / digest, target)
        else:
            self.store.objects.put_file(key, self.folder / digest)


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


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # a prefetch that failed is read (and its error raised) by the job itself
        pass
