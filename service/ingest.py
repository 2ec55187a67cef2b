"""Reading a user's zip into labeled images: layout detection, safety checks, a reason per skip.

Layouts: `<label>/<image>` or `train|val/<label>/<image>`, optionally wrapped in one folder.
Unsafe archives (path traversal, links, encryption, bombs) are refused whole; single unusable
files are skipped and listed, never fatal.
"""
from __future__ import annotations

import stat
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO

from service.blobs import BlobStore
from service.errors import InvalidInput, PayloadTooLarge
from service.settings import Settings
from workers.imaging import ImageRejected, inspect_image

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val"}
JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini", ".DS_Store", ".ipynb_checkpoints"}
ARCHIVE_SUFFIXES = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"}
MAX_LABEL_LENGTH = 100
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass
class IngestedImage:
    sha256: str
    label: str
    split: str | None
    original_name: str
    width: int
    height: int


@dataclass
class IngestResult:
    images: list[IngestedImage] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    has_val_split: bool = False

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"path": path, "reason": reason})


def ingest_zip(upload: BinaryIO, blobs: BlobStore, settings: Settings) -> IngestResult:
    if upload.read(4) not in ZIP_MAGIC:
        raise InvalidInput("the uploaded file is not a zip archive; upload a .zip of "
                           "<label>/<image> folders (or train/ and val/ holding them)")
    upload.seek(0)
    try:
        archive = zipfile.ZipFile(upload)
        entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidInput(f"the zip archive is broken and cannot be read: {exc}") from None
    if len(entries) > settings.max_archive_entries:
        raise PayloadTooLarge(f"the archive has {len(entries)} entries; at most "
                              f"{settings.max_archive_entries} are allowed")
    for info in entries:
        _refuse_unsafe(info)
    result = IngestResult()
    placed = _place_files(entries, result)
    result.has_val_split = any(split == "val" for _, _, split in placed)
    seen: dict[tuple[str | None, str, str], str] = {}
    total = 0
    for info, label, split in placed:
        data = _read_capped(archive, info, settings, result)
        if data is None:
            continue
        total += len(data)
        if total > settings.max_archive_bytes:
            raise PayloadTooLarge(f"the archive expands to more than {settings.max_archive_bytes} bytes")
        try:
            width, height = inspect_image(data)
        except ImageRejected as exc:
            result.reject(info.filename, str(exc))
            continue
        sha = blobs.put(data)
        key = (split, label, sha)
        if key in seen:
            result.reject(info.filename, f"exact duplicate of {seen[key]} in the same class; kept once")
            continue
        seen[key] = info.filename
        result.images.append(IngestedImage(sha, label, split, info.filename, width, height))
    return result


def _refuse_unsafe(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":") or "\x00" in name:
        raise InvalidInput(f"archive entry {name!r} points outside the archive; the whole archive is refused")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InvalidInput(f"archive entry {name!r} is a symbolic link; links are not allowed")
    if info.flag_bits & 0x1:
        raise InvalidInput(f"archive entry {name!r} is encrypted; upload an unencrypted zip")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InvalidInput(f"archive entry {name!r} uses an unsupported compression method "
                           f"({info.compress_type}); use stored or deflate")


def _place_files(entries: list[zipfile.ZipInfo], result: IngestResult) -> list[tuple[zipfile.ZipInfo, str, str | None]]:
    """Decide each file's label and split from its path; everything else is listed as rejected."""
    files = []
    for info in entries:
        if info.is_dir():
            continue
        parts = PurePosixPath(info.filename).parts
        if any(p in JUNK_NAMES or p.startswith(".") for p in parts):
            result.reject(info.filename, "system or hidden file; ignored")
        elif PurePosixPath(info.filename).suffix.lower() in ARCHIVE_SUFFIXES:
            result.reject(info.filename, "nested archive; archives inside the zip are not extracted")
        else:
            files.append((info, parts))
    # One wrapping folder around everything (what zipping a folder produces) is not a label.
    tops = {parts[0] for _, parts in files}
    if len(tops) == 1 and tops.pop().lower() not in SPLIT_NAMES and all(len(p) >= 3 for _, p in files):
        files = [(info, parts[1:]) for info, parts in files]
    split_layout = any(parts[0].lower() in SPLIT_NAMES and len(parts) > 2 for _, parts in files)
    placed = []
    for info, parts in files:
        if split_layout:
            split = SPLIT_NAMES.get(parts[0].lower())
            if split is None or len(parts) != 3:
                result.reject(info.filename, "expected train/<label>/<image> or val/<label>/<image>")
                continue
            folder = parts[1]
        else:
            split = None
            if len(parts) != 2:
                result.reject(info.filename, "expected <label>/<image>: files must sit directly in a class folder")
                continue
            folder = parts[0]
        label = clean_label(folder)
        if label is None:
            result.reject(info.filename, f"class folder name must be 1-{MAX_LABEL_LENGTH} characters")
            continue
        placed.append((info, label, split))
    return placed


def clean_label(name: str) -> str | None:
    label = unicodedata.normalize("NFC", name).strip()
    if not label or len(label) > MAX_LABEL_LENGTH or any(c in label for c in "/\\\x00"):
        return None
    return label


def _read_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, settings: Settings,
                 result: IngestResult) -> bytes | None:
    """Read one entry counting the bytes actually produced; declared sizes may lie."""
    limit = settings.max_entry_bytes
    chunks, size = [], 0
    try:
        with archive.open(info) as f:
            while chunk := f.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    result.reject(info.filename, f"larger than the {limit}-byte limit per file")
                    return None
                if size > (1 << 20) and size > settings.max_compression_ratio * max(info.compress_size, 1):
                    raise PayloadTooLarge(f"archive entry {info.filename!r} expands more than "
                                          f"{settings.max_compression_ratio:.0f}x; refusing a likely zip bomb")
                chunks.append(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # CRC errors, overlapping entries
        raise InvalidInput(f"the zip archive is broken at {info.filename!r}: {exc}") from None
    return b"".join(chunks)
