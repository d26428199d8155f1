"""Starting N worker processes behind one port (uvicorn's process manager)."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile

import uvicorn
from fastapi import FastAPI

from streamrec.core.parent_watch import PARENT_ENV, exit_with_parent
from streamrec.serving.config import CONFIG_ENV, ServingConfig
from streamrec.serving.http_guard import GuardedHttpToolsProtocol

WORKER_FACTORY_ENV = "STREAMREC_WORKER_FACTORY"  # the app factory `watched_worker` builds in each worker

# Serving exports Prometheus metrics itself (streamrec.serving.metrics). FastAPI's native
# OpenTelemetry hooks look the global providers up on every request (~4% of a worker's CPU in the
# issue 16 profile), so every app of the serving stack turns them off.
FASTAPI_TELEMETRY = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def run_uvicorn(factory: str, host: str, port: int, workers: int, log_level: str = "warning") -> None:
    """The server settings every serving stack uses, so `streamrec bench serving` measures its
    empty-endpoint bound (streamrec.serving.empty) on exactly the stack that serves /recommend:
    httptools with a size and a time bound on each request's head (`GuardedHttpToolsProtocol`).

    Several workers are processes under uvicorn's supervisor (this process). A supervisor stopped
    with SIGTERM stops them, but one SIGKILLed left them serving on the port, unseen by anyone:
    each worker is built by `watched_worker`, which watches the supervisor
    (streamrec.core.parent_watch) and stops the worker when it is gone."""
    if workers > 1:
        os.environ[WORKER_FACTORY_ENV] = factory
        os.environ[PARENT_ENV] = str(os.getpid())  # the workers' parent: this supervisor
        factory = f"{__name__}:watched_worker"
    uvicorn.run(factory, factory=True, host=host, port=port, workers=workers, log_level=log_level, access_log=False,
                http=GuardedHttpToolsProtocol)


def watched_worker() -> FastAPI:
    """uvicorn factory of a worker process: the app of WORKER_FACTORY_ENV ("module:function"),
    in a process that stops when its supervisor is gone."""
    exit_with_parent()
    module, _, function = os.environ[WORKER_FACTORY_ENV].partition(":")
    return getattr(importlib.import_module(module), function)()


def run_workers(config: ServingConfig, host: str, port: int, workers: int, log_level: str = "warning") -> None:
    """Blocks until SIGINT/SIGTERM. Workers read `config` from the environment; with several
    workers Prometheus metrics go through a fresh multiprocess directory (streamrec.serving.metrics)."""
    os.environ[CONFIG_ENV] = config.model_dump_json()
    metrics_dir = None
    if workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="streamrec-serving-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        run_uvicorn("streamrec.serving.app:app_from_env", host, port, workers, log_level)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
