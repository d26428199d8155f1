"""Request body caps per route, enforced before the body is read (pure ASGI middleware).

A declared Content-Length over the cap is refused at once, before the application runs; a chunked
body (no Content-Length) is counted as it streams in and refused as soon as it passes the cap, so a
worker never holds more than the cap plus one chunk of any request. A body that stops arriving
(a Content-Length larger than what is sent) is answered 408 once no part of it has come for
`read_timeout_s`: uvicorn waits for a body as long as the client likes, so each such request held
a connection and its handler for ever. A body trickled a byte at a time (each byte restarting that
timer) must also keep to `MIN_BODY_RATE`: all of it within `read_timeout_s` plus one second per
64 KiB received, else 408.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATUS = 413
TIMEOUT_STATUS = 408
MIN_BODY_RATE = 64 << 10  # bytes per second a body must average (after its first read_timeout_s)
# the rest of a refused body is never read, so the connection cannot carry another request: whoever
# answers (this middleware, or FastAPI's handler when the error rises while it reads the body) says
# so and uvicorn closes it at once (before, a 408 from FastAPI left it open, the unread body pending)
CLOSE = {"connection": "close"}


class BodyTooLarge(HTTPException):
    """A request body over its route's cap. An HTTPException, so that FastAPI, which wraps other errors
    raised while it reads a body into a 400, passes it on and answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(STATUS, f"request body over the {limit}-byte limit of this endpoint", headers=CLOSE)


class BodyStalled(HTTPException):
    """No part of a request body came for the read timeout, or the body came slower than
    MIN_BODY_RATE (an HTTPException, as BodyTooLarge)."""

    def __init__(self, seconds: float, trickled: bool = False) -> None:
        super().__init__(TIMEOUT_STATUS, f"the request body arrived slower than {MIN_BODY_RATE} bytes/s" if trickled
                         else f"no part of the request body arrived for {seconds:g} s", headers=CLOSE)


class BodyLimit:
    """413 for bodies over `routes[path]` bytes (exact path), or over `default` for any other path;
    408 for a body of which nothing arrives for `read_timeout_s`."""

    def __init__(self, app: ASGIApp, default: int, routes: Mapping[str, int], read_timeout_s: float = 30.0) -> None:
        self.app, self.default, self.routes, self.read_timeout_s = app, default, dict(routes), read_timeout_s

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
        # a request that declares no body (most GETs) gets no timer: asyncio.wait_for costs a task
        complete = declared == 0 or (declared is None and not _chunked(scope))

        first_read: float | None = None

        async def counting_receive() -> Message:
            nonlocal received, complete, first_read
            if complete:  # after the body, a receive waits for the client to disconnect: no timeout
                return await receive()
            now = time.monotonic()
            first_read = now if first_read is None else first_read
            paced = first_read + self.read_timeout_s + received / MIN_BODY_RATE - now
            if paced <= 0:
                raise BodyStalled(self.read_timeout_s, trickled=True)
            try:
                message = await asyncio.wait_for(receive(), min(self.read_timeout_s, paced))
            except TimeoutError:
                raise BodyStalled(self.read_timeout_s, trickled=paced < self.read_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except (BodyTooLarge, BodyStalled) as exc:
            if started:  # the application answered before it read the rest; nothing left to say
                raise
            await _refuse(send, exc)


def _chunked(scope: Scope) -> bool:
    return any(name == b"transfer-encoding" for name, _ in scope["headers"])


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects a malformed length before we run
    return None


async def _refuse(send: Send, exc: HTTPException) -> None:
    await send_detail(send, exc.status_code, str(exc.detail), close=True)


async def send_detail(send: Send, status: int, detail: str, close: bool = False) -> None:
    """A `{"detail": ...}` JSON answer from ASGI middleware that answers before the application."""
    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"connection", b"close")] if close else headers})
    await send({"type": "http.response.body", "body": body})
