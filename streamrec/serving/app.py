"""The HTTP API of one serving worker (FastAPI; OpenAPI at /docs and /openapi.json).

/recommend runs on the event loop: its work is short (one Redis round trip of ~0.1 ms, a FAISS
search that releases the GIL, numpy over a few hundred candidates), and in the profile a hop
through the thread pool per request cost more CPU than the overlap saved (issue 16, serving profile).
That holds for a user missing from the worker's user cache too: its row is pulled on the loop (one
round trip, at most `user_pull_timeout_s`); in the serving bench, pulls in the thread pool raised
p99 from 72 ms to 1.1 s (GIL hand-offs between the loop and the pool threads).
Well-formed /recommend requests take a direct route past FastAPI's per-request machinery
(streamrec.serving.fastpath). The other handlers are plain `def`, run in FastAPI's thread pool
(/rescore may score 10,000 candidates). The parameter-server sync runs in a background thread and
never blocks a request. Responses are encoded with orjson; the pydantic models in
`streamrec.serving.schemas` document them."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

import faiss
import orjson
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamrec.serving import schemas
from streamrec.serving.auth import UNAUTHORIZED, bearer_guard
from streamrec.serving.config import MAX_K, ServingConfig
from streamrec.serving.console import add_console_routes
from streamrec.serving.console.search import PrefixSearch
from streamrec.serving.context import ContextPopularity, RequestContext
from streamrec.serving.experiments import ExperimentsSource, combined
from streamrec.serving.explore import ExplorationPool
from streamrec.serving.fastpath import MAX_DEVICE, MAX_USER_ID, RecommendFastPath, RecommendQuery
from streamrec.serving.feedback import add_feedback_routes
from streamrec.serving.filters import MAX_CLAUSES, FilterError, ItemFilter
from streamrec.serving.history import History
from streamrec.serving.http_guard import BAD_ENCODING, StrictPercentEncoding
from streamrec.serving.impressions import ImpressionLog
from streamrec.serving.ingest import open_producer
from streamrec.serving.limits import STATUS as TOO_LARGE
from streamrec.serving.limits import BodyLimit
from streamrec.serving.metrics import (
    ENDPOINTS,
    ServingMetrics,
    mark_worker_dead,
    render,
    serving_metrics,
)
from streamrec.serving.pipeline import CandidatePipeline, Unavailable, UnknownItem
from streamrec.serving.server import FASTAPI_TELEMETRY
from streamrec.serving.state import ServingState, StateHolder
from streamrec.serving.sync import Syncer
from streamrec.serving.users import UserCache

MAX_CANDIDATES = 10_000
MAX_ID_BYTES = 256


def filter_refusal(exc: FilterError) -> dict[str, Any]:
    """A filter that cannot be applied, refused in the shape of FastAPI's own 422 (the OpenAPI
    document's HTTPValidationError), so clients parse one form of refusal."""
    return {"detail": [{"loc": ["query", "filter"], "msg": str(exc), "type": "value_error"}]}


async def validation_refusal(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's own 422, encoded by orjson: FastAPI's encoder refuses the non-finite floats that a
    body's `NaN`, `Infinity` or `1e309` parse to, and the refusal, which echoes the input, was a
    500 instead (orjson writes them as null). What orjson cannot write (an integer past 64 bits,
    nesting past 255 levels, a lone surrogate escaped in a field's name or value) goes through the
    standard encoder, its input left out, rather than failing the refusal."""
    errors = jsonable_encoder(exc.errors())
    try:
        body = orjson.dumps({"detail": errors})
    except orjson.JSONEncodeError:
        body = json.dumps({"detail": [{key: value for key, value in error.items() if key != "input"}
                                      for error in errors]}).encode()
    return Response(body, 422, media_type="application/json")


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json")


class RequestMetrics:
    """Pure ASGI middleware: latency per endpoint, requests and errors by status."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app, self.metrics = app, metrics
        self._latency = {e: metrics.request_seconds.labels(e) for e in (*ENDPOINTS, "other")}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._latency[endpoint].observe(time.perf_counter() - started)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(endpoint, str(status)).inc()


def _within_id_bytes(value: str) -> str:
    """maxLength counts characters; the cap is on UTF-8 bytes, what the index and Redis store."""
    if len(value.encode()) > MAX_ID_BYTES:
        raise ValueError(f"longer than {MAX_ID_BYTES} bytes in UTF-8")
    return value


WireId = Annotated[str, Field(max_length=MAX_ID_BYTES), AfterValidator(_within_id_bytes)]


class RescoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field /rescore does not take (`k`, say) is a 422, not ignored

    user_id: WireId = Field(min_length=1)
    candidates: list[WireId] = Field(min_length=1, max_length=MAX_CANDIDATES,
                                     description=f"at most {MAX_CANDIDATES} ids of at most {MAX_ID_BYTES} bytes")


def create_app(config: ServingConfig) -> FastAPI:
    metrics = serving_metrics()
    holder = StateHolder()
    experiments = ExperimentsSource(config.experiments_file)

    def experiments_in_force() -> None:
        """Each arm's series exists from the start (at 0), so rates of new arms are defined."""
        spec = experiments.current.spec
        metrics.experiments_loaded.set(len(spec.experiments))
        for experiment in spec.experiments:
            for arm in experiment.arms:
                metrics.arm_requests.labels(experiment.name, arm.name)

    def refresh_experiments() -> None:
        outcome = experiments.refresh()
        if outcome == "failed":
            metrics.experiments_reload_failures.inc()
        elif outcome == "loaded":
            experiments_in_force()

    experiments_in_force()

    # the console's item search sorts ids on the sync thread after each poll, never in a request
    console_search = PrefixSearch(holder)
    syncer = Syncer(config, holder, metrics, UserCache(config, metrics),
                    between_polls=(refresh_experiments, console_search.refresh))
    impressions = ImpressionLog(config.impressions_topic, partial(open_producer, config, [config.impressions_topic]),
                                config.max_pending_impressions, config.produce_timeout_s, config.impressions_flush_s) \
        if config.logs_impressions else None
    # an arm of the experiments file may explore even when the server's share is 0
    explore = ExplorationPool(config) if config.explore_share or config.experiments_file else None
    context = ContextPopularity(config) if config.context_slices else None
    pipeline = CandidatePipeline(config, History(config, metrics), metrics, explore, context)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        faiss.omp_set_num_threads(1)  # workers are processes; OpenMP threads would fight over cores
        stop = threading.Event()
        thread = threading.Thread(target=syncer.run, args=(stop,), name="serving-sync", daemon=True)
        thread.start()
        for reader in (explore, context):
            if reader is not None:
                reader.start()
        logger = None
        if impressions is not None:
            logger = threading.Thread(target=impressions.run, args=(stop,), name="serving-impressions", daemon=True)
            logger.start()
        # a worker started while others serve (uvicorn replacing a killed one) would answer 503
        # until it has a model: the socket is shared, so it accepts only once it has one (or the
        # parameter server has none to give, or first_poll_wait_s has passed)
        await asyncio.to_thread(syncer.ready.wait, config.first_poll_wait_s)
        try:
            yield
        finally:  # also when a wrapping lifespan's shutdown failed: the last impressions are flushed
            stop.set()
            thread.join(timeout=10)
            if logger is not None:  # its last flush waits at most produce_timeout_s for the broker
                logger.join(timeout=config.produce_timeout_s + 5)
            syncer.close()
            for reader in (explore, context):
                if reader is not None:
                    reader.close()
            await pipeline.history.close()
            mark_worker_dead(os.getpid())

    app = FastAPI(title="streamrec serving", version="1", lifespan=lifespan, telemetry=FASTAPI_TELEMETRY,
                  description="Recommendations from the live embeddings (docs/serving.md).")
    app.add_exception_handler(RequestValidationError, validation_refusal)
    guarded = [Depends(bearer_guard(config.api_token))]
    too_large = {TOO_LARGE: {"model": schemas.Error, "description": "request body over this endpoint's cap"}}
    unavailable = {503: {"model": schemas.Error, "description": "no model loaded yet"}}

    def envelope(state: ServingState | None, body: dict[str, Any]) -> dict[str, Any]:
        body["model_version"] = state.version if state is not None else None
        staleness = holder.staleness()
        body["staleness_seconds"] = None if staleness is None else round(staleness, 3)
        return body

    async def answer_recommend(query: RecommendQuery) -> tuple[int, bytes]:
        """(status, body) of one /recommend, for the FastAPI route and the direct route alike. The
        history read is awaited (other requests run meanwhile); the rest is computed in one go."""
        assignments = experiments.current.assign(query.user_id)
        arm = combined(assignments)
        with holder.use() as state:
            history = await pipeline.history.user_history_async(query.user_id,
                                                                *pipeline.history_wanted(state, query.exclude_seen,
                                                                                         query.user_id))
            try:
                body = pipeline.recommend(state, query.user_id, query.k, query.exclude_seen, query.diversity,
                                          query.explain, history, query.item_filter, arm,
                                          RequestContext(query.device, query.hour))
            except Unavailable as exc:
                return 503, orjson.dumps({"detail": str(exc)})
            except FilterError as exc:
                return 422, orjson.dumps(filter_refusal(exc))
            for assignment in assignments:
                metrics.arm_requests.labels(assignment.experiment, assignment.arm.name).inc()
            labels = {"request_id": uuid.uuid4().hex,
                      "experiment": assignments[0].experiment if assignments else None,
                      "arm": assignments[0].arm.name if assignments else None,
                      "experiments": {a.experiment: a.arm.name for a in assignments}}
            body.update(labels)
            if impressions is not None:
                impressions.record({**labels, "user_id": query.user_id, "items": [i["item_id"] for i in body["items"]],
                                    "cold_start": body["cold_start"], "timestamp": time.time(),
                                    "model_version": state.version if state is not None else None})
            return 200, orjson.dumps(envelope(state, {"user_id": query.user_id, **body}),
                                     option=orjson.OPT_SERIALIZE_NUMPY)

    # innermost: the direct /recommend route is measured and body-capped like every other
    app.add_middleware(RecommendFastPath, handler=answer_recommend, token=config.api_token)
    app.add_middleware(BodyLimit, default=config.max_body_bytes, routes=config.route_body_limits,
                       read_timeout_s=config.body_read_timeout_s)
    app.add_middleware(StrictPercentEncoding)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: refused bodies are counted too

    @app.get("/recommend", dependencies=guarded,
             responses={200: {"model": schemas.RecommendResponse}, **unavailable, **UNAUTHORIZED, **too_large})
    async def recommend(
        user_id: str = Query(min_length=1, max_length=MAX_USER_ID),
        k: int = Query(10, ge=1, le=MAX_K),
        exclude_seen: bool = Query(True, description="drop items the user interacted with (Redis)"),
        diversity: float = Query(0.0, ge=0.0, le=1.0, description="MMR: 0 = pure relevance (lambda = 1 - diversity)"),
        explain: bool = Query(False, description="score components and candidate counts"),
        include: list[str] = Query([], max_length=MAX_CLAUSES, description="ATTRIBUTE:VALUE items must have "
                                   "(repeatable; values of one attribute are alternatives)"),
        exclude: list[str] = Query([], max_length=MAX_CLAUSES, description="ATTRIBUTE:VALUE items must not have"),
        ranges: list[str] = Query([], alias="range", max_length=MAX_CLAUSES,
                                  description="ATTRIBUTE:LOW..HIGH for a numeric attribute (a bound may be left out, "
                                  "or be now / now-30d / now+2h: the request's time)"),
        available: list[str] = Query([], max_length=MAX_CLAUSES, description="true: only items available now "
                                     "(catalogue attributes available_from / available_until, epoch seconds)"),
        device: str | None = Query(None, min_length=1, max_length=MAX_DEVICE,
                                   description="the request's device: a user without a row gets its popularity slice"),
        hour: int | None = Query(None, ge=0, le=23, description="the client's local hour of day (default: the UTC "
                                 "hour of the newest event): a user without a row gets its daypart's slice"),
    ) -> Response:
        """Top-k items for a user: ANN + item-kNN + trending candidates, rescored, seen-filtered, MMR.
        Filters (and the configured rules) apply to every candidate source, against the published
        item catalogue (streamrec.serving.filters). Well-formed unfiltered requests are answered
        before FastAPI by the same code (streamrec.serving.fastpath)."""
        try:
            item_filter = ItemFilter.parse(include, exclude, ranges, available)
        except FilterError as exc:
            return _json(filter_refusal(exc), 422)
        status, body = await answer_recommend(RecommendQuery(user_id, k, exclude_seen, diversity, explain,
                                                             item_filter, device, hour))
        return Response(body, status, media_type="application/json")

    @app.post("/rescore", dependencies=guarded,
              responses={200: {"model": schemas.RescoreResponse},
                         400: {"model": schemas.Error, "description": "the body cannot be decoded (not UTF-8)"},
                         **unavailable, **UNAUTHORIZED, **too_large})
    def rescore(request: RescoreRequest) -> Response:
        """The candidates scored by the latest model, best first; unknown candidates listed in `unknown`."""
        with holder.use() as state:
            try:
                body = pipeline.rescore(state, request.user_id, request.candidates)
            except Unavailable as exc:
                return _json({"detail": str(exc)}, 503)
            return _json(envelope(state, {"user_id": request.user_id, **body}))

    @app.get("/similar/{item_id:id}", dependencies=guarded,  # `id`: an id may hold "/" or a newline (http_guard)
             responses={200: {"model": schemas.SimilarResponse}, 404: {"model": schemas.Error}, **unavailable,
                        **UNAUTHORIZED, **too_large})
    def similar(item_id: str = Path(min_length=1, max_length=256), k: int = Query(10, ge=1, le=MAX_K)) -> Response:
        """Nearest items by cosine of the item vectors (ANN), and the published item-kNN neighbours."""
        with holder.use() as state:
            try:
                body = pipeline.similar(state, item_id, k)
            except UnknownItem:
                return _json({"detail": f"unknown item {item_id!r}"}, 404)
            except Unavailable as exc:
                return _json({"detail": str(exc)}, 503)
            return _json(envelope(state, body))

    @app.get("/healthz", responses={200: {"model": schemas.Health}, **too_large})
    def healthz() -> Response:
        """The process answers."""
        return _json({"alive": True, "pid": os.getpid()})

    @app.get("/readyz", responses={200: {"model": schemas.Ready}, 503: {"model": schemas.Ready}, **too_large})
    def readyz() -> Response:
        """Ready once a model with at least one item is loaded; reports versions and staleness."""
        state = holder.current
        ready = state is not None and state.index.size > 0
        body = {
            "ready": ready, "pid": os.getpid(), "model_version": state.version if state else None,
            "synced_version": holder.synced_version,
            "staleness_seconds": holder.staleness(), "synced_at": holder.confirmed_at or None,
            "loaded_at": state.loaded_at if state else None, "index_items": state.index.size if state else 0,
            "index_kind": state.index.built_kind if state else None, "users": holder.user_rows,
            "cached_users": len(state.users) if state else 0,
            "artifacts": state.artifacts.versions if state else {},
            "refused_artifacts": holder.refused_artifacts, "inert_rules": holder.inert_rules,
            "last_error": holder.last_error,
            "explore_reads": explore.reads if explore is not None else None,
            "context_reads": context.reads if context is not None else None,
        }
        return _json(body, 200 if ready else 503)

    @app.get("/metrics", response_class=Response, responses={**too_large})
    def prometheus() -> Response:
        """Prometheus exposition (all workers merged)."""
        data, content_type = render()
        return Response(data, media_type=content_type)

    add_feedback_routes(app, config, metrics, guarded)
    add_console_routes(app, config, holder, pipeline, metrics, guarded, console_search, similar)
    for route in app.routes:  # StrictPercentEncoding answers before any route: each one documents it
        if isinstance(route, APIRoute):
            route.responses.setdefault(400, {"model": schemas.Error, "description": BAD_ENCODING})
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: the config comes from `streamrec serve` via env."""
    return create_app(ServingConfig.from_env())
