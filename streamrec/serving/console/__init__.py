"""The web console at /ui (issue 13): pipeline health, a user's recommendations and history,
clicks as that user, item search and similar items.

The page (`static/`, plain HTML and JavaScript shipped inside the package, no build step, nothing
fetched from a CDN) is public; everything it shows comes from JSON endpoints behind the same
bearer token as the rest of the API: /recommend and POST /events themselves, plus the console's
own /ui/api/* here (figures scraped from every process's /metrics, pickers, history, similar items).

Ids travel as query parameters (`/ui/api/history?user_id=`, `/ui/api/similar?item_id=`): the
browser's URL parser resolves a path segment "." or ".." away, so the user ".." asked for
`/ui/api/history` and the item "." for `/similar/`. The path forms stay for other clients.

The page and its static files are sent with `PAGE_HEADERS`: `no-cache` (revalidated on every load,
so an upgraded worker's console.js is used at once; the static files used to carry no
Cache-Control, and browsers kept the old script by heuristic), and no framing by other sites
(X-Frame-Options, CSP frame-ancestors) or content sniffing. The CSP allows only the page's own
origin, which is all it loads (no inline script or style, nothing from a CDN).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Query
from fastapi import Path as PathParameter
from fastapi.params import Depends
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

import streamrec.serving.http_guard  # noqa: F401  (registers the {name:id} route parameter used below)
from streamrec.serving import schemas
from streamrec.serving.auth import UNAUTHORIZED
from streamrec.serving.config import MAX_K, ServingConfig
from streamrec.serving.console.catalogue import Catalogue
from streamrec.serving.console.overview import Overview
from streamrec.serving.console.search import PrefixSearch
from streamrec.serving.limits import STATUS as TOO_LARGE
from streamrec.serving.metrics import ServingMetrics, render
from streamrec.serving.pipeline import CandidatePipeline
from streamrec.serving.state import StateHolder

STATIC = Path(__file__).resolve().parent / "static"  # package data: works from a wheel as from a checkout
MAX_IDS = 200
MAX_ID_LENGTH = 256
DOCUMENTED = {**UNAUTHORIZED, TOO_LARGE: {"model": schemas.Error, "description": "request body over the cap"}}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
}


class ConsoleStatic(StaticFiles):
    """The page's script and style sheet, with PAGE_HEADERS (304 answers included)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def add_console_routes(app: FastAPI, config: ServingConfig, holder: StateHolder, pipeline: CandidatePipeline,
                       metrics: ServingMetrics, guarded: list[Depends], search: PrefixSearch,
                       similar: Callable[[str, int], Response]) -> None:
    """Register /ui (static page) and its JSON endpoints on `app`. `search` is the item search whose
    `refresh` the caller runs between polls (on the sync thread, never in a request); `similar` answers
    /similar/{item_id}, which the page reaches with the item as a query parameter."""
    overview = Overview(config.metrics_sources, lambda: render()[0], holder.staleness)
    # titles and genres are optional: ServingConfig.item_catalogue (u.item or item_id,title,genres CSV)
    catalogue_path = config.item_catalogue
    catalogue = Catalogue.load(Path(catalogue_path)) if catalogue_path else None

    app.mount("/ui/static", ConsoleStatic(directory=STATIC), name="console-static")

    @app.get("/ui", include_in_schema=False)
    def console_redirect() -> Response:
        return RedirectResponse("/ui/")

    @app.get("/ui/", include_in_schema=False)
    def console_page() -> Response:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/ui/api/overview", dependencies=guarded, tags=["console"], responses=DOCUMENTED)
    async def console_overview() -> Response:
        """Pipeline health: events/s, consumer lag, live hr@10, serving p99, staleness and parameter
        -server rows from every process's /metrics (a process that does not answer shows as down)."""
        return _json(await overview.sample())

    @app.get("/ui/api/info", dependencies=guarded, tags=["console"], responses=DOCUMENTED)
    def console_info() -> Response:
        """Users with vectors (the parameter server's user table), the items this worker holds, model
        version, catalogue size."""
        state = holder.current
        return _json({"model_version": state.version if state else None,
                      "users": holder.user_rows, "items": len(state.items) if state else 0,
                      "catalogue_items": len(catalogue) if catalogue else 0,
                      "metrics_sources": sorted(config.metrics_sources)})

    @app.get("/ui/api/users", dependencies=guarded, tags=["console"], responses=DOCUMENTED)
    def console_users(prefix: str = Query("", max_length=MAX_ID_LENGTH), limit: int = Query(20, ge=1, le=MAX_IDS)
                      ) -> Response:
        """Users this worker has cached (recently requested) whose id starts with `prefix` (the page's user picker)."""
        with holder.use() as state:
            found, total = search.users(state, prefix, limit) if state else ([], 0)
        return _json({"users": found, "total": total})

    def history(user_id: str, n: int) -> Response:
        history = pipeline.history.user_history(user_id, n, False)
        if history is None:
            return _json({"user_id": user_id, "items": [], "redis_down": True})
        return _json({"user_id": user_id, "items": _described(catalogue, history.recent), "redis_down": False})

    @app.get("/ui/api/history", dependencies=guarded, tags=["console"], responses=DOCUMENTED)
    def console_history(user_id: str = Query(min_length=1, max_length=MAX_ID_LENGTH),
                        n: int = Query(20, ge=1, le=MAX_IDS)) -> Response:
        """The user's newest items from the Redis feature store (`redis_down` while it is not reachable)."""
        return history(user_id, n)

    @app.get("/ui/api/users/{user_id:id}/history", dependencies=guarded, tags=["console"], responses=DOCUMENTED)
    def console_history_by_path(user_id: str = PathParameter(min_length=1, max_length=MAX_ID_LENGTH),
                                n: int = Query(20, ge=1, le=MAX_IDS)) -> Response:
        """/ui/api/history with the user in the path (kept for existing clients; a user "." or ".."
        cannot be reached this way from a browser)."""
        return history(user_id, n)

    @app.get("/ui/api/similar", dependencies=guarded, tags=["console"],
             responses={200: {"model": schemas.SimilarResponse}, 404: {"model": schemas.Error},
                        503: {"model": schemas.Error}, **DOCUMENTED})
    def console_similar(item_id: str = Query(min_length=1, max_length=MAX_ID_LENGTH),
                        k: int = Query(10, ge=1, le=MAX_K)) -> Response:
        """/similar/{item_id} with the item as a query parameter, so any id reaches it from the page."""
        return similar(item_id, k)

    @app.get("/ui/api/items", dependencies=guarded, tags=["console"], responses=DOCUMENTED)
    def console_items(q: str = Query(min_length=1, max_length=MAX_ID_LENGTH),
                      limit: int = Query(20, ge=1, le=MAX_IDS)) -> Response:
        """Items served whose id starts with `q`, then catalogue items whose title contains it;
        `complete` is false while the id search has not yet caught up with the newest items."""
        with holder.use() as state:
            matches = search.items(state, q, limit) if state else None
            found = list(matches.ids) if matches else []
            if catalogue is not None and len(found) < limit:
                found += [i for i in catalogue.title_matches(q, limit) if i not in found][: limit - len(found)]
            served = [state is not None and state.items.position(i) >= 0 for i in found]
        return _json({"items": [{**entry, "served": s} for entry, s in zip(_described(catalogue, found), served)],
                      "complete": matches.complete if matches else True})

    @app.get("/ui/api/items/info", dependencies=guarded, tags=["console"], responses=DOCUMENTED)
    def console_item_info(ids: Annotated[list[str], Query(max_length=MAX_IDS)]) -> Response:
        """Titles and genres of `ids` from the item catalogue (empty without one)."""
        return _json({"items": catalogue.lookup(ids) if catalogue else {}})


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json")


def _described(catalogue: Catalogue | None, ids: list[str]) -> list[dict[str, object]]:
    info = catalogue.lookup(ids) if catalogue else {}
    return [{"item_id": i, **info.get(i, {})} for i in ids]
