"""User-supplied names made safe: class labels (which become data) and file names (metadata only).

Files are stored under their sha256, never under a name a user chose; the original name is kept
only as cleaned text for reports. Labels end up in models, reports and other tools' spreadsheets,
so they are normalised and refused when they could be mistaken for a path or a formula.
"""
from __future__ import annotations

import re
import unicodedata

# Bidirectional overrides and isolates reorder how text is displayed (U+202E makes "gpj.exe"
# read as "exe.jpg"); they never belong in a name.
_BIDI_CONTROLS = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SEPARATORS = ("/", "\\")
# A cell starting with one of these is run as a formula by spreadsheet programs (CSV injection).
_FORMULA_STARTS = ("=", "+", "@", "\t", "\r")
_NUMBER = re.compile(r"-\d+([.,]\d+)?")
MAX_NAME_BYTES = 255  # per path component, as on common file systems
MAX_PATH_CHARS = 1024  # the database column


class LabelRejected(ValueError):
    """The text cannot be a class label; the message says why and what is allowed."""


def _is_unsafe_char(ch: str) -> bool:
    return ch in _BIDI_CONTROLS or unicodedata.category(ch) == "Cc"


def clean_label(raw: str, max_length: int) -> str:
    """NFC, trimmed, length-capped; no separators, control characters or formula prefixes."""
    label = unicodedata.normalize("NFC", raw).strip()
    if not label:
        raise LabelRejected("class label is empty")
    if len(label) > max_length:
        raise LabelRejected(f"class label {label[:40]!r}... is {len(label)} characters; at most {max_length} are allowed")
    if label.startswith(_FORMULA_STARTS) or (label.startswith("-") and not _NUMBER.fullmatch(label)):
        raise LabelRejected(f"class label {label!r} starts with {label[0]!r}, which spreadsheets run as "
                            "a formula; start it with a letter or digit")
    if any(sep in label for sep in _SEPARATORS):
        raise LabelRejected(f"class label {label!r} contains a path separator ('/' or '\\')")
    if label in (".", ".."):
        raise LabelRejected(f"class label {label!r} is not a name")
    if any(_is_unsafe_char(ch) for ch in label):
        raise LabelRejected(f"class label {label!r} contains control or text-direction characters")
    return label


def label_key(label: str) -> str:
    """Labels equal under this key are the same class to a person: 'Cats' and 'cats' collide."""
    return label.casefold()


def clean_name(raw: str, fallback: str = "unnamed") -> str:
    """A file name or archive path as metadata: NFC, no control or direction characters, each
    component at most 255 UTF-8 bytes, the whole at most 1024 characters. Never used as a path."""
    text = unicodedata.normalize("NFC", raw).replace("\\", "/")
    text = "".join("\ufffd" if _is_unsafe_char(ch) else ch for ch in text)
    parts = [_cap_bytes(p.strip(), MAX_NAME_BYTES) for p in text.split("/")]
    cleaned = "/".join(p for p in parts if p)[:MAX_PATH_CHARS]
    return cleaned or fallback


def clean_text(raw: str, max_chars: int) -> str:
    """Free text shown to people (a dataset's name): NFC, no control or direction characters, trimmed."""
    text = unicodedata.normalize("NFC", raw)
    return "".join("\ufffd" if _is_unsafe_char(ch) else ch for ch in text).strip()[:max_chars]


def clean_filename(raw: str | None, fallback: str = "unnamed") -> str:
    """The last component of a client-sent file name, cleaned; '..' and the like become the fallback."""
    name = clean_name(raw or "", fallback).rsplit("/", 1)[-1]
    return fallback if name in (".", "..") else name


def _cap_bytes(text: str, limit: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore")


def name_key(raw: str) -> str:
    """Names equal under this key are one name to a person ('Beta', ' beta', 'beta.', 'béta' composed
    or not): NFC, case-folded, trimmed, trailing punctuation dropped. Project names are unique by it."""
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", raw).casefold()).strip()
    while text and (unicodedata.category(text[-1]).startswith("P") or text[-1].isspace()):
        text = text[:-1]
    return text
