"""`graft backbones`: list what a running Graft can train on (over HTTP), and, on the server's own
machine, register weight files as extra backbones (the operator's registry, workers/backbone_registry.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from service.cli.base import JsonOpt, LogFormat, LogFormatOpt, app, err, out

backbones_app = typer.Typer(help="The backbones jobs can train on; register weight files on the server's machine.",
                            no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")


@backbones_app.command("list")
def backbones_list(ctx: typer.Context, as_json: JsonOpt = False):
    """Every backbone the server knows and its weights on the server's machine ("top": fine_tune_top can cut it; "fixed": image_size must be px; --json for the rest)."""
    from service.cli.commands import _answer

    _answer(ctx, lambda client: client.backbones(), as_json, _show)


def _show(rows: list[dict]) -> None:
    table = Table(title="backbones", box=None, pad_edge=False)  # no borders: long timm names fit 80 columns
    for column in ("name", "source", "weights", "px", "top"):
        table.add_column(column, no_wrap=True, overflow="fold" if column == "name" else "ellipsis")
    for b in rows:
        weights = f"{b['weights_bytes'] / 2**20:.1f} MiB" if b["weights_available"] else "[red]missing[/]"
        table.add_row(b["name"], b["source"], weights, f"{b['input_size']}{' fixed' if b['fixed_input_size'] else ''}",
                      "yes" if b["fine_tune_top"] else "")
    out.print(table)


@backbones_app.command("add")
def backbones_add(name: Annotated[str, typer.Argument(help="the backbone's name in jobs: a name of your own, or "
                                                     "timm/<model> to give a timm model its weights")],
                  file: Annotated[Path, typer.Option("--file", exists=True, dir_okay=False, help=(
                      "the weights: a .safetensors file (preferred) or a PyTorch state dict (.pth, .pt, .bin, "
                      "read with weights_only=True)"))],
                  timm_arch: Annotated[Optional[str], typer.Option("--timm-arch", help=(
                      "the timm model the weights are for, with its pretrained tag (e.g. "
                      "vit_base_patch14_dinov2.lvd142m): its architecture, and its pretrained config for the "
                      "preprocessing. Implied by a timm/<model> name"))] = None,
                  auto: Annotated[bool, typer.Option("--auto", help=(
                      "strategy auto may choose this backbone, besides the EfficientNet-Lites, when a job names "
                      "none"))] = False,
                  log_format: LogFormatOpt = LogFormat.auto):
    """Register a weights file on this machine: it must load into its architecture; its sha256 is recorded and checked at every load."""
    from service.cli.server import _settings
    from workers.backbone_registry import RegistryError
    from workers.backbones import WeightsUnavailable, builtin_backbones
    from workers.timm_backbones import register

    settings = _settings(log_format)
    try:
        spec = register(settings.backbone_registry_file, name, file, timm_arch, {s.name for s in builtin_backbones()},
                        auto=auto)
    except (RegistryError, WeightsUnavailable) as exc:
        raise typer.BadParameter(str(exc)) from None
    entry = spec.timm.registered
    err.print(f"registered backbone {spec.name} in {settings.backbone_registry_file}: timm {entry.timm_arch}, "
              f"{spec.feature_dim} features, {spec.preprocessing.input_size} px, sha256 {entry.sha256}")
    print(spec.name)


@backbones_app.command("remove")
def backbones_remove(name: str, log_format: LogFormatOpt = LogFormat.auto):
    """Forget a registered backbone (its file stays where it is). Models trained on it no longer load."""
    from service.cli.server import _settings
    from workers.backbone_registry import RegistryError, remove_entry

    settings = _settings(log_format)
    try:
        entry = remove_entry(settings.backbone_registry_file, name)
    except RegistryError as exc:
        raise typer.BadParameter(str(exc)) from None
    err.print(f"removed backbone {entry.name} ({entry.file}) from {settings.backbone_registry_file}")
