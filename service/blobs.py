"""Content-addressed file store: the same bytes are kept once, named by their sha256."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class BlobStore:
    def __init__(self, root: Path):
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)  # atomic: concurrent writers of the same bytes agree
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return digest

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()
