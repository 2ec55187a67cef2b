from fastapi import Request

from service.errors import UnsupportedMediaType


def require_multipart(request: Request) -> None:
    """Uploads are multipart/form-data; anything else is a 415 before the body is read."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedMediaType("send multipart/form-data with the file in a part named 'file'")
