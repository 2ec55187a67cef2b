"""The OpenAPI document tells the truth about errors: every 4xx is application/problem+json.

FastAPI documents a 422 `HTTPValidationError` in JSON for every route with parameters, which
Graft never sends (errors.py turns validation errors into problem+json). This replaces it and
documents the 4xx range once per operation, so clients and schemathesis see what really comes.
An error response a route declares without a body (readyz's 503) gets the same problem body, and
multipart file fields are declared the way client generators read them (OpenAPI 3.0's
`format: binary`, beside FastAPI's 3.1 `contentMediaType`), a list of files with at least one.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.problems import PROBLEM_JSON
from service.api.routes._multipart import MULTIPART

PROBLEM_SCHEMA = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details; some errors add fields (rejected, problems, errors...)",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "what was wrong and what is allowed"},
        "code": {"type": "string"},
    },
    "additionalProperties": True,
}


def install_problem_docs(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
            problem = {"description": "the request was refused; `detail` says why",
                       "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    responses["4XX"] = problem
                    for status, response in responses.items():
                        if status[0] in "45" and "content" not in response:
                            response["content"] = problem["content"]
                    declare_file_fields(operation, schema["components"]["schemas"])
            for unused in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def declare_file_fields(operation: dict, components: dict) -> None:
    """In a multipart body, a file is `{type: string, format: binary}` and a list of files has one at least."""
    body = operation.get("requestBody", {}).get("content", {}).get(MULTIPART, {}).get("schema", {})
    body = components.get(body.get("$ref", "").rsplit("/", 1)[-1], body)
    for field in body.get("properties", {}).values():
        if field.get("type") == "array" and _is_file(field.get("items", {})):
            field["items"]["format"] = "binary"
            field["minItems"] = 1
        elif _is_file(field):
            field["format"] = "binary"


def _is_file(field: dict) -> bool:
    return field.get("type") == "string" and "contentMediaType" in field
