"""Multipart uploads: what the routes that take files share."""
from fastapi import Request

from service.errors import UnsupportedMediaType

MULTIPART = "multipart/form-data"


def require_multipart(request: Request) -> None:
    """Uploads are multipart/form-data; anything else is a 415 before the body is read."""
    if not request.headers.get("content-type", "").startswith(MULTIPART):
        # RFC 9110 15.5.16: a 415 can say in Accept which media types would have been taken.
        raise UnsupportedMediaType("send multipart/form-data with the file in a part named 'file'",
                                   headers={"Accept": MULTIPART})
