"""The recipe's defaults have one home (workers/config.py TrainConfig): `graft train --help` and the
dashboard's training form show exactly those, and cannot drift from them."""
from __future__ import annotations

import json
import shutil
import subprocess
from typing import get_args

import pytest
import typer
from typer.testing import CliRunner

from service import cli
from service.app import create_app
from service.cli.job_options import current_schema, job_schema
from tests.support.data import REPO
from workers.config import TrainConfig

REWRITE = ".venv/bin/python -c 'from service.cli.job_options import write_schema; write_schema()'"


def test_the_cli_reads_the_job_schema_of_the_api_itself():
    assert job_schema() == current_schema(), f"service/cli/job_request.json is stale: run {REWRITE}"


def train_options() -> dict[str, str]:
    train = typer.main.get_command(cli.app).commands["train"]
    return {p.name: p.help or "" for p in train.params if isinstance(p, typer.core.TyperOption)}


def test_train_help_shows_every_recipe_field_with_the_api_default():
    options = train_options()
    for name, field in TrainConfig.model_fields.items():
        assert name in options, f"graft train has no --{name.replace('_', '-')}"
        if field.default is not None:
            shown = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
            assert options[name].endswith(f"(default: {shown})"), (name, options[name])
    for choice in get_args(TrainConfig.model_fields["strategy"].annotation):
        assert choice in options["strategy"]
    # What a user reads: the strategy left out is auto, the API's default (it once said linear_probe).
    text = CliRunner().invoke(cli.app, ["train", "--help"], terminal_width=400, env={"COLUMNS": "400"}).output
    assert "(default: auto)" in text and "(default: linear_probe)" not in text


def test_train_help_gives_the_per_strategy_defaults_of_fields_the_strategy_fills():
    assert "60 linear_probe" in train_options()["epochs"] and "auto chooses" in train_options()["epochs"]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_dashboard_form_takes_its_choices_and_defaults_from_the_served_schema(settings):
    openapi = create_app(settings).openapi()
    script = """
        const { jobRequestSchema, recipeField } = require(process.argv[1]);
        const schema = jobRequestSchema(JSON.parse(require("fs").readFileSync(0, "utf8")));
        const fields = ["strategy", "backbone", "batch_size", "epochs"].map((n) => recipeField(schema, n));
        console.log(JSON.stringify(Object.fromEntries(fields.map((f) => [f.name, f]))));"""
    done = subprocess.run(["node", "-e", script, str(REPO / "service" / "static" / "recipe.js")],
                          input=json.dumps(openapi), capture_output=True, text=True, timeout=30, check=True)
    form = json.loads(done.stdout)
    fields = TrainConfig.model_fields
    assert form["strategy"]["default"] == fields["strategy"].default == "auto"
    assert form["strategy"]["choices"] == list(get_args(fields["strategy"].annotation))
    assert form["backbone"]["default"] == fields["backbone"].default
    assert form["batch_size"]["hint"] == str(fields["batch_size"].default)
    assert (form["batch_size"]["minimum"], form["batch_size"]["maximum"]) == (1, 1024)
    assert form["epochs"]["default"] is None and "60 linear_probe" in form["epochs"]["hint"]
