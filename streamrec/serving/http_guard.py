"""What uvicorn's httptools protocol leaves unbounded about a request's head, and percent-encoding
that is not UTF-8.

`GuardedHttpToolsProtocol` (the protocol every serving stack runs, `server.run_uvicorn`):
- **Head size.** httptools buffers a header line until it ends, however long: a header that never
  ended grew a worker by 357 MB for 300 MB sent (and slowed every request of the worker). A head
  that passes `MAX_HEAD_BYTES` gets 431 and the connection is closed. The bytes are counted per
  read while the head is incomplete, so the bound holds to within one read (at most 256 KiB).
- **Head time.** uvicorn times nothing before a request's head is complete: neither a new
  connection that sends nothing nor one that sends a head a byte at a time (slowloris) was ever
  closed, and enough of them take every file descriptor of the worker. A head must now be complete
  within `HEAD_TIMEOUT_S` of the connection (or of the request's first byte): 408, then closed.
  Between requests uvicorn's own keep-alive timeout applies.

`StrictPercentEncoding` (ASGI middleware): Starlette decodes a percent-encoded query or path as
UTF-8 with replacement, so `caf%E9`, `caf%E8` and `caf%FF` (Latin-1 clients) all became the user
`caf\ufffd`, one history shared by all of them. A path or query whose percent-decoded bytes are not
UTF-8 is now refused (400); the check runs only on strings that hold a `%`.

`{name:id}` in a route: one path parameter that is a whole id, whatever it holds. uvicorn decodes
`%2F` before routing, so Starlette's default parameter (no `/`) missed `/similar/cat%2Fa`, and its
`path` parameter (`.*`) misses an id with a newline.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote_to_bytes

import orjson
from starlette.convertors import Convertor, register_url_convertor
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from streamrec.serving.limits import send_detail

MAX_HEAD_BYTES = 1 << 20  # request line and headers; h11's default is 16 KiB, nginx's 8 KiB per line
HEAD_TIMEOUT_S = 10.0
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
BAD_ENCODING = "the path or query percent-encodes bytes that are not UTF-8"


class IdConvertor(Convertor[str]):
    regex = r"[\s\S]+"  # any character, "/" and newlines included

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("id", IdConvertor())


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size and a time bound on each request's head."""

    _head_bytes = 0
    _head_done = False
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head()

    def on_headers_complete(self) -> None:
        self._head_done = True
        self._stop_head_timer()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._head_done and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"the request's head is over {MAX_HEAD_BYTES} bytes")

    def _start_head(self) -> None:
        self._head_bytes, self._head_done = 0, False
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_done and not self.transport.is_closing():
            self._refuse(408, f"the request's head was not complete within {HEAD_TIMEOUT_S:g} s")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer `status` and close; while an earlier (pipelined) request is still being answered,
        only close after its response, without a word for the unfinished one."""
        self._stop_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        body = orjson.dumps({"detail": detail})
        self.transport.write(b"".join([
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]), b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body,
        ]))
        self.transport.close()


class StrictPercentEncoding:
    """400 for a request whose percent-decoded path or query is not UTF-8 (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for part in (scope.get("raw_path") or b"", scope["query_string"]):
                if b"%" in part and not _utf8(unquote_to_bytes(part)):
                    await send_detail(send, 400, BAD_ENCODING)
                    return
        await self.app(scope, receive, send)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
