"""The direct /recommend route takes only queries FastAPI certainly accepts with the same values;
everything else is left to FastAPI (None), so 422s and odd-but-valid forms stay FastAPI's."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import HTTPException
from fastapi.security import HTTPAuthorizationCredentials

from streamrec.serving.auth import bearer_guard
from streamrec.serving.fastpath import RecommendFastPath, RecommendQuery, parse


@pytest.mark.parametrize(("query", "expected"), [
    (b"user_id=u1", RecommendQuery("u1", 10, True, 0.0, False)),
    (b"user_id=u1&k=25&exclude_seen=false&diversity=0.3&explain=true", RecommendQuery("u1", 25, False, 0.3, True)),
    (b"user_id=caf%C3%A9&k=1000&exclude_seen=0&explain=1", RecommendQuery("caf\u00e9", 1000, False, 0.0, True)),
    (b"user_id=a&user_id=b&k=3&unknown=x", RecommendQuery("b", 3, True, 0.0, False)),  # last value, extras ignored
    (b"user_id=u&diversity=1", RecommendQuery("u", 10, True, 1.0, False)),
    (b"user_id=u&device=ios&hour=07", RecommendQuery("u", 10, True, 0.0, False, device="ios", hour=7)),
    (b"user_id=u&device=a%3Ab&hour=23", RecommendQuery("u", 10, True, 0.0, False, device="a:b", hour=23)),
    # more digits than int() converts (4,300): a ValueError, so a 500, before the zeros were stripped
    (b"user_id=u&k=" + b"0" * 5000 + b"5&hour=" + b"0" * 5000 + b"7", RecommendQuery("u", 5, True, 0.0, False, hour=7)),
])
def test_plain_queries_are_parsed(query: bytes, expected: RecommendQuery) -> None:
    assert parse(query) == expected


@pytest.mark.parametrize("query", [
    b"", b"k=5", b"user_id=", b"user_id=" + b"x" * 257, b"user_id=u&k=0", b"user_id=u&k=1001", b"user_id=u&k=ten",
    b"user_id=u&k=", b"user_id=u&k=+5", b"user_id=u&k=%D9%A1", b"user_id=u&exclude_seen=maybe",
    b"user_id=u&exclude_seen=True", b"user_id=u&explain=", b"user_id=u&diversity=1.5", b"user_id=u&diversity=-0.1",
    b"user_id=u&diversity=nan", b"user_id=u&diversity=.5", b"user_id=u&diversity=1e-1",
    b"user_id=u&device=", b"user_id=u&device=" + b"x" * 65, b"user_id=u&hour=24", b"user_id=u&hour=-1",
    b"user_id=u&hour=", b"user_id=u&hour=%D9%A3", b"user_id=u&k=" + b"9" * 5000, b"user_id=u&hour=" + b"1" * 5000,
    b"user_id=u&k=" + b"9" * 5000 + b"&exclude_seen=maybe",
])
def test_everything_else_is_left_to_fastapi(query: bytes) -> None:
    assert parse(query) is None


@pytest.mark.parametrize("token", ["plain-ascii-token", "t\u00f6k\u00e9n-\u2713"])
def test_the_guard_and_the_direct_route_accept_the_same_bytes(token: str) -> None:
    """Both compare the header's bytes with the token's UTF-8. Starlette decodes headers as
    latin-1; the guard encoded them back as UTF-8, so a non-ASCII token could never match (and
    the direct route left such tokens to it)."""
    guard = bearer_guard(token)
    route = RecommendFastPath(None, None, token)  # type: ignore[arg-type]
    for raw, accepted in ((b"Bearer " + token.encode(), True), (b"bEARER " + token.encode(), True),
                          (b"Bearer " + token.encode()[:-1], False), (b"Bearer x", False)):
        scope = {"headers": [(b"authorization", raw)]}
        assert route._authorised(scope) is accepted, raw
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=raw[7:].decode("latin-1"))
        if accepted:
            asyncio.run(guard(credentials))
        else:
            with pytest.raises(HTTPException):
                asyncio.run(guard(credentials))
