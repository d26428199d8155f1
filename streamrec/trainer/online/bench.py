"""`streamrec bench pipeline`: events through the real broker into a running trainer process, a
parameter-server process and the Redis feature store, measured end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from streamrec.core.config import Settings
from streamrec.stream.bench import synthetic_events
from streamrec.stream.events import iter_events
from streamrec.stream.loaders import load_log
from streamrec.stream.publish import EventPublisher
from streamrec.stream.topics import create_topics, delete_topics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

STREAMREC = str(Path(sys.executable).parent / "streamrec")


def _events(n: int, data_path: str | None) -> list[dict[str, Any]]:
    if data_path is None:
        return synthetic_events(n)
    log = load_log(data_path, "ml-100k")
    log = log.take(slice(0, n))
    return list(iter_events(log.user_id, log.item_id, log.event_types(), log.rating, log.timestamp, log.event_ids()))


def run_pipeline_bench(settings: Settings, n: int, client: str, data_path: str | None = None) -> dict[str, Any]:
    events = _events(n, data_path)
    n = len(events)
    work = Path(tempfile.mkdtemp(prefix="streamrec-bench-pipeline-"))
    topic = f"streamrec.bench.pipeline.{uuid.uuid4().hex[:8]}"
    prefix = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
    create_topics(settings.kafka_bootstrap, [topic, topic + settings.dlq_suffix], 3)
    env = {**os.environ, "STREAMREC_HOME": str(work), "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "STREAMREC_REDIS_URL": settings.redis_url, "STREAMREC_TOPIC": topic, "STREAMREC_KAFKA_CLIENT": client,
           "STREAMREC_CONSUMER_GROUP": f"bench-{topic}", "STREAMREC_FEATURE_PREFIX": prefix}
    server = subprocess.Popen([sys.executable, "-m", "streamrec.param_server", "--port", "0", "--no-checkpoints"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    trainer = None
    try:
        address = json.loads(server.stdout.readline())["address"]
        env["STREAMREC_PARAM_SERVERS"] = address
        report_path = work / "trainer.json"
        trainer = subprocess.Popen(
            [STREAMREC, "train-online", "--report", str(report_path), "--max-events", str(n), "--idle-exit", "60"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        publisher = EventPublisher.from_settings(settings.model_copy(update={"kafka_client": client}), "bench", topic)
        start = time.time()
        for i, event in enumerate(events):
            publisher.publish(event, {"bench": i})
        publisher.close()
        produced_at = time.time()
        _, err = trainer.communicate(timeout=600)
        if trainer.returncode != 0:
            raise RuntimeError(f"trainer failed: {err[-2000:]}")
        report = json.loads(report_path.read_text())
    finally:
        for proc in (trainer, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        delete_topics(settings.kafka_bootstrap, [topic, topic + settings.dlq_suffix])
        FeatureStore.from_url(settings.redis_url, FeatureStoreConfig(prefix=prefix)).clear()
    return {
        "client": client, "events": n, "source": data_path or "synthetic",
        "events_per_second": round(report["events_per_second"] or 0.0),
        "p50_batch_seconds": round(report["p50_batch_seconds"], 4),
        "p99_batch_seconds": round(report["p99_batch_seconds"], 4),
        "lag_after_seconds": round(max(0.0, report["finished_at"] - produced_at), 3),
        "produce_events_per_second": round(n / (produced_at - start)),
        "applied": report["applied"], "prequential_hr@10": report["prequential"]["hr@10"],
    }

