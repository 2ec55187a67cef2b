"""Multi-label datasets (issue 17): several labels per image, written in a manifest.

How a manifest says it:

- `labels.csv` with a `labels` column (instead of `label`): the image's labels separated by `;`.
  A name that itself contains `;` is quoted inside the cell as CSV quotes a field (the cell
  `"a;b";c` holds the two labels `a;b` and `c`; in the file, that cell is written `\"""a;b"";c"`).
  An empty cell: the image shows none of the labels (all negatives), which is allowed.
- `labels.jsonl` with `"labels": [...]` on every line (a list of strings; `[]` for none).

A manifest is single-label (`label`) or multi-label (`labels`) throughout: mixing them is refused
with how to write it. So are label lists that cannot be read, empty names inside a list, and names
that are not valid labels (too long, a path separator...): the whole upload is refused (422), since
a row whose labels are wrong would otherwise silently become a negative for them.

In the database a multi-label image keeps its labels in `dataset_image.labels` (a JSON list) and
MULTI_LABEL_ROW in the `label` column, which no label can equal (labels never contain '/').
"""
from __future__ import annotations

import csv
import json
from typing import Iterable

from service.datasets.names import LabelRejected, clean_label
from service.errors import InvalidInput

SINGLE_LABEL, MULTI_LABEL = "single_label", "multi_label"
MULTI_LABEL_ROW = "/multi-label"  # the `label` column of a multi-label image: never a valid label
SEPARATOR = ";"
HOW_TO_WRITE = ("write every image's labels in the labels column, separated by ';' (a name containing ';' is "
                "quoted: \"a;b\";c), a single label as a list of one, and none as an empty cell; in labels.jsonl, "
                "\"labels\": [\"a\", \"b\"] on every line, [] for none")


def key_of(labels: tuple[str, ...]) -> str:
    """One string per label set (what the intake compares, and shows in messages): a JSON list."""
    return json.dumps(list(labels), ensure_ascii=False)


def display(labels: Iterable[str]) -> str:
    """The labels as people read them in a report: 'ants; bees' (empty: no label)."""
    return "; ".join(labels)


def csv_labels_column(header: list[str]) -> bool:
    """Whether a labels.csv header is multi-label; both columns at once are refused."""
    if "labels" in header and "label" in header:
        raise InvalidInput("labels.csv has both a label and a labels column; a manifest is single-label (label) "
                           "or multi-label (labels) throughout: " + HOW_TO_WRITE)
    return "labels" in header


def split_cell(cell: str, lineno: int) -> tuple[str, ...]:
    """A labels cell ('a;b', '"a;b";c', or empty) as its raw names, in order."""
    if not cell.strip():
        return ()
    try:
        rows = list(csv.reader([cell], delimiter=SEPARATOR, quotechar='"', skipinitialspace=True, strict=True))
    except csv.Error as exc:
        raise InvalidInput(f"labels.csv line {lineno}: the labels cell {cell[:80]!r} cannot be read ({exc}); "
                           + HOW_TO_WRITE) from None
    names = tuple(rows[0]) if rows else ()
    if any(not name.strip() for name in names):
        raise InvalidInput(f"labels.csv line {lineno}: the labels cell {cell[:80]!r} has an empty name between "
                           "';' separators; a label list may be empty (an image with none of the labels), but "
                           "each name in it must be a label")
    return names


def jsonl_labels(row: dict, lineno: int) -> tuple[str, ...]:
    """A labels.jsonl line's "labels": a list of strings."""
    value = row["labels"]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        shown = json.dumps(value, ensure_ascii=False)[:80]
        raise InvalidInput(f"labels.jsonl line {lineno}: \"labels\" is {shown}; it must be a JSON list of strings, "
                           "e.g. [\"ants\", \"flowers\"], or [] for an image with none of the labels")
    if any(not v.strip() for v in value):
        raise InvalidInput(f"labels.jsonl line {lineno}: \"labels\" holds an empty name; a label list may be empty "
                           "([]: none of the labels), but each name in it must be a label")
    return tuple(value)


class JsonlKinds:
    """Refuses a labels.jsonl that mixes "label" lines and "labels" lines, naming both."""

    def __init__(self):
        self.first: tuple[str, int] | None = None

    def check(self, row: dict, lineno: int) -> str:
        if "label" in row and "labels" in row:
            raise InvalidInput(f"labels.jsonl line {lineno} has both \"label\" and \"labels\"; " + HOW_TO_WRITE)
        kind = "labels" if "labels" in row else "label"
        if self.first is None:
            self.first = (kind, lineno)
        elif self.first[0] != kind:
            raise InvalidInput(f"labels.jsonl mixes single-label and multi-label lines: line {self.first[1]} has "
                               f"\"{self.first[0]}\" and line {lineno} has \"{kind}\"; " + HOW_TO_WRITE)
        return kind


def clean_labels(raw: tuple[str, ...], where: str, max_length: int) -> tuple[str, ...]:
    """The names cleaned as every label is (names.clean_label), each once, sorted; a name that cannot
    be a label refuses the upload (422) with what is allowed."""
    cleaned = set()
    for name in raw:
        try:
            cleaned.add(clean_label(name, max_length))
        except LabelRejected as exc:
            raise InvalidInput(f"{where}: {exc}; fix the label in the manifest (labels are at most {max_length} "
                               "characters, with no '/' or '\\', control characters or leading formula signs)",
                               ) from None
    return tuple(sorted(cleaned))


def names_in(labels: Iterable[str | tuple[str, ...]]) -> set[str]:
    """Every label name among single labels and label tuples."""
    out: set[str] = set()
    for label in labels:
        if isinstance(label, tuple):
            out.update(label)
        else:
            out.add(label)
    return out


def is_multi_label(images: Iterable) -> bool:
    """Whether image rows (or ingested images) are a multi-label dataset's: they carry label lists."""
    return any(getattr(img, "labels", None) is not None for img in images)


def shown_label(img) -> str:
    """An image's label as reports show it: its class, or its labels joined by '; '."""
    labels = getattr(img, "labels", None)
    return img.label if labels is None else display(labels)


def labels_of(img) -> tuple[str, ...]:
    """The classes an image counts toward: its labels (multi-label), or its one label."""
    labels = getattr(img, "labels", None)
    return (img.label,) if labels is None else tuple(labels)


def report_extras(images, classes: list[str], learn_counts) -> tuple[dict, list[str]]:
    """What a multi-label dataset's report adds (labels per image, co-occurrence, images with none
    of the labels) and its own problems: a label that every image outside test has cannot be
    learned (nothing shows its absence). `images`: the labeled images; `learn_counts`: positives
    per label outside the test split."""
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    per_image: dict[int, int] = {}
    without = {"total": 0}
    for img in images:
        labels = labels_of(img)
        per_image[len(labels)] = per_image.get(len(labels), 0) + 1
        if not labels:
            without["total"] += 1
            side = img.split or "unsplit"
            without[side] = without.get(side, 0) + 1
        for a in labels:
            for b in labels:
                matrix[index[a]][index[b]] += 1
    learning = sum(1 for img in images if img.split != "test")
    problems = [f"label {c!r} is on every one of the {learning} images outside test/; a model cannot learn when "
                "it is absent: add images without it" for c in classes if learning and learn_counts[c] == learning]
    extras = {"task": MULTI_LABEL,
              "labels_per_image": {str(k): v for k, v in sorted(per_image.items())},
              "images_without_labels": without,
              "label_cooccurrence": {"labels": list(classes), "matrix": matrix,
                                     "note": "images having both labels; the diagonal is each label's count"}}
    return extras, problems
