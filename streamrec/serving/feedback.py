"""POST /events: feedback over HTTP (issue 13), one event or an array of up to 10,000.

The handler is a coroutine that reads the body and hands the work (validation, Redis, the
produce and its acknowledgement, all blocking) to the thread pool, so the event loop never waits
for the broker. The request body is decoded by the trainer's own schema rather than by a pydantic
model: invalid events are reported per position and dead-lettered with the schema's reason, not
refused as a whole; `schemas.FeedbackEvent` documents the shape in OpenAPI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.params import Depends
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from streamrec.serving import schemas
from streamrec.serving.auth import UNAUTHORIZED
from streamrec.serving.config import MAX_EVENTS_PER_REQUEST, ServingConfig
from streamrec.serving.ingest import BadRequest, EventIngest, Unavailable, parse_body
from streamrec.serving.limits import STATUS as TOO_LARGE
from streamrec.serving.metrics import ServingMetrics

CLIENT_CLOSED = 499


def _json(body: dict[str, object], status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def _request_body() -> dict[str, object]:
    """OpenAPI requestBody: one event or an array of them (declared by hand: the route reads raw bytes)."""
    event = schemas.FeedbackEvent.model_json_schema()
    return {"required": True, "content": {"application/json": {"schema": {"oneOf": [
        event, {"type": "array", "items": event, "maxItems": MAX_EVENTS_PER_REQUEST}]}}}}


RESPONSES: dict[int | str, dict[str, object]] = {
    202: {"model": schemas.EventsAccepted, "description": "every valid event acknowledged by the broker "
          "(or produced before: duplicates); invalid ones dead-lettered, listed in `rejected`"},
    400: {"model": schemas.Error, "description": "the body is not JSON"},
    TOO_LARGE: {"model": schemas.Error, "description": f"more than {MAX_EVENTS_PER_REQUEST} events, or the body "
                "over this endpoint's byte cap"},
    422: {"model": schemas.Error, "description": "the body is neither an event object nor an array"},
    503: {"model": schemas.Error, "description": "the broker did not acknowledge (or the ids are being produced "
          "by another request): nothing is acknowledged, retry the whole request after Retry-After seconds",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
    **UNAUTHORIZED,
}


def add_feedback_routes(app: FastAPI, config: ServingConfig, metrics: ServingMetrics, guarded: list[Depends]) -> None:
    """Register POST /events on `app`; the worker's producer is closed when the app shuts down."""
    ingest = EventIngest(config, metrics)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[object]:
        async with inner(application) as state:
            try:
                yield state
            finally:
                await run_in_threadpool(ingest.close)

    app.router.lifespan_context = lifespan

    @app.post("/events", dependencies=guarded, status_code=202, response_class=Response, responses=RESPONSES,
              openapi_extra={"requestBody": _request_body()})
    async def events(request: Request) -> Response:
        """Feedback: validate with the trainer's schema, produce to the interaction topic, answer once
        the broker acknowledged. Idempotent by `event_id` (docs/serving.md, "Feedback")."""
        try:
            raw = await request.body()
        except ClientDisconnect:  # nobody to answer; 499 (nginx's "client closed request"), not a 5xx
            return Response(status_code=CLIENT_CLOSED)
        try:
            outcome = await run_in_threadpool(lambda: ingest.ingest(parse_body(raw)))
        except BadRequest as exc:
            return _json({"detail": exc.detail}, exc.status)
        except Unavailable as exc:
            return _json({"detail": exc.detail}, 503, {"Retry-After": str(exc.retry_after)})
        return _json(outcome.body(), 202)
