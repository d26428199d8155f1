"""`streamrec bench serving`: a private parameter server with random vectors, N workers, and a
closed-loop load generator in its own process; then the bare FAISS search for the same queries,
so the cost of everything around the index is visible."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.core import net
from streamrec.core.config import Settings
from streamrec.param_server.artifacts import KNN_BLOB, encode_neighbors
from streamrec.param_server.client import ParamClient
from streamrec.param_server.replica import TableMirror
from streamrec.serving.config import ServingConfig
from streamrec.serving.index import ItemIndex, query_rows
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

EVENTS_PER_USER = 10
NEIGHBOURS = 20
CHUNK = 50_000
SEARCH_SAMPLES = 2000


def _start_param_server(home: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "STREAMREC_HOME": str(home)}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "streamrec.param_server", "--port", "0", "--no-checkpoints"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        raise RuntimeError("parameter server did not start")
    return proc, json.loads(line)["address"]


def _load(client: ParamClient, rng: np.random.Generator, items: int, users: int, dim: int) -> np.ndarray:
    """Random BPR-layout tables and item-kNN lists; returns the user vectors."""
    client.create_table("bpr_users", dim, max_rows=max(users, 1024) * 2)
    client.create_table("bpr_items", dim, scalars=1, max_rows=max(items, 1024) * 2)
    user_vectors = (rng.normal(size=(users, dim)) / np.sqrt(dim)).astype(np.float32)
    for lo in range(0, users, CHUNK):
        client.assign("bpr_users", [f"u{u}" for u in range(lo, min(users, lo + CHUNK))], user_vectors[lo : lo + CHUNK])
    for lo in range(0, items, CHUNK):
        n = min(items, lo + CHUNK) - lo
        client.assign("bpr_items", [f"i{j}" for j in range(lo, lo + n)],
                      (rng.normal(size=(n, dim)) / np.sqrt(dim)).astype(np.float32),
                      (rng.normal(size=n) * 0.1).astype(np.float32))
    scores = -np.sort(-rng.random((items, NEIGHBOURS), np.float32), axis=1)
    client.put_blob(KNN_BLOB, encode_neighbors([f"i{j}" for j in range(items)],
                                               rng.integers(0, items, (items, NEIGHBOURS)), scores))
    return user_vectors


def _history(store: FeatureStore, rng: np.random.Generator, items: int, users: int) -> None:
    """EVENTS_PER_USER events per user on Zipf-popular items, through the trainer's writer."""
    n = users * EVENTS_PER_USER
    user_ids = np.array([f"u{u}" for u in np.repeat(np.arange(users), EVENTS_PER_USER)], dtype=object)
    item_ids = np.array([f"i{j}" for j in (rng.zipf(1.2, n) - 1) % items], dtype=object)
    times = 1.7e9 + np.arange(n, dtype=np.float64)
    for lo in range(0, n, 20_000):
        part = slice(lo, lo + 20_000)
        store.write(EventBatch.from_columns(user_ids[part], item_ids[part], np.full(len(user_ids[part]), "click", dtype=object),
                                            times[part]))


def _wait_ready(url: str, workers: int, proc: subprocess.Popen, timeout: float = 600.0) -> dict[str, Any]:
    pids: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(pids) < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("serving workers did not get ready")
        request = urllib.request.Request(url + "/readyz", headers={"Connection": "close"})
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                body = json.loads(reply.read())
                pids[body["pid"]] = body
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    return next(iter(pids.values()))


def _search_p50_ms(address: str, config: ServingConfig, user_vectors: np.ndarray, k: int) -> float:
    """The bare index search the workers do for the same queries, one query at a time."""
    import faiss

    faiss.omp_set_num_threads(1)
    with ParamClient([address]) as client:
        mirror = TableMirror(client, "bpr_items")
        mirror.sync()
    index = ItemIndex(config.index, config.nprobe, config.ivf_min_items)
    index.rebuild(mirror)
    queries = query_rows(user_vectors[:SEARCH_SAMPLES], mirror)
    fetch = max(config.ann_candidates, k) + EVENTS_PER_USER
    times = []
    for row in range(len(queries)):
        started = time.perf_counter()
        index.search(queries[row : row + 1], fetch)
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1000, 3)


def run_bench(settings: Settings, items: int, users: int, dim: int, workers: int, concurrency: int,
              duration: float, k: int, index: str, rate: float = 0.0) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="streamrec-bench-serving-"))
    prefix = f"bench-serving-{uuid.uuid4().hex[:8]}"
    redis_up = net.redis_ping(settings.redis_url)
    ps_proc, address = _start_param_server(home)
    serve = None
    rng = np.random.default_rng(0)
    try:
        started = time.perf_counter()
        with ParamClient([address]) as client:
            user_vectors = _load(client, rng, items, users, dim)
        if redis_up:
            _history(FeatureStore.from_url(settings.redis_url, FeatureStoreConfig(prefix=prefix)), rng, items, users)
        load_seconds = time.perf_counter() - started
        port = net.free_port(None, "127.0.0.1")
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "STREAMREC_PARAM_SERVERS": address, "STREAMREC_REDIS_URL": settings.redis_url,
               "STREAMREC_HOME": str(home)}
        serve = subprocess.Popen(
            [sys.executable, "-c", "from streamrec.app.cli import main; main()", "serve", "--workers", str(workers),
             "--port", str(port), "--feature-prefix", prefix, "--index", index], env=env,
            stdout=subprocess.DEVNULL, stderr=(home / "serve.log").open("w"))
        ready = _wait_ready(url, workers, serve)
        load = subprocess.run(
            [sys.executable, "-m", "streamrec.serving.loadgen", "--url", url, "--users", str(users), "--concurrency",
             str(concurrency), "--duration", str(duration), "--rate", str(rate),
             "--template", f"/recommend?user_id=u{{user}}&k={k}"],
            capture_output=True, text=True, check=True)
        result = json.loads(load.stdout)
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        config = ServingConfig(index=index)
        result["faiss_search_p50_ms"] = _search_p50_ms(address, config, user_vectors, k)
        result.update({"items": items, "users": users, "dim": dim, "workers": workers, "concurrency": concurrency,
                       "k": k, "index": ready["index_kind"], "redis": redis_up, "load_seconds": round(load_seconds, 1)})
        return result
    finally:
        if serve is not None and serve.poll() is None:
            serve.kill()
            serve.wait()
        ps_proc.kill()
        ps_proc.wait()
        if redis_up:
            FeatureStore.from_url(settings.redis_url, FeatureStoreConfig(prefix=prefix)).clear()
        shutil.rmtree(home, ignore_errors=True)
