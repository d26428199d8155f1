"""`streamrec bench catalogue`: the items-topic follower on the production path.

A real parameter server (checkpoints every 10 s) and `streamrec catalogue follow` as its own
process, on a fresh one-partition items topic of the configured broker (one partition, so a
record's offset is its send order and a published version's marks say exactly which records it
holds):
1. `items` put records are produced, then the follower starts: `load_records_per_second` is the
   records over the seconds from its start to the version that holds them all (process start
   included);
2. patches flipping `in_stock` arrive open-loop at `rate` a second for `seconds`; each one's
   latency runs from its scheduled send time to the first stored version whose marks pass it
   (versions are watched every 10 ms, so figures are 10 ms coarse). That latency plus serving's
   poll is how long an out-of-stock item can still be recommended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from streamrec.core.config import Settings
from streamrec.core.net import free_port
from streamrec.core.parent_watch import watched_env
from streamrec.core.progress import track
from streamrec.param_server.artifacts import CATALOGUE_BLOB, dense_header
from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.stream.kafka import make_producer
from streamrec.stream.topics import create_topics, delete_topics, offset_key

WATCH_S = 0.01


def _put(n: int, rng: np.random.Generator) -> bytes:
    return json.dumps({"item_id": f"sku-{n}", "genre": f"g{rng.integers(20)}", "brand": f"b{rng.integers(500)}",
                       "price": round(float(rng.uniform(1, 200)), 2), "in_stock": True,
                       "title": f"item {n} of brand {rng.integers(500)}"}).encode()


class _Watcher(threading.Thread):
    """Reads the stored version every WATCH_S; `seen` holds each new version's mark of partition 0
    with the time it was seen."""

    def __init__(self, address: str, key: str) -> None:
        super().__init__(daemon=True)
        self.address, self.key = address, key
        self.seen: list[tuple[float, int]] = []  # (time, mark), marks rising
        self.blob_bytes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        version = 0
        with ParamClient([self.address]) as client:
            while not self.stop.wait(WATCH_S):
                try:
                    blob = client.get_blob(CATALOGUE_BLOB, since=version)
                except ParamServerError:  # none yet
                    continue
                if blob is not None:
                    version, self.blob_bytes = blob.version, len(blob.data)
                    self.seen.append((time.perf_counter(), int(dense_header(blob.data).get("marks", {}).get(self.key, 0))))

    def reached(self, offset: int) -> float | None:
        """When a version holding record `offset` was first seen."""
        return next((at for at, mark in self.seen if mark > offset), None)


def _publish_seconds(url: str) -> dict[str, float]:
    text = httpx.get(url, timeout=10).text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name.startswith("streamrec_stream_catalogue_publish_seconds_") and not s.labels.get("le")}
    count = samples.get("streamrec_stream_catalogue_publish_seconds_count", 0.0)
    total = samples.get("streamrec_stream_catalogue_publish_seconds_sum", 0.0)
    return {"publishes": count, "publish_seconds_mean": round(total / count, 4) if count else float("nan")}


def run_benchmark(settings: Settings, items: int = 100_000, rate: float = 200.0, seconds: float = 20.0,
                  interval_s: float = 1.0, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    topic = f"bench.catalogue.{uuid.uuid4().hex[:8]}"
    run = settings.model_copy(update={"topic": topic, "topic_partitions": 1})
    key = offset_key(run.items_topic, 0)
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-catalogue-") as work:
        server = subprocess.Popen([sys.executable, "-m", "streamrec.param_server", "--port", "0", "--checkpoint-dir",
                                   str(Path(work) / "ckpt"), "--checkpoint-every", "10"],
                                  env=watched_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        follower: subprocess.Popen[bytes] | None = None
        try:
            address = json.loads(server.stdout.readline())["address"]  # type: ignore[union-attr]
            create_topics(run.kafka_bootstrap, [run.items_topic], 1)
            with make_producer(run.kafka_bootstrap, run.kafka_client) as producer:
                for n in track(range(items), "items produced", items):
                    producer.send(run.items_topic, _put(n, rng), key=f"sku-{n}".encode())
                producer.flush()
                watcher = _Watcher(address, key)
                watcher.start()
                metrics = free_port()
                env = {**os.environ, "STREAMREC_TOPIC": topic, "STREAMREC_TOPIC_PARTITIONS": "1",
                       "STREAMREC_KAFKA_BOOTSTRAP": run.kafka_bootstrap, "STREAMREC_KAFKA_CLIENT": run.kafka_client,
                       "STREAMREC_PARAM_SERVERS": address, "STREAMREC_HOME": work}
                env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
                started = time.perf_counter()
                follower = subprocess.Popen([str(Path(sys.executable).parent / "streamrec"), "catalogue", "follow",
                                             "--interval", str(interval_s), "--metrics-port", str(metrics)],
                                            env=watched_env(env),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                while watcher.reached(items - 1) is None:
                    if follower.poll() is not None:
                        raise RuntimeError(f"the follower exited with {follower.returncode}")
                    time.sleep(0.05)
                loaded = watcher.reached(items - 1) - started  # type: ignore[operator]

                patches = int(rate * seconds)
                begin = time.perf_counter() + 0.5
                scheduled = begin + np.arange(patches) / rate
                for n, at in enumerate(scheduled.tolist()):
                    pause = at - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    item = f"sku-{rng.integers(items)}"
                    producer.send(run.items_topic, json.dumps({"item_id": item, "op": "patch",
                                                                "in_stock": bool(n % 2)}).encode(), key=item.encode())
                    producer.flush()
            deadline = time.perf_counter() + 60
            while watcher.reached(items + patches - 1) is None and time.perf_counter() < deadline:
                time.sleep(0.05)
            watcher.stop.set()
            reached = [watcher.reached(items + n) for n in range(patches)]
            latency_ms = np.array([np.inf if at is None else (at - s) * 1000 for at, s in zip(reached, scheduled)])
            publish = _publish_seconds(f"http://127.0.0.1:{metrics}/metrics")
        finally:
            for process in (follower, server):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(60)
                    except subprocess.TimeoutExpired:
                        process.kill()
            delete_topics(run.kafka_bootstrap, [run.items_topic, run.items_topic + run.dlq_suffix])
    return {
        "items": items, "interval_s": interval_s, "checkpoint_every_seconds": 10,
        "load_records_per_second": round(items / loaded), "load_seconds": round(loaded, 2),
        "patch_rate": rate, "patches": patches, "patches_unpublished": int(np.isinf(latency_ms).sum()),
        "patch_to_version_p50_ms": round(float(np.percentile(latency_ms, 50)), 1),
        "patch_to_version_p99_ms": round(float(np.percentile(latency_ms, 99)), 1),
        "patch_to_version_max_ms": round(float(latency_ms.max()), 1),
        "blob_bytes": watcher.blob_bytes, **publish,
    }
