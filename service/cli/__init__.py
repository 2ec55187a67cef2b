"""The `graft` command.

Run Graft: `graft serve` (API + worker processes), `graft worker`, `graft migrate`.
Use a running Graft (GRAFT_URL, GRAFT_API_KEY): `graft datasets upload DIR|ZIP`,
`graft train DATASET --watch`, `graft predict MODEL IMAGE...`, `graft models list|show|export`,
`graft jobs list|show|watch|cancel`. `--json` prints the API's answer instead of tables.

Client commands import no torch and no server code, so they start fast on any machine.
"""
from __future__ import annotations

import os
import sys

from service.cli import server, commands, backbones  # noqa: F401,I001  (they register their commands on `app`, in this order)
from service.cli.base import app, err
from service.client import GraftAPIError

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """`graft`: API errors and an unreachable server are one-line messages, not tracebacks."""
    import httpx

    try:
        app(args=argv, prog_name="graft", standalone_mode=True)
    except GraftAPIError as exc:
        err.print(f"[red]error {exc.status}:[/] {exc.detail}", highlight=False)
        sys.exit(1)
    except httpx.TransportError as exc:
        try:
            url = str(exc.request.url.copy_with(path="/", query=None))
        except RuntimeError:  # no request attached
            url = os.environ.get("GRAFT_URL", "http://127.0.0.1:8000")
        err.print(f"[red]cannot reach Graft[/] at {url} ({type(exc).__name__}: {exc}); is `graft serve` "
                  "running there? Set GRAFT_URL (or --url) to point elsewhere.", highlight=False)
        sys.exit(1)
    except FileNotFoundError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
