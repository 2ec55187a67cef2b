"""`graft train`'s recipe options, built from the job request's schema, so that its help, defaults
and choices are the API's: TrainConfig (workers/config.py) plus POST /v1/jobs' own fields.

The CLI starts without torch, and TrainConfig's module imports the backbone registry (torch, 15 s
cold on a small machine), so the schema is read from job_request.json, a copy that write_schema()
writes from JobCreate.model_json_schema(). tests/unit/test_job_options.py fails when the copy and
the model differ, and says how to rewrite it.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

SCHEMA_FILE = Path(__file__).with_name("job_request.json")
ARGUMENTS = ("dataset_id",)  # fields that are positional arguments, not options
_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str}


@lru_cache
def job_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def current_schema() -> dict:
    """The job request's schema from the model itself (imports the server and torch)."""
    from service.api.schemas import JobCreate

    return JobCreate.model_json_schema()


def write_schema() -> None:
    """Rewrite job_request.json after TrainConfig or JobCreate changed."""
    SCHEMA_FILE.write_text(json.dumps(current_schema(), indent=1) + "\n")


@dataclass(frozen=True)
class JobOption:
    field: str
    kind: type
    default: Any  # the API's default; None: chosen per strategy, or unset
    choices: tuple[str, ...]
    help: str


def job_options(schema: dict | None = None) -> list[JobOption]:
    schema = schema or job_schema()
    return [_option(name, prop, schema) for name, prop in schema["properties"].items() if name not in ARGUMENTS]


def _option(name: str, prop: dict, schema: dict) -> JobOption:
    typed = next((p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"), prop)
    choices = tuple(typed.get("enum", ()))
    default = prop.get("default")
    text = "; ".join(part for part in (prop.get("description"), " | ".join(choices)) if part)
    return JobOption(name, _TYPES[typed["type"]], default, choices,
                     f"{text} (default: {_default_text(name, default, schema)})".strip())


def _default_text(name: str, default: Any, schema: dict) -> str:
    if default is not None:
        return str(default).lower() if isinstance(default, bool) else str(default)
    per_strategy = {s: d[name] for s, d in schema.get("x-strategy-defaults", {}).items() if name in d}
    common = schema.get("x-common-defaults", {})
    if per_strategy:
        return ", ".join(f"{v} {s}" for s, v in per_strategy.items()) + "; auto chooses"
    if name in common:
        value = common[name]
        return f"{str(value).lower() if isinstance(value, bool) else value}; auto chooses"
    return "unset"


def with_job_options(command: Callable) -> Callable:
    """Give `command` (which takes the options as **recipe) one CLI option per job request field,
    placed before its own keyword options; an option left out is not sent (the API's default)."""
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    leading = [p for p in params if p.default is p.empty]
    trailing = [p.replace(kind=p.KEYWORD_ONLY) for p in params if p.default is not p.empty]
    recipe = [inspect.Parameter(o.field, inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation=Annotated[Optional[o.kind], typer.Option(help=o.help, show_default=False)])
              for o in job_options()]
    command.__signature__ = signature.replace(parameters=[*leading, *recipe, *trailing])
    command.__annotations__ = {**command.__annotations__, **{p.name: p.annotation for p in recipe}}
    return command
