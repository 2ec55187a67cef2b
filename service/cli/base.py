"""The `graft` command's shared parts: the Typer apps, output consoles and common options."""
from __future__ import annotations

import logging
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console

log = logging.getLogger("graft")
out = Console()
err = Console(stderr=True)

app = typer.Typer(name="graft", help="Transfer learning on images as a service.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
datasets_app = typer.Typer(help="Upload and inspect datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect, watch and cancel training jobs.", no_args_is_help=True)
models_app = typer.Typer(help="Inspect and export trained models.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
keys_app = typer.Typer(help="Create API keys on the server's own machine (bootstrap).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's JSON answer instead of tables")]


class LogFormat(str, Enum):
    auto = "auto"
    json = "json"
    text = "text"


LogFormatOpt = Annotated[LogFormat, typer.Option(envvar="GRAFT_LOG_FORMAT",
                                                  help="json, text, or auto: text on a terminal")]



@app.callback()
def _root(ctx: typer.Context,
          url: Annotated[Optional[str], typer.Option(envvar="GRAFT_URL", help="Graft API to talk to "
                                                     "(default: http://127.0.0.1:8000)")] = None,
          api_key: Annotated[Optional[str], typer.Option(envvar="GRAFT_API_KEY", show_default=False,
                                                         help="sent as `Authorization: Bearer`")] = None):
    """Transfer learning on images as a service."""
    ctx.obj = {"url": url, "api_key": api_key}


