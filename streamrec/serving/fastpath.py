"""A direct route for well-formed `GET /recommend` requests (pure ASGI middleware).

FastAPI's per-request work around a handler (routing, dependency solving, pydantic validation of
each query parameter, the Response object) cost about as much CPU as the recommendation itself in
the py-spy profile of a worker at 1,000 req/s (issue 16). This
middleware answers the requests whose query is in a plain form that is certainly valid and whose
bearer token (when one is configured) matches exactly; every other request, including each one
that FastAPI would refuse, goes on to the FastAPI route, so 401 and 422 answers, the OpenAPI
document and the accepted input are exactly FastAPI's. Both paths call the same handler.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from typing import NamedTuple
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from streamrec.serving.config import MAX_K
from streamrec.serving.filters import NO_FILTER, PARAMETERS, FilterError, ItemFilter

PATH = "/recommend"
MAX_USER_ID = 256  # characters, as the route's Query(max_length=256)
MAX_DEVICE = 64  # characters, as the route's `device`
_BOOLS = {"true": True, "false": False, "1": True, "0": False}
_FRACTION = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")  # ASCII digits: float() also reads "١" (Arabic-Indic), FastAPI does not
_HEADERS = [(b"content-type", b"application/json")]


class RecommendQuery(NamedTuple):
    user_id: str
    k: int
    exclude_seen: bool
    diversity: float
    explain: bool
    item_filter: ItemFilter = NO_FILTER
    device: str | None = None
    hour: int | None = None


Handler = Callable[[RecommendQuery], Awaitable[tuple[int, bytes]]]  # (status, JSON body)


def parse(query_string: bytes) -> RecommendQuery | None:
    """The query when every parameter is in a form FastAPI certainly accepts with the same value
    (digits for k, true/false/1/0, a plain decimal in [0, 1]); None: let FastAPI decide. The
    string is read as Starlette reads it (latin-1, last value of a repeated name wins; the filter
    parameters include, exclude, range and available repeat). A filter `ItemFilter.parse` refuses is left to
    the FastAPI route, which refuses it in the same words."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    params = dict(pairs)
    item_filter = NO_FILTER
    if PARAMETERS & params.keys():
        try:
            item_filter = ItemFilter.parse(*([v for n, v in pairs if n == name] for name in PARAMETERS))
        except FilterError:
            return None
    user_id = params.get("user_id", "")
    if not 0 < len(user_id) <= MAX_USER_ID:
        return None
    k = _bounded_int(params.get("k", "10"), 1, MAX_K)
    if k is None:
        return None
    exclude_seen = _BOOLS.get(params.get("exclude_seen", "true"))
    explain = _BOOLS.get(params.get("explain", "false"))
    diversity_text = params.get("diversity", "0")
    if exclude_seen is None or explain is None or not _FRACTION.match(diversity_text):
        return None
    diversity = float(diversity_text)
    if diversity > 1.0:
        return None
    device = params.get("device")
    if device is not None and not 0 < len(device) <= MAX_DEVICE:
        return None
    hour_text = params.get("hour")
    hour = None if hour_text is None else _bounded_int(hour_text, 0, 23)
    if hour_text is not None and hour is None:
        return None
    return RecommendQuery(user_id, k, exclude_seen, diversity, explain, item_filter, device, hour)


def _bounded_int(text: str, low: int, high: int) -> int | None:
    """The ASCII decimal `text` as an int within [low, high], else None (FastAPI then answers).
    `int()` refuses more than 4,300 digits with a ValueError, which made a `k` of 5,000 zeros and
    a 5 a 500; leading zeros are stripped and the length checked before it converts."""
    if not (text.isdigit() and text.isascii()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)):
        return None
    value = int(digits)
    return value if low <= value <= high else None


class RecommendFastPath:
    """Answers well-formed, authorised `GET /recommend` with `handler`; passes everything else on."""

    def __init__(self, app: ASGIApp, handler: Handler, token: str | None) -> None:
        self.app, self.handler = app, handler
        self.token = token
        # the header's bytes against the token's UTF-8, as `auth.bearer_guard` compares them
        self.expected = b"" if token is None else b"bearer " + token.encode()

    def _authorised(self, scope: Scope) -> bool:
        if self.token is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                # "Bearer" in any case, one space, then the token: anything else is FastAPI's to judge
                presented = value[:7].lower() + value[7:]
                return hmac.compare_digest(presented, self.expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = None
        if scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "GET" and self._authorised(scope):
            query = parse(scope["query_string"])
        if query is None:
            await self.app(scope, receive, send)
            return
        status, body = await self.handler(query)
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_HEADERS, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
