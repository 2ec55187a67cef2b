"""Request body cap, enforced while bytes arrive (Starlette has none), chunked bodies included."""
from __future__ import annotations

from starlette.exceptions import HTTPException

from service.api.problems import problem


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body exceeds the {self.max_bytes}-byte limit"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await problem(413, too_big, "payload_too_large")(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes FastAPI's body parsing untouched and becomes a 413.
                    raise HTTPException(413, too_big)
            return message

        await self.app(scope, counting_receive, send)
