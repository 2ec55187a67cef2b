"""Where Graft keeps its files: the data dir (the embedded default) or an S3-compatible bucket.

Every stored file has a key, its path relative to the data dir as the database records it
(`blobs/ab/ab12…`, `models/<id>/model.safetensors`, `checkpoints/<job>/<file>`, `exports/<zip>`,
`batch_predictions/<job>/results.csv`). Code writes a file at `local(key)` (atomically, as
before), then `commit(key)`; it reads through `fetch(key)`, which gives a local path.

- `LocalObjects`: the data dir itself. `commit` has nothing left to do: the file is in place.
- `S3Objects` (GRAFT_STORAGE_URL=s3://bucket/prefix; endpoint and credentials from the standard
  AWS variables, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...): `local()` is a cache folder of this
  process's machine (data_dir/cache/objects), so nothing needs a shared filesystem. `commit`
  uploads with the file's sha256 in the object's metadata, in one PUT: an object is visible whole
  or not at all. `fetch` downloads into the cache, checks the sha256 before the file takes its
  name, and keeps at most GRAFT_STORAGE_CACHE_MB there (least recently used files go first).

A store that cannot be reached (connection refused, timeouts, 5xx, throttling, refused
credentials) raises StorageUnavailable: the API answers 503 with Retry-After, a worker puts its
job back in the queue for later. A key that is not there raises ObjectMissing (a
FileNotFoundError, as a missing local file would).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator
from urllib.parse import urlsplit

from service.errors import GraftError

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("graft.storage")
SHA256_META = "sha256"  # x-amz-meta-sha256 on every object Graft writes
CHUNK = 1 << 20
EVICT_MIN_AGE_S = 60.0  # a cached file this young may be one a writer has not committed yet


class StorageUnavailable(GraftError):
    """The object store cannot be reached or refused the request: try again later (503)."""

    status, code = 503, "storage_unavailable"

    def __init__(self, detail: str, retry_after_s: float = 5.0):
        super().__init__(detail, headers={"Retry-After": str(max(1, round(retry_after_s)))})
        self.retry_after_s = retry_after_s


class ObjectMissing(FileNotFoundError):
    """No object under this key."""


class ObjectCorrupt(Exception):
    """The bytes read do not have the sha256 they were stored with."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class LocalObjects:
    """The data dir: files stay where the code wrote them."""

    remote = False

    def __init__(self, root: Path):
        self.root = root

    @property
    def url(self) -> str:
        return str(self.root.resolve())

    def local(self, key: str) -> Path:
        return self.root / key

    def commit(self, key: str) -> None:
        """Make the file written at local(key) the stored object (here: it already is)."""

    def commit_tree(self, prefix: str) -> None:
        """Commit every file of the folder local(prefix)."""

    def fetch(self, key: str) -> Path:
        """A local path holding the object (raises ObjectMissing)."""
        path = self.local(key)
        if not path.is_file():
            raise ObjectMissing(f"no stored file {key}")
        return path

    def fetch_files(self, prefix: str, names: Iterable[str]) -> Path:
        """The local folder of prefix, holding each of `names` (raises ObjectMissing)."""
        for name in names:
            self.fetch(f"{prefix}/{name}")
        return self.local(prefix)

    def exists(self, key: str) -> bool:
        return self.local(key).is_file()

    def known_locally(self, key: str) -> bool:
        """Stored, as far as this machine can tell without asking the store."""
        return self.exists(key)

    def keys(self, prefix: str) -> list[str]:
        """Keys of the stored files under the folder `prefix`."""
        folder = self.local(prefix)
        if not folder.is_dir():
            return []
        return sorted(f"{prefix.rstrip('/')}/{p.relative_to(folder)}" for p in folder.rglob("*") if p.is_file())

    def delete(self, key: str) -> None:
        self.local(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Every object under the folder `prefix`, and the folder."""
        if prefix.strip("/") and ".." not in Path(prefix).parts:
            shutil.rmtree(self.local(prefix), ignore_errors=True)

    def check(self) -> dict:
        """For /readyz: the store takes writes."""
        folder = self.local("models")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".readyz-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
        return {"storage": "local", "free_bytes": shutil.disk_usage(self.root).free}


class S3Objects(LocalObjects):
    """An S3-compatible bucket, with this machine's cache folder as local()."""

    remote = True

    def __init__(self, url: str, cache_root: Path, cache_bytes: int, *, timeout_s: float = 10.0,
                 max_attempts: int = 3, retry_after_s: float = 5.0, client=None):
        super().__init__(cache_root)
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"GRAFT_STORAGE_URL must be s3://bucket[/prefix], not {url!r}")
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.cache_bytes, self.retry_after_s = cache_bytes, retry_after_s
        self._url = url
        self._client = client or _s3_client(timeout_s, max_attempts)
        self._cache_lock = threading.Lock()
        self._cached: int | None = None  # bytes in the cache, counted on first use

    @property
    def url(self) -> str:
        return self._url

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """botocore's errors as Graft's: missing, or unavailable (never a bare 500)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if err.get("Code") in ("NoSuchKey", "404", "NotFound") or status == 404 and err.get("Code") != "NoSuchBucket":
                raise ObjectMissing(f"no stored object {what}") from None
            log.warning("object store refused %s: %s %s", what, err.get("Code"), err.get("Message"),
                        extra={"action": "storage_error"})
            raise StorageUnavailable(f"the object store refused {what} ({err.get('Code') or status}); "
                                     "try again shortly", self.retry_after_s) from None
        except (BotoCoreError, ConnectionError, TimeoutError) as exc:
            log.warning("object store unreachable for %s: %s", what, exc, extra={"action": "storage_error"})
            raise StorageUnavailable(f"the object store cannot be reached ({type(exc).__name__}); "
                                     "try again shortly", self.retry_after_s) from None

    # -- writes -------------------------------------------------------------------------------
    def commit(self, key: str) -> None:
        path = self.local(key)
        digest, size = sha256_of(path), path.stat().st_size
        with self._errors(f"writing {key}"), open(path, "rb") as body:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, ContentLength=size,
                                    Metadata={SHA256_META: digest})
        self._count(size)

    def commit_tree(self, prefix: str) -> None:
        folder = self.local(prefix)
        for path in sorted(folder.iterdir()):
            if path.is_file():
                self.commit(f"{prefix}/{path.name}")

    def put_file(self, key: str, source: Path) -> None:
        """Upload `source` as `key`, then move it into the cache (staged blobs)."""
        digest, size = sha256_of(source), source.stat().st_size
        with self._errors(f"writing {key}"), open(source, "rb") as body:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, ContentLength=size,
                                    Metadata={SHA256_META: digest})
        target = self.local(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        self._count(size)

    def delete(self, key: str) -> None:
        with self._errors(f"deleting {key}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        super().delete(key)

    def delete_prefix(self, prefix: str) -> None:
        keys = self.keys(prefix)
        with self._errors(f"deleting {prefix}"):
            for i in range(0, len(keys), 1000):
                self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._key(k)} for k in keys[i:i + 1000]], "Quiet": True})
        super().delete_prefix(prefix)

    # -- reads --------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectMissing:
            return False
        return True

    def known_locally(self, key: str) -> bool:
        return self.local(key).is_file()

    def keys(self, prefix: str) -> list[str]:
        folder = prefix.rstrip("/") + "/"
        out: list[str] = []
        with self._errors(f"listing {prefix}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=self._key(folder)):
                out += [obj["Key"][len(self._key("")):] for obj in page.get("Contents", [])]
        return sorted(out)

    def fetch(self, key: str) -> Path:
        path = self.local(key)
        if path.is_file():
            try:
                os.utime(path)  # most recently used: evicted last
                return path
            except FileNotFoundError:
                pass  # evicted by another process meanwhile
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            with self._errors(f"reading {key}"):
                answer = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
                expected = answer.get("Metadata", {}).get(SHA256_META)
                h = hashlib.sha256()
                with open(tmp, "wb") as f:
                    for block in answer["Body"].iter_chunks(CHUNK):
                        h.update(block)
                        f.write(block)
            if expected is None or h.hexdigest() != expected:
                raise ObjectCorrupt(f"stored object {key} has sha256 {h.hexdigest()}, "
                                    f"expected {expected or '(none recorded)'}")
            os.replace(tmp, path)  # only verified bytes ever take the name
        finally:
            tmp.unlink(missing_ok=True)
        self._count(path.stat().st_size)
        return path

    def fetch_files(self, prefix: str, names: Iterable[str]) -> Path:
        for name in names:
            self.fetch(f"{prefix}/{name}")
        return self.local(prefix)

    def check(self) -> dict:
        key = f".readyz/{uuid.uuid4().hex}"
        with self._errors("a readiness probe"):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=b"", Metadata={SHA256_META: ""})
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return {"storage": self.url}

    # -- the local cache ------------------------------------------------------------------------
    def _count(self, added: int) -> None:
        with self._cache_lock:
            if self._cached is None:
                self._cached = sum(size for _, size, _ in _cache_files(self.root))
            else:
                self._cached += added
            if self._cached <= self.cache_bytes:
                return
            self._cached = _evict(self.root, int(self.cache_bytes * 0.9))


def _cache_files(root: Path) -> list[tuple[float, int, Path]]:
    files = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, path))
    return files


def _evict(root: Path, target: int) -> int:
    """Remove the least recently used cached files until `target` bytes remain; returns what is left.
    Hidden files (temps, a batch job's partial results) and young ones may be writers' and stay."""
    files = _cache_files(root)
    total = sum(size for _, size, _ in files)
    now = time.time()
    for mtime, size, path in sorted(files):
        if total <= target:
            break
        if path.name.startswith(".") or now - mtime < EVICT_MIN_AGE_S:
            continue
        path.unlink(missing_ok=True)
        total -= size
    return total


def _s3_client(timeout_s: float, max_attempts: int):
    import boto3
    from botocore.config import Config

    # boto3 reads AWS_ENDPOINT_URL(_S3), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION itself.
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    s3={"addressing_style": os.environ.get("GRAFT_S3_ADDRESSING_STYLE", "path")})
    return boto3.session.Session().client("s3", config=config)


def store_for(settings: Settings) -> LocalObjects:
    """The one store of these settings in this process (clients and cache counts are shared)."""
    return _store(settings.storage_url, settings.objects_root, settings.storage_cache_mb,
                  settings.storage_timeout_s, settings.storage_max_attempts, settings.storage_retry_after_s)


@lru_cache(maxsize=16)
def _store(url: str, root: Path, cache_mb: int, timeout_s: float, max_attempts: int,
           retry_after_s: float) -> LocalObjects:
    if not url:
        return LocalObjects(root)
    return S3Objects(url, root, cache_mb * 2**20, timeout_s=timeout_s, max_attempts=max_attempts,
                     retry_after_s=retry_after_s)
