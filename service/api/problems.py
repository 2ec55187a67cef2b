"""The one translation of errors to RFC 9457 problem+json responses."""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from service.errors import GraftError

log = logging.getLogger("graft.api")
PROBLEM_JSON = "application/problem+json"


def problem(status: int, detail: str, code: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    body = {"type": f"https://graft.dev/problems/{code}", "title": HTTPStatus(status).phrase,
            "status": status, "detail": detail, "code": code, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """Every method the request's path answers, which RFC 9110 wants in a 405's Allow: Starlette's own
    names only the first route's, and GET and POST /v1/datasets are two routes. Mounts (static files)
    answer any method's match, so they are left to their own header."""
    def answers(method: str) -> bool:
        scope = {"type": "http", "path": request.scope["path"], "root_path": request.scope.get("root_path", ""),
                 "method": method, "headers": []}
        return any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes
                   if not isinstance(route, Mount))
    return ", ".join(m for m in METHODS if answers(m))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GraftError)
    async def _graft(_: Request, exc: GraftError):
        return problem(exc.status, exc.detail, exc.code, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return problem(422, f"invalid request: {where}", "validation_error", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such route; see /docs for the API"
        headers = dict(exc.headers or {})  # part of the answer, e.g. a 405's Allow
        if exc.status_code == 405 and (allowed := allowed_methods(request)):
            headers["Allow"] = allowed
        return problem(exc.status_code, detail, HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_"),
                       headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return problem(500, "internal error; this is a bug in Graft, please report it", "internal_error")
