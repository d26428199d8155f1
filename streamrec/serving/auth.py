"""Optional bearer token for the HTTP API (`STREAMREC_API_TOKEN`).

Every route that answers about users or items depends on `bearer_guard`; /healthz, /readyz and
/metrics stay open for orchestrators and Prometheus. Recommendations, `explain=true` and the
seen-item filter reveal a user's history, so with a token set nothing of that is served without it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from streamrec.serving import schemas

SCHEME = HTTPBearer(auto_error=False, description="STREAMREC_API_TOKEN, when the server sets one")
UNAUTHORIZED = {401: {"model": schemas.Error, "description": "missing or wrong bearer token"}}


def bearer_guard(token: str | None) -> Callable[[HTTPAuthorizationCredentials | None], Coroutine[None, None, None]]:
    """A dependency that lets a request through when no token is configured, or when it presents
    `Authorization: Bearer <token>` (compared in constant time); 401 otherwise. It is a coroutine
    so FastAPI runs it on the event loop: a plain `def` would cost every request a hop through the
    thread pool, which the handlers themselves already take.

    The comparison is of bytes as sent: Starlette decodes a header as latin-1, so encoding the
    credentials back as latin-1 gives the client's bytes, compared with the token's UTF-8. Encoded
    as UTF-8 instead, a non-ASCII token could never match whatever the client sent."""
    expected = token.encode() if token is not None else None

    async def guard(credentials: HTTPAuthorizationCredentials | None = Depends(SCHEME)) -> None:
        if expected is None:
            return
        presented = credentials.credentials.encode("latin-1", "replace") if credentials is not None else b""
        if not hmac.compare_digest(presented, expected):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return guard
