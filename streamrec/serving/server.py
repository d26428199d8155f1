"""Starting N worker processes behind one port (uvicorn's process manager)."""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from streamrec.serving.config import CONFIG_ENV, ServingConfig


def run_workers(config: ServingConfig, host: str, port: int, workers: int, log_level: str = "warning") -> None:
    """Blocks until SIGINT/SIGTERM. Workers read `config` from the environment; with several
    workers Prometheus metrics go through a fresh multiprocess directory (streamrec.serving.metrics)."""
    os.environ[CONFIG_ENV] = config.model_dump_json()
    metrics_dir = None
    if workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="streamrec-serving-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run("streamrec.serving.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, access_log=False)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
