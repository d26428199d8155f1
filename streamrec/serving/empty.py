"""An empty endpoint on the serving stack (FastAPI on uvicorn, same workers and settings):
`python -m streamrec.serving.empty --port P --workers N`. `streamrec bench serving` drives it with
the same open-loop generator as /recommend, so the HTTP floor of this machine is measured in the
same run and the serving figures can be read as ratios to it."""

from __future__ import annotations

import argparse
import os

from fastapi import FastAPI
from fastapi.responses import Response

from streamrec.core.parent_watch import exit_with_parent
from streamrec.serving.server import FASTAPI_TELEMETRY, run_uvicorn

EMPTY_PATH = "/empty"


def create_app() -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, telemetry=FASTAPI_TELEMETRY)
    ready = f'{{"pid":{os.getpid()}}}'.encode()

    @app.get(EMPTY_PATH)
    async def empty() -> Response:
        return Response(b"{}", media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(ready, media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    exit_with_parent()
    run_uvicorn("streamrec.serving.empty:create_app", args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
