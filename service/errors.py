"""Domain errors: what went wrong, for whom, and the HTTP status it maps to (service/api/problems.py
turns them into problem+json, in one place)."""
from __future__ import annotations


class GraftError(Exception):
    """An error the caller can act on. `detail` says what was wrong and what is allowed."""

    status = 400
    code = "bad_request"

    headers: dict[str, str] = {}

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        self.headers = headers or self.headers


class Unauthorized(GraftError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(GraftError):
    status, code = 403, "forbidden"


class TooManyRequests(GraftError):
    status, code = 429, "too_many_requests"


class NotFound(GraftError):
    status, code = 404, "not_found"


class Conflict(GraftError):
    status, code = 409, "conflict"


class InvalidInput(GraftError):
    status, code = 422, "invalid_input"


class UnsupportedMediaType(GraftError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(GraftError):
    status, code = 413, "payload_too_large"
