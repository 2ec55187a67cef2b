"""The decoded-image cache: a dataset's uint8 squares in one memory-mapped file, built in batches.

A job's images are decoded once into a file under the cache folder, a batch at a time, and then
read through a memory map: a worker never holds a dataset's pixels in its own memory, whatever
the number of images (issue 22). The file's rows are laid out in the order a job reads them
(its train rows, then val, then test: `workers.data.prepare_data`), so each split is one slice
of the map and costs no copy; the same images in another layout (another seed or val fraction)
are copied from an existing file, a batch at a time, instead of decoded again.

Memory (`memory_bytes`, GRAFT_WORKER_MEMORY_MB): the pages of a map that a job has read stay in
the kernel's page cache (shared, reclaimable), but they would count in the worker's RSS while
mapped. So up to half the budget of recently used maps stays resident, as an in-memory cache
would, and the pages of the others are handed back to the page cache (MADV_DONTNEED) every
`RELEASE_EVERY_S`; a later read of them is a minor page fault. Decoding holds two batches of
`memory_bytes / 16` (one written while the next decodes).

File format (`<name>.u8`, little-endian): a 64-byte header (magic "GRAFTU8\\0", format version,
rows, channels, height, width, data offset), the rows' order (u32 each: the position of the row's
image in the list the cache key was made from), the pixels from the data offset (a multiple of
4096), then the end marker "GRAFTEND". A file is written under a temporary name that its writer
holds an exclusive flock on, fsynced and renamed into place, so no reader ever sees part of one;
a file whose header, exact size or end marker is wrong (truncated, overwritten) is deleted when it
is opened and built again: it is never read as pixels. Temporary files whose writer died (no
flock held) are swept with the eviction. Graft never changes a file in place (so a worker may map
it while another deletes or replaces it); a file truncated by hand under a running worker would
end that worker's next read of it with SIGBUS, as with any memory-mapped file.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable

import numpy as np
import torch

if TYPE_CHECKING:  # no timm import for what only reads and writes files
    from workers.backbones import Preprocessing

log = logging.getLogger("graft.worker")

# Part of every cache key: bump it when decode_square's output changes for the same bytes.
DECODER_VERSION = 3  # 2: torch's resize instead of Pillow's; 3: TorchCodec decodes most JPEGs
FORMAT_VERSION = 1
MAGIC, END = b"GRAFTU8\x00", b"GRAFTEND"
_HEADER = struct.Struct("<8sI4xQQQQQ")  # magic, version, rows, channels, height, width, data offset
HEADER_BYTES = 64
PAGE = 4096
SUFFIX = ".u8"
TMP_PREFIX = ".tmp-"
DEFAULT_MEMORY_BYTES = 1024 * 2**20  # Settings.worker_memory_mb's default
RELEASE_EVERY_S = 0.5


def data_offset(rows: int) -> int:
    return -(-(HEADER_BYTES + 4 * rows) // PAGE) * PAGE


def file_bytes(shape: tuple[int, ...]) -> int:
    """The size of a cache file holding uint8 images of `shape` [N, C, H, W]."""
    return data_offset(shape[0]) + int(np.prod(shape)) + len(END)


def chunk_rows(memory_bytes: int, row_bytes: int) -> int:
    """Images per batch when an entry is built: a sixteenth of the memory budget."""
    return max(8, min(4096, memory_bytes // 16 // max(row_bytes, 1)))


def layout_id(order: np.ndarray) -> str:
    """A short name for a row order (which image each row holds)."""
    return hashlib.sha256(np.ascontiguousarray(order, dtype="<u4").tobytes()).hexdigest()[:16]


Chunks = Callable[[], Iterable[torch.Tensor]]  # makes the uint8 batches [k, C, H, W] of an entry, in row order


class DecodedCache:
    """Decoded uint8 squares [N, 3, S, S] by name, memory-mapped from files under `root`.

    Names are `<key>.<layout>`: `key` (below) says which pixels, the layout in which row order.
    Files beyond `max_bytes` are removed oldest-used first (a job that has one mapped keeps
    reading it). The last `memory_entries` opened stay open in this process, so a warm worker
    re-running a dataset opens nothing. An entry larger than `max_bytes` (or with max_bytes 0)
    is kept in memory when it fits half of `memory_bytes`, else written to a scratch file that
    is deleted as soon as it is mapped: it serves its job, and no later one.
    """

    def __init__(self, root: Path, max_bytes: int, memory_entries: int = 2,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.root, self.max_bytes, self.memory_entries = Path(root), max_bytes, memory_entries
        self.memory_bytes = memory_bytes
        self._open: OrderedDict[str, tuple[torch.Tensor, mmap.mmap | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.pager = Pager(self.resident_bytes)

    @staticmethod
    def key(image_shas: list[str], pre: Preprocessing, owner: str = "") -> str:
        """`owner` (the job's project) keeps tenants apart: a hit on another project's images would
        tell a tenant, by its speed or by `features_reused`, what someone else trained on."""
        h = hashlib.sha256(f"v{DECODER_VERSION}:{owner}:{pre.resize_size}:{pre.interpolation}:".encode())
        for sha in image_shas:
            h.update(sha.encode())
        return h.hexdigest()

    @property
    def resident_bytes(self) -> int:
        """Decoded images kept in this process's memory (resident pages of maps, or tensors)."""
        return self.memory_bytes // 2

    def get(self, name: str) -> torch.Tensor | None:
        with self._lock:
            if name in self._open:
                self._open.move_to_end(name)
                images, mm = self._open[name]
                self.pager.touch(mm)
                return images
        path = self.root / f"{name}{SUFFIX}"
        opened = open_images(path)
        if opened is None:
            return None
        try:
            os.utime(path)  # most recently used: evicted last
        except OSError:
            pass
        return self._remember(name, opened[0], opened[2])

    def find_layout(self, key: str) -> tuple[torch.Tensor, np.ndarray] | None:
        """The same pixels in another row order, if a file has them: (images, each row's position)."""
        for path in sorted(self.root.glob(f"{key}.*{SUFFIX}"), key=_mtime, reverse=True):
            if (opened := open_images(path)) is not None:
                self.pager.add(opened[2], opened[0].nbytes)
                return opened[0], opened[1]
        return None

    def put(self, name: str, images: torch.Tensor, order: np.ndarray | None = None) -> torch.Tensor:
        """Store uint8 images [N, C, H, W]; returns the stored entry (memory-mapped, when on disk)."""
        step = chunk_rows(self.memory_bytes, int(images[0].numel()) if len(images) else 1)
        return self.build(name, tuple(images.shape),
                          lambda: (images[i:i + step] for i in range(0, len(images), step)), order)

    def build(self, name: str, shape: tuple[int, int, int, int], chunks: Chunks,
              order: np.ndarray | None = None) -> torch.Tensor:
        """Write an entry from its batches and return it. On a disk error it is built in memory
        instead: a full disk costs the cache (and that memory), never the job."""
        order = np.arange(shape[0]) if order is None else order
        size = file_bytes(shape)
        scratch = size > self.max_bytes
        if scratch and size - PAGE <= self.resident_bytes:
            return self._remember(name, in_memory(shape, chunks()), None)
        tmp = self.root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # "being written" until renamed: the sweep leaves it alone
                write_images(f, shape, chunks(), order)
                opened = open_images(tmp)  # mapped before it is renamed: an eviction cannot take it first
                if opened is None:
                    raise OSError(f"{tmp.name} did not read back")
                if scratch:
                    tmp.unlink()  # the map keeps the file's blocks until the job lets go of it
                else:
                    os.replace(tmp, self.root / f"{name}{SUFFIX}")  # readers never see half a file
        except OSError:
            tmp.unlink(missing_ok=True)
            log.warning("could not write the decoded-image cache; keeping the images in memory", exc_info=True)
            return self._remember(name, in_memory(shape, chunks()), None)
        except BaseException:  # cancelled, or an image failed: no half file stays behind
            tmp.unlink(missing_ok=True)
            raise
        if not scratch:
            self._evict()
        return self._remember(name, opened[0], opened[2])

    def _remember(self, name: str, images: torch.Tensor, mm: mmap.mmap | None) -> torch.Tensor:
        if mm is not None:
            self.pager.add(mm, images.nbytes)
        with self._lock:
            self._open[name] = (images, mm)
            self._open.move_to_end(name)
            # the newest stays (its job holds it anyway); older ones go beyond the count, and
            # in-memory ones beyond the resident share of the budget
            while len(self._open) > 1 and (len(self._open) > self.memory_entries or sum(
                    t.nbytes for t, m in self._open.values() if m is None) > self.resident_bytes):
                self._open.popitem(last=False)
        return images

    def _evict(self) -> None:
        files = []
        for path in self.root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                _sweep_if_abandoned(path)
            elif path.suffix == ".safetensors":  # the format before issue 22: never read again
                path.unlink(missing_ok=True)
            elif path.suffix == SUFFIX:
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


# --- the file ---------------------------------------------------------------------------------------

def write_images(f: BinaryIO, shape: tuple[int, int, int, int], chunks: Iterable[torch.Tensor],
                 order: np.ndarray) -> None:
    """A complete cache file into `f` (open for writing, empty), fsynced before it returns."""
    rows = shape[0]
    offset = data_offset(rows)
    f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, *shape, offset).ljust(HEADER_BYTES, b"\0"))
    f.write(np.ascontiguousarray(order, dtype="<u4").tobytes())
    f.seek(offset)
    written = 0
    for chunk in chunks:
        if chunk.dtype != torch.uint8 or tuple(chunk.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f"a batch of {tuple(chunk.shape)} {chunk.dtype} does not fit images of {shape}")
        f.write(chunk.contiguous().numpy().data)
        written += len(chunk)
    if written != rows:
        raise ValueError(f"{written} images were written where {rows} were expected")
    f.write(END)
    f.flush()
    os.fsync(f.fileno())


def open_images(path: Path) -> tuple[torch.Tensor, np.ndarray, mmap.mmap] | None:
    """(images [N, C, H, W] mapped from a complete cache file, each row's position, the map); None
    when the file is absent, and None (the file deleted) when it is not a complete one."""
    try:
        with open(path, "rb") as f:
            magic, version, *dims, offset = _HEADER.unpack(f.read(_HEADER.size))
            shape = tuple(int(d) for d in dims)
            size = os.fstat(f.fileno()).st_size
            if magic != MAGIC or version != FORMAT_VERSION or offset != data_offset(shape[0]) or size != file_bytes(shape):
                raise ValueError(f"the header or the size ({size} bytes) is not a complete file's")
            f.seek(HEADER_BYTES)
            order = np.frombuffer(f.read(4 * shape[0]), dtype="<u4").astype(np.int64)
            f.seek(size - len(END))
            if len(order) != shape[0] or f.read(len(END)) != END:
                raise ValueError("no end marker")
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private: the file is never written
    except FileNotFoundError:
        return None
    except (OSError, ValueError, struct.error) as exc:
        log.warning("decoded-image cache file %s is damaged (%s); it is built again", path.name, exc)
        path.unlink(missing_ok=True)
        return None
    images = torch.frombuffer(mm, dtype=torch.uint8, count=int(np.prod(shape)), offset=offset)
    return images.view(shape), order, mm


def in_memory(shape: tuple[int, int, int, int], chunks: Iterable[torch.Tensor]) -> torch.Tensor:
    """An entry's batches gathered into one tensor in this process's memory."""
    out = torch.empty(shape, dtype=torch.uint8)
    start = 0
    for chunk in chunks:
        out[start:start + len(chunk)] = chunk
        start += len(chunk)
    if start != shape[0]:
        raise ValueError(f"{start} images were built where {shape[0]} were expected")
    return out


def _sweep_if_abandoned(path: Path) -> None:
    """Remove a temporary file whose writer is gone (a writer holds an exclusive flock on it)."""
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
    except OSError:  # BlockingIOError: still being written; or gone meanwhile
        pass


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# --- keeping mapped pages within the budget ----------------------------------------------------------

class Pager:
    """Hands the pages of mapped entries back to the page cache beyond `resident_bytes` (the most
    recently used kept first), every RELEASE_EVERY_S while any map is alive: a daemon thread."""

    def __init__(self, resident_bytes: int):
        self.resident_bytes = resident_bytes
        self._maps: list[list] = []  # [weakref to the mmap, bytes, last used]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, mm: mmap.mmap, nbytes: int) -> None:
        with self._lock:
            if not self._touch(mm):
                self._maps.append([weakref.ref(mm), nbytes, time.monotonic()])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decoded-pager", daemon=True)
                self._thread.start()

    def touch(self, mm: mmap.mmap | None) -> None:
        if mm is not None:
            with self._lock:
                self._touch(mm)

    def _touch(self, mm: mmap.mmap) -> bool:
        for entry in self._maps:
            if entry[0]() is mm:
                entry[2] = time.monotonic()
                return True
        return False

    def release_beyond_budget(self) -> int:
        """Hand back now what is over the resident share; returns the bytes of the maps released."""
        with self._lock:
            self._maps = [e for e in self._maps if e[0]() is not None]
            live = [(e[1], e[0]()) for e in sorted(self._maps, key=lambda e: e[2], reverse=True)]
        kept = released = 0
        for nbytes, mm in live:
            kept += nbytes
            if mm is not None and kept > self.resident_bytes:
                try:
                    mm.madvise(mmap.MADV_DONTNEED)  # clean private pages: read again from the page cache
                    released += nbytes
                except (ValueError, OSError):  # closed meanwhile
                    pass
        return released

    def _run(self) -> None:
        while True:
            time.sleep(RELEASE_EVERY_S)
            self.release_beyond_budget()
            with self._lock:
                if not self._maps:
                    self._thread = None
                    return


# --- large host buffers a job fills and reads (cached activations) -----------------------------------

class Scratch:
    """Host tensors for what a job computes once and then reads in batches (fine_tune_top's cached
    activations: 37.6 KB an image for Lite0's last two stages at 224 px, with mirrors). One under
    `max_bytes` is ordinary memory; a larger one is a memory-mapped file under `root`, deleted as
    soon as it is mapped, whose pages beyond `max_bytes` go back to the page cache (the pager), so
    it costs disk, not the worker's memory. The worker sets both from its settings; without a root
    (tests, benchmarks) every buffer is ordinary memory."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES // 4, root: Path | None = None):
        self.max_bytes, self.root = max_bytes, root
        self.pager = Pager(max_bytes)

    def configure(self, max_bytes: int, root: Path | None) -> None:
        self.max_bytes, self.root = max_bytes, root
        self.pager.resident_bytes = max_bytes

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
        """An uninitialised tensor of `shape` ([N, C, H, W] when channels_last) on the host."""
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if self.root is None or nbytes <= self.max_bytes or nbytes == 0:
            return torch.empty(shape, dtype=dtype, memory_format=memory_format)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{TMP_PREFIX}scratch-{uuid.uuid4().hex}"
        try:
            with open(path, "w+b") as f:
                f.truncate(nbytes)
                mm = mmap.mmap(f.fileno(), nbytes)  # shared: written pages stay in the file
        except OSError:
            log.warning("no disk for a %d-byte scratch buffer; it is kept in memory", nbytes, exc_info=True)
            return torch.empty(shape, dtype=dtype, memory_format=memory_format)
        finally:
            path.unlink(missing_ok=True)
        self.pager.add(mm, nbytes)
        flat = torch.frombuffer(mm, dtype=dtype, count=int(np.prod(shape)))
        if channels_last:
            n, c, h, w = shape
            return flat.view(n, h, w, c).permute(0, 3, 1, 2)
        return flat.view(shape)


SCRATCH = Scratch()
