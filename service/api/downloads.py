"""Downloads that end with their key: a file streamed in chunks, the caller's key re-checked before
each one, so a revoked key (or a deleted project) stops an export mid-transfer, as it stops an
event stream."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from fastapi.responses import StreamingResponse

from service.api.auth import Caller, still_valid
from service.store.db import Database

CHUNK_BYTES = 1 << 20  # one key lookup (well under a millisecond) per MiB sent


def file_while_key_valid(path: Path, db: Database, caller: Caller, media_type: str, filename: str,
                         chunk_bytes: int = CHUNK_BYTES) -> StreamingResponse:
    """`path` as an attachment. The length is declared, so a client whose key was revoked
    mid-transfer sees a short body (an error), never a complete-looking file."""
    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(chunk_bytes):
                with db.session(readonly=True) as s:
                    if not still_valid(s, caller):
                        return
                yield block

    return StreamingResponse(chunks(), media_type=media_type,
                             headers={"Content-Length": str(path.stat().st_size),
                                      "Content-Disposition": f'attachment; filename="{filename}"'})
