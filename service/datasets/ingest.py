"""Reading a user's files into labeled images: layout detection, safety checks, a reason per skip.

Ways in: a zip of `<label>/<image>` or `train|val|test/<label>/<image>` folders (optionally wrapped
in one folder), a zip with a `labels.csv` / `labels.jsonl` manifest (`path,label[,split]`) for flat
folders, or plain image files with one label (adding to a dataset). Unsafe archives (path
traversal, links, encryption, unknown compression, overlapping entries, bombs) are refused whole;
single unusable files are skipped and listed with a reason, never fatal. Nothing is extracted to
disk: entries are read into memory one at a time, counting the bytes actually decompressed.
Unlabeled images (issue 16) come in a zip's top-level `unlabeled/` folder, as manifest rows with an
empty label, or as files added without a label; their label is UNLABELED ("").
Several labels per image (issue 17): a `labels` column / "labels" key in the manifest
(service/datasets/multilabel.py).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import stat
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import BinaryIO, Iterable, Iterator, Mapping

from service.store.blobs import Staging
from service.errors import InvalidInput, PayloadTooLarge
from service.datasets import multilabel
from service.datasets.names import LabelRejected, clean_filename, clean_label, clean_name, label_key
from service.settings import Settings
from workers.imaging import ImageRejected, inspect_image

# test: held out of training and of every choice, scored apart on the finished model.
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "testing": "test"}
JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini", ".DS_Store", ".ipynb_checkpoints"}
ARCHIVE_SUFFIXES = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"}
# Decide by content, not by name: these start every archive format worth naming.
ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00",
                 b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"\x28\xb5\x2f\xfd")
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
MANIFEST_NAMES = ("labels.csv", "labels.jsonl")
RATIO_GRACE_BYTES = 1 << 20  # tiny entries may compress very well; the ratio cap starts above this
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


@dataclass
class IngestedImage:
    sha256: str
    label: str
    split: str | None
    original_name: str  # cleaned metadata, never used as a path
    width: int
    height: int
    mode: str
    format: str
    phash: str
    size_bytes: int = 0
    # A multi-label image's labels (maybe none; issue 17): `label` is then their key_of (a JSON list).
    labels: tuple[str, ...] | None = None


@dataclass
class IngestResult:
    images: list[IngestedImage] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"path", "reason"}
    duplicates: list[dict] = field(default_factory=list)  # {"label", "kept", "dropped": [...]}
    conflicts: list[dict] = field(default_factory=list)  # {"sha256", "labels": [...], "paths": [...]}

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"path": path, "reason": reason})

    @property
    def has_val_split(self) -> bool:
        return any(img.split == "val" for img in self.images)


class Intake:
    """Takes files one at a time: decodes, de-duplicates and stages them, listing every refusal.

    The same bytes under one label are kept once; under two labels they are a conflict and all
    copies are left out (nobody can tell which label is right). `existing` maps the sha256 of
    images already in the dataset to (label, name), for additions.
    """

    def __init__(self, stage: Staging, settings: Settings,
                 existing: Mapping[str, tuple[str, str]] | None = None, existing_count: int = 0):
        self.stage, self.settings = stage, settings
        self.existing = existing or {}
        self.existing_count = existing_count
        self.result = IngestResult()
        self._by_sha: dict[str, list[IngestedImage]] = {}
        self._duplicates: dict[tuple[str, str], dict] = {}

    def offer(self, path: str, label: str | tuple[str, ...], split: str | None, data: bytes) -> None:
        """`label`: a class, or a multi-label image's labels as a tuple (multilabel.py)."""
        labels = None
        if isinstance(label, tuple):
            labels, label = label, multilabel.key_of(label)
        sha = hashlib.sha256(data).hexdigest()
        if sha in self.existing:
            old_label, old_name = self.existing[sha]
            self.result.reject(path, f"already in the dataset as {old_name!r}" if old_label == label else
                               f"already in the dataset labeled {old_label!r} (as {old_name!r}); "
                               "remove that image first to give it another label")
            return
        seen = self._by_sha.get(sha)
        if seen:
            same_class = next((img for img in seen if img.label == label), None)
            if same_class is not None:
                self._note_duplicate(same_class, path)
            else:
                seen.append(replace(seen[0], label=label, split=split, original_name=path, labels=labels))
            return
        if data.startswith(ARCHIVE_MAGIC) or data[257:262] == b"ustar":
            self.result.reject(path, "nested archive; archives inside an upload are not extracted")
            return
        try:
            info = inspect_image(data, self.settings.max_image_pixels)
        except ImageRejected as exc:
            self.result.reject(path, str(exc))
            return
        if self.existing_count + len(self._by_sha) >= self.settings.max_images_per_dataset:
            raise PayloadTooLarge(f"more than {self.settings.max_images_per_dataset} images; a dataset holds "
                                  f"at most {self.settings.max_images_per_dataset}")
        self.stage.put(data)
        self._by_sha[sha] = [IngestedImage(sha, label, split, path, info.width, info.height, info.mode,
                                           info.format, info.phash, len(data), labels)]

    def _note_duplicate(self, kept: IngestedImage, path: str) -> None:
        group = self._duplicates.setdefault((kept.sha256, kept.label),
                                            {"label": kept.label, "kept": kept.original_name, "dropped": []})
        group["dropped"].append(path)
        self.result.reject(path, f"exact duplicate of {kept.original_name!r} in class {kept.label!r}; kept once")

    def finish(self) -> IngestResult:
        result = self.result
        for sha, copies in self._by_sha.items():
            # Unlabeled copies of a labeled image add nothing: the labeled one is kept (issue 16).
            labels = sorted({img.label for img in copies} - {UNLABELED}) or [UNLABELED]
            if len(labels) == 1:
                kept = next(img for img in copies if img.label == labels[0])
                result.images.append(kept)
                for img in copies:
                    if img is not kept:
                        result.reject(img.original_name, f"the same image as {kept.original_name!r} (labeled "
                                      f"{kept.label!r}); kept once, labeled")
                continue
            result.conflicts.append({"sha256": sha, "labels": labels, "paths": [c.original_name for c in copies]})
            for img in copies:
                others = ", ".join(repr(c.original_name) for c in copies if c is not img)
                result.reject(img.original_name, f"the same image is labeled {', '.join(map(repr, labels))} "
                              f"(also {others}); conflicting labels, all copies left out")
        result.duplicates = list(self._duplicates.values())
        return result


# -- zip archives ---------------------------------------------------------------------------------

def ingest_zip(upload: BinaryIO, stage: Staging, settings: Settings) -> IngestResult:
    archive, entries = _open_safe_archive(upload, settings)
    intake = Intake(stage, settings)
    reader = _EntryReader(archive, settings)
    placed = _place_files(entries, reader, intake.result, settings)
    check_labels(multilabel.names_in(label for _, _, label, _ in placed) - {UNLABELED}, settings)
    for info, path, label, split in placed:
        data = reader.read(info, path, intake.result)
        if data is not None:
            intake.offer(path, label, split, data)
    return intake.finish()


UNLABELED = ""  # the label of an image nobody has labeled yet (issue 16; batch predictions' images too)
UNLABELED_FOLDER = "unlabeled"  # a zip's top-level folder of unlabeled images, beside the class folders


def is_unlabeled(img) -> bool:
    """An image without a label: never counted toward a class, never validated on (issue 16).
    A multi-label image (a `labels` list, even an empty one) is labeled."""
    return img.label == UNLABELED and getattr(img, "labels", None) is None


def ingest_unlabeled_zip(upload: BinaryIO, stage: Staging, settings: Settings) -> IngestResult:
    """A zip of images in any folders, to be predicted: every image file, named by its path in
    the archive, checked as a training upload's are (safety, decoding, limits, exact duplicates
    kept once), without labels."""
    archive, entries = _open_safe_archive(upload, settings)
    intake = Intake(stage, settings)
    reader = _EntryReader(archive, settings)
    for info in entries:
        if info.is_dir():
            continue
        path = clean_name(info.filename)
        parts = [p for p in _normalise_path(info.filename).split("/") if p]
        if not parts or any(p in JUNK_NAMES or p.startswith(".") for p in parts):
            intake.result.reject(path, "system or hidden file; ignored")
        elif (data := reader.read(info, path, intake.result)) is not None:
            intake.offer(path, UNLABELED, None, data)
    return intake.finish()


def _open_safe_archive(upload: BinaryIO, settings: Settings) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The archive and its entries, once the whole archive passed the safety checks and limits."""
    archive = _open_archive(upload, settings)
    entries = archive.infolist()
    if len(entries) > settings.max_archive_entries:
        raise PayloadTooLarge(f"the archive has {len(entries)} entries; at most "
                              f"{settings.max_archive_entries} are allowed")
    for info in entries:
        _refuse_unsafe(info)
    _refuse_overlaps(upload, archive, entries)
    declared = sum(info.file_size for info in entries)
    if declared > settings.max_archive_bytes:
        raise PayloadTooLarge(f"the archive expands to {declared} bytes; at most "
                              f"{settings.max_archive_bytes} are allowed")
    return archive, entries


def _open_archive(upload: BinaryIO, settings: Settings) -> zipfile.ZipFile:
    if upload.read(4) not in ZIP_MAGIC:
        raise InvalidInput("the uploaded file is not a zip archive; upload a .zip of "
                           "<label>/<image> folders (or train/, val/ and test/ holding them)")
    try:
        # The central directory's own count, before zipfile builds an object per entry.
        end_record = zipfile._EndRecData(upload)  # noqa: SLF001 - the stdlib's parser of that record
        if end_record and end_record[zipfile._ECD_ENTRIES_TOTAL] > settings.max_archive_entries:
            raise PayloadTooLarge(f"the archive has {end_record[zipfile._ECD_ENTRIES_TOTAL]} entries; "
                                  f"at most {settings.max_archive_entries} are allowed")
        upload.seek(0)
        return zipfile.ZipFile(upload)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error,
            UnicodeDecodeError, NotImplementedError) as exc:
        raise InvalidInput(f"the zip archive is broken and cannot be read: {exc}") from None


def _refuse_unsafe(info: zipfile.ZipInfo) -> None:
    name = info.filename
    shown = clean_name(name)
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":") or "\x00" in name:
        raise InvalidInput(f"archive entry {shown!r} points outside the archive; the whole archive is refused")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise InvalidInput(f"archive entry {shown!r} is a symbolic link; links are not allowed")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise InvalidInput(f"archive entry {shown!r} is not a regular file (a device, pipe, socket or "
                           "link); only files and folders are allowed")
    if info.flag_bits & 0x1:
        raise InvalidInput(f"archive entry {shown!r} is encrypted; upload an unencrypted zip")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InvalidInput(f"archive entry {shown!r} uses an unsupported compression method "
                           f"({info.compress_type}); use stored or deflate")


def _refuse_overlaps(upload: BinaryIO, archive: zipfile.ZipFile, entries: list[zipfile.ZipInfo]) -> None:
    """Entries whose data overlap (a non-recursive zip bomb) refuse the archive; CPython only
    checks this since 3.12.2/3.11.8, so it is done here whatever the interpreter."""
    end_of_data = archive.start_dir
    previous_end = 0
    for info in sorted(entries, key=lambda i: i.header_offset):
        shown = clean_name(info.filename)
        if info.header_offset < previous_end:
            raise InvalidInput(f"archive entry {shown!r} overlaps another entry; the whole archive is "
                               "refused (a likely zip bomb)")
        upload.seek(info.header_offset)
        header = upload.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise InvalidInput(f"the zip archive is broken at {shown!r}: bad local header")
        _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        previous_end = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + info.compress_size
        if previous_end > end_of_data:
            raise InvalidInput(f"archive entry {shown!r} runs into the archive's directory; the whole "
                               "archive is refused (broken, or a likely zip bomb)")
    upload.seek(0)


class _EntryReader:
    """Reads entries counting the bytes actually produced (declared sizes may lie)."""

    def __init__(self, archive: zipfile.ZipFile, settings: Settings):
        self.archive, self.settings = archive, settings
        self.total = 0

    def read(self, info: zipfile.ZipInfo, path: str, result: IngestResult, limit: int | None = None) -> bytes | None:
        limit = limit or self.settings.max_entry_bytes
        ratio_cap = self.settings.max_compression_ratio * max(info.compress_size, 1)
        chunks, size = [], 0
        try:
            with self.archive.open(info) as f:
                while chunk := f.read(1 << 20):
                    size += len(chunk)
                    self.total += len(chunk)
                    if self.total > self.settings.max_archive_bytes:
                        raise PayloadTooLarge(f"the archive expands to more than {self.settings.max_archive_bytes} "
                                              "bytes; that is the limit")
                    if size > RATIO_GRACE_BYTES and size > ratio_cap:
                        raise PayloadTooLarge(f"archive entry {path!r} expands more than "
                                              f"{self.settings.max_compression_ratio:.0f}x; refusing a likely zip bomb")
                    if size > limit:
                        result.reject(path, f"larger than the {limit}-byte limit per file")
                        return None
                    chunks.append(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, NotImplementedError,
                RuntimeError) as exc:  # CRC and size mismatches, corrupt deflate streams
            raise InvalidInput(f"the zip archive is broken at {path!r}: {exc}") from None
        return b"".join(chunks)


def _place_files(entries: list[zipfile.ZipInfo], reader: _EntryReader, result: IngestResult,
                 settings: Settings) -> list[tuple[zipfile.ZipInfo, str, str, str | None]]:
    """Decide each file's label and split (from a manifest, else from its folders); every file
    that gets none is listed as rejected with the reason."""
    files = []
    for info in entries:
        if info.is_dir():
            continue
        path = clean_name(info.filename)
        parts = tuple(p for p in _normalise_path(info.filename).split("/") if p)
        if not parts or any(p in JUNK_NAMES or p.startswith(".") for p in parts):
            result.reject(path, "system or hidden file; ignored")
        elif PurePosixPath(parts[-1]).suffix.lower() in ARCHIVE_SUFFIXES:
            result.reject(path, "nested archive; archives inside an upload are not extracted")
        else:
            files.append((info, path, parts))
    manifest = _find_manifest(files)
    if manifest is not None:
        return _place_by_manifest(files, manifest, reader, result, settings)
    return _place_by_folders(files, result, settings)


def _normalise_path(name: str) -> str:
    return unicodedata.normalize("NFC", name.replace("\\", "/"))


def _strip_wrapper(files: list) -> tuple[list, int]:
    """One folder around everything (what zipping a folder produces) is not part of the layout."""
    tops = {parts[0] for _, _, parts in files}
    if len(tops) == 1 and next(iter(tops)).lower() not in (*SPLIT_NAMES, UNLABELED_FOLDER) and any(len(p) >= 3 for _, _, p in files):
        return [(info, path, parts[1:]) for info, path, parts in files], 1
    return files, 0


def _place_by_folders(files: list, result: IngestResult, settings: Settings) -> list:
    files, _ = _strip_wrapper(files)
    split_layout = any(parts[0].lower() in SPLIT_NAMES and len(parts) > 2 for _, _, parts in files)
    placed = []
    for info, path, parts in files:
        if len(parts) >= 2 and parts[0].lower() == UNLABELED_FOLDER:  # unlabeled/<image>, in any sub-folders
            placed.append((info, path, UNLABELED, None))
            continue
        if split_layout:
            split = SPLIT_NAMES.get(parts[0].lower())
            if split is None or len(parts) != 3:
                result.reject(path, "expected train/<label>/<image>, val/<label>/<image> or test/<label>/<image>")
                continue
            folder = parts[1]
        else:
            split = None
            if len(parts) != 2:
                result.reject(path, "expected <label>/<image>: files must sit directly in a class folder")
                continue
            folder = parts[0]
        try:
            label = clean_label(folder, settings.max_label_length)
        except LabelRejected as exc:
            result.reject(path, f"{exc}; rename the folder")
            continue
        placed.append((info, path, label, split))
    return placed


def _find_manifest(files: list) -> tuple | None:
    """A labels.csv / labels.jsonl at the top of the archive (or of its one wrapping folder)."""
    for level in (0, 1):
        if level == 1 and len({parts[0] for _, _, parts in files}) != 1:
            break
        found = [f for f in files if len(f[2]) == level + 1 and f[2][level].lower() in MANIFEST_NAMES]
        if len(found) > 1:
            raise InvalidInput("the archive holds more than one labels.csv / labels.jsonl; keep one manifest")
        if found:
            info, path, parts = found[0]
            return info, path, parts[level].lower(), level
    return None


def _place_by_manifest(files: list, manifest: tuple, reader: _EntryReader, result: IngestResult,
                       settings: Settings) -> list:
    minfo, mpath, mname, level = manifest
    by_key: dict[str, tuple[zipfile.ZipInfo, str]] = {}
    for info, path, parts in files:
        key = "/".join(parts[level:])
        if info is minfo:
            continue
        if key in by_key:  # the same name twice, or NFC/NFD twins: a manifest row cannot tell them apart
            result.reject(path, f"another entry has the same path {key!r}; {mname} cannot tell them apart")
            continue
        by_key[key] = (info, path)
    data = reader.read(minfo, mpath, result, limit=settings.max_entry_bytes)
    if data is None:
        raise PayloadTooLarge(f"{mname} is larger than the {settings.max_entry_bytes}-byte limit per file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(f"{mname} is not UTF-8 text; save it as UTF-8") from None
    rows = _csv_rows(text) if mname.endswith(".csv") else _jsonl_rows(text)
    placed, listed = [], {}
    for n, (lineno, raw_path, raw_label, raw_split) in enumerate(rows):
        if n >= settings.max_archive_entries:
            raise PayloadTooLarge(f"{mname} has more than {settings.max_archive_entries} rows; that is the limit")
        where = f"{mname} line {lineno}"
        key = _manifest_key(raw_path, where)
        if not key:
            result.reject(where, "the path is empty")
            continue
        if key in listed:
            result.reject(clean_name(key), f"{where}: listed again (first at line {listed[key]}); the first row is used")
            continue
        found = by_key.get(key)
        if found is None:
            result.reject(clean_name(key), f"{where}: listed, but the archive has no usable file at that path")
            continue
        listed[key] = lineno
        info, path = found
        multi = isinstance(raw_label, tuple)  # a multi-label row (issue 17): bad labels refuse the upload
        if multi:
            raw_label = multilabel.clean_labels(raw_label, where, settings.max_label_length)
        elif not (raw_label or "").strip():  # an empty label: an unlabeled image (issue 16), never split
            placed.append((info, path, UNLABELED, None))
            continue
        try:
            label = raw_label if multi else clean_label(raw_label, settings.max_label_length)
        except LabelRejected as exc:
            result.reject(path, f"{where}: {exc}")
            continue
        split = (raw_split or "").strip().lower()
        if split and split not in SPLIT_NAMES:
            result.reject(path, f"{where}: split {raw_split[:40]!r} is not train, val or test (or empty)")
            continue
        placed.append((info, path, label, SPLIT_NAMES.get(split)))
    for key, (_, path) in by_key.items():
        if key not in listed:
            result.reject(path, f"not listed in {mname}")
    return placed


def _manifest_key(raw: str, where: str) -> str:
    path = _normalise_path(raw.strip())
    while path.startswith("./"):
        path = path[2:]
    parts = path.split("/")
    if path.startswith("/") or ".." in parts or (len(path) > 1 and path[1] == ":") or "\x00" in path:
        raise InvalidInput(f"{where}: path {clean_name(raw)[:80]!r} points outside the archive; the whole "
                           "archive is refused")
    return "/".join(p for p in parts if p and p != ".")


def _csv_rows(text: str) -> Iterator[tuple[int, str, str, str | None]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [c.strip().lower() for c in next(reader, [])]
        multi = multilabel.csv_labels_column(header)  # issue 17: a labels column, ';'-separated
        if "path" not in header or ("label" not in header and not multi):
            raise InvalidInput("labels.csv must start with a header row: path,label[,split] (one class per "
                               "image), or path,labels[,split] (several labels per image, ';'-separated)")
        ip, il = header.index("path"), header.index("labels" if multi else "label")
        isplit = header.index("split") if "split" in header else None
        for row in reader:
            if any(cell.strip() for cell in row):
                label = multilabel.split_cell(_cell(row, il), reader.line_num) if multi else _cell(row, il)
                yield reader.line_num, _cell(row, ip), label, _cell(row, isplit)
    except csv.Error as exc:
        raise InvalidInput(f"labels.csv is malformed at line {reader.line_num}: {exc}") from None


def _cell(row: list[str], index: int | None) -> str:
    return row[index] if index is not None and index < len(row) else ""


def _jsonl_rows(text: str) -> Iterator[tuple[int, str, str, str | None]]:
    kinds = multilabel.JsonlKinds()  # "label" lines and "labels" lines (issue 17) are not mixed
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise InvalidInput(f"labels.jsonl line {lineno} is not valid JSON") from None
        if not isinstance(row, dict):
            raise InvalidInput(f"labels.jsonl line {lineno} is not a JSON object with path and label")
        path, label, split = row.get("path"), row.get("label"), row.get("split")
        if ("label" in row or "labels" in row) and kinds.check(row, lineno) == "labels":
            if not isinstance(path, str) or not isinstance(split, (str, type(None))):
                raise InvalidInput(f"labels.jsonl line {lineno}: path must be a string, split a string or absent")
            yield lineno, path, multilabel.jsonl_labels(row, lineno), split
            continue
        if label is None and "labels" not in row:  # no label: an unlabeled image (issue 16)
            label = UNLABELED
        if not isinstance(path, str) or not isinstance(label, str) or not isinstance(split, (str, type(None))):
            raise InvalidInput(f"labels.jsonl line {lineno}: path and label must be strings (label empty or "
                               "absent for an unlabeled image), split a string or absent")
        yield lineno, path, label, split


# -- single files and labels ----------------------------------------------------------------------

def ingest_files(files: Iterable[tuple[str | None, BinaryIO]], label: str, split: str | None, intake: Intake) -> IngestResult:
    """Image files sent one by one (adding to a dataset), all with the same label and split."""
    limit = intake.settings.max_entry_bytes
    for i, (filename, f) in enumerate(files):
        path = clean_filename(filename, fallback=f"file{i + 1}")
        data = f.read(limit + 1)
        if len(data) > limit:
            intake.result.reject(path, f"larger than the {limit}-byte limit per file")
            continue
        intake.offer(path, label, split, data)
    return intake.finish()


def check_labels(labels: set[str], settings: Settings, existing: Iterable[str] = ()) -> None:
    """Refuse too many classes, and labels that differ only in letter case (to each other or to
    classes the dataset already has)."""
    existing = set(existing)
    if len(labels | existing) > settings.max_classes:
        raise InvalidInput(f"{len(labels | existing)} classes; a dataset may have at most {settings.max_classes}")
    by_key: dict[str, set[str]] = {}
    for label in labels | existing:
        by_key.setdefault(label_key(label), set()).add(label)
    clashes = sorted(sorted(group) for group in by_key.values() if len(group) > 1)
    if clashes:
        shown = "; ".join(" and ".join(map(repr, group)) for group in clashes)
        raise InvalidInput(f"class labels {shown} differ only in letter case; use one spelling per class")
