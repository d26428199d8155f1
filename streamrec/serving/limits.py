"""Request body caps per route, enforced before the body is read (pure ASGI middleware).

A declared Content-Length over the cap is refused at once, before the application runs; a chunked
body (no Content-Length) is counted as it streams in and refused as soon as it passes the cap, so a
worker never holds more than the cap plus one chunk of any request.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATUS = 413


class BodyTooLarge(HTTPException):
    """A request body over its route's cap. An HTTPException, so that FastAPI, which wraps other errors
    raised while it reads a body into a 400, passes it on and answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(STATUS, f"request body over the {limit}-byte limit of this endpoint")


class BodyLimit:
    """413 for bodies over `routes[path]` bytes (exact path), or over `default` for any other path."""

    def __init__(self, app: ASGIApp, default: int, routes: Mapping[str, int]) -> None:
        self.app, self.default, self.routes = app, default, dict(routes)

    def limit(self, path: str) -> int:
        return self.routes.get(path, self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, BodyTooLarge(limit))
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:  # the application answered before it read the rest; nothing left to say
                raise
            await _refuse(send, exc)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects a malformed length before we run
    return None


async def _refuse(send: Send, exc: BodyTooLarge) -> None:
    body = orjson.dumps({"detail": exc.detail})
    await send({"type": "http.response.start", "status": STATUS,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
