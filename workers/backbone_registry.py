"""The operator's registry of extra backbones: weight files on this machine, each with the timm
architecture it fits and the sha256 it had when it was registered.

One JSON file (Settings.backbones_file, default `<data dir>/backbones.json`), written by
`graft backbones add` / `remove` and read by every Graft process on the machine; an operator may
also write it by hand (`graft backbones add` checks what hand-writing cannot: that the file loads
into the architecture). Its shape:

    {"version": 1, "backbones": {
        "dinov2-base": {"timm_arch": "vit_base_patch14_dinov2.lvd142m", "file": "/srv/w/dinov2.safetensors",
                        "sha256": "<hex>", "size_bytes": 346368912, "added_at": "2026-12-01T10:00:00+00:00",
                        "auto": false},
        "timm/convnext_small.fb_in22k_ft_in1k": {"file": "...", "sha256": "...", ...}}}

A name of the second kind (`timm/<model>`) gives the weights of that timm model: the first place
Graft looks for them (workers/timm_backbones.py); its `timm_arch` is the model itself. A name of
the first kind is a backbone of its own on the architecture `timm_arch` (a timm model name with its
pretrained tag, whose pretrained config sets the preprocessing).

A process reads the file again whenever it changed (size or mtime). Which file: `use_registry`,
called by the API and the worker with their Settings; None (the default) means no registry.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("graft.backbones")

REGISTRY_VERSION = 1
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"  # a backbone of its own; or timm/<timm model name>
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # safetensors preferred; the rest torch.load(weights_only)


class RegistryError(ValueError):
    """A registration that cannot be made or a registry file that cannot be read; str(exc) says why."""


@dataclass(frozen=True)
class RegisteredBackbone:
    name: str
    timm_arch: str  # timm model name with its pretrained tag: the architecture and its pretrained config
    file: str  # absolute path of the weights
    sha256: str  # of the file when it was registered; checked every time it is loaded
    size_bytes: int
    added_at: str
    auto: bool = False  # strategy auto may choose it when a job names no backbone (backbones.auto_candidates)

    @property
    def path(self) -> Path:
        return Path(self.file)


_lock = threading.Lock()
_path: Path | None = None
_cache: tuple[tuple, dict[str, RegisteredBackbone]] | None = None  # (file identity, entries)


def use_registry(path: Path | None) -> None:
    """Make `path` this process's registry (the API and the worker call it with their Settings)."""
    global _path, _cache
    with _lock:
        _path, _cache = (Path(path) if path is not None else None), None


def registry_path() -> Path | None:
    return _path


def registered_backbones(strict: bool = True) -> dict[str, RegisteredBackbone]:
    """The registry's entries by name (empty without a registry or before the first registration).
    A file that cannot be read raises RegistryError; with strict=False (listings) it is logged and
    counts as empty."""
    global _cache
    path = _path
    if path is None:
        return {}
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    identity = (str(path), st.st_mtime_ns, st.st_size)
    with _lock:
        if _cache is not None and _cache[0] == identity:
            return _cache[1]
    try:
        entries = read_registry(path)
    except RegistryError as exc:
        if strict:
            raise
        log.error("%s", exc, extra={"action": "backbone_registry"})
        return {}
    with _lock:
        _cache = (identity, entries)
    return entries


def read_registry(path: Path) -> dict[str, RegisteredBackbone]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RegistryError(f"the backbone registry {path} cannot be read: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != REGISTRY_VERSION or not isinstance(doc.get("backbones"), dict):
        raise RegistryError(f"the backbone registry {path} is not a version {REGISTRY_VERSION} registry "
                            '({"version": 1, "backbones": {...}})')
    out = {}
    for name, entry in doc["backbones"].items():
        try:
            out[name] = RegisteredBackbone(name=name, timm_arch=entry.get("timm_arch") or _timm_part(name),
                                           file=str(entry["file"]), sha256=str(entry["sha256"]).lower(),
                                           size_bytes=int(entry.get("size_bytes", 0)),
                                           added_at=str(entry.get("added_at", "")), auto=bool(entry.get("auto", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RegistryError(f"the backbone registry {path}: entry {name!r} needs file, sha256 and (unless its "
                                f"name is timm/<model>) timm_arch ({exc})") from None
    return out


def _timm_part(name: str) -> str:
    if not name.startswith("timm/"):
        raise KeyError("timm_arch")
    return name[len("timm/"):]


def check_name(name: str, builtin: set[str]) -> None:
    if name in builtin:
        raise RegistryError(f"{name!r} is a built-in backbone; register the file under another name")
    if name.startswith("timm/"):
        return
    if not re.fullmatch(NAME_PATTERN, name):
        raise RegistryError(f"backbone name {name!r}: 1 to 63 lowercase letters, digits, '.', '_' and '-', starting "
                            f"with a letter or digit (or timm/<model> for a timm model's own weights)")


def check_file(file: Path) -> Path:
    file = Path(file).expanduser().resolve()
    if not file.is_file():
        raise RegistryError(f"{file} is not a file")
    if file.suffix not in WEIGHT_SUFFIXES:
        raise RegistryError(f"{file}: give a .safetensors file (preferred) or a PyTorch state dict "
                            f"({', '.join(WEIGHT_SUFFIXES[1:])})")
    return file


def write_entry(path: Path, entry: RegisteredBackbone) -> None:
    """Add `entry` (a name not yet registered) to the registry at `path`, atomically."""
    _update(path, lambda entries: _added(entries, entry, path))


def remove_entry(path: Path, name: str) -> RegisteredBackbone:
    removed: list[RegisteredBackbone] = []

    def drop(entries):
        if name not in entries:
            raise RegistryError(f"no backbone {name!r} is registered in {path}")
        removed.append(entries.pop(name))
        return entries
    _update(path, drop)
    return removed[0]


def _added(entries: dict, entry: RegisteredBackbone, path: Path) -> dict:
    if entry.name in entries:
        raise RegistryError(f"backbone {entry.name!r} is already registered in {path}; models trained on it "
                            "expect that file: register the new one under another name")
    entries[entry.name] = entry
    return entries


def _update(path: Path, change) -> None:
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two operators' commands at once: one after the other
        entries = change(read_registry(path))
        doc = {"version": REGISTRY_VERSION, "backbones": {
            name: {k: v for k, v in asdict(e).items() if k != "name"} for name, e in sorted(entries.items())}}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)  # readers see the old file or the new one


def new_entry(name: str, timm_arch: str, file: Path, sha256: str, auto: bool = False) -> RegisteredBackbone:
    return RegisteredBackbone(name=name, timm_arch=timm_arch, file=str(file), sha256=sha256,
                              size_bytes=file.stat().st_size,
                              added_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), auto=auto)
