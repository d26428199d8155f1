"""`streamrec bench pipeline`: events through the real broker into a running trainer process, a
parameter-server process (checkpointing every 10 s, as in production) and the Redis feature
store, measured end to end.

Two runs on fresh topics and servers:
- `events_per_second` (issue 16's definition): the log is produced into the topic BEFORE the
  trainer starts, so the producer does not compete for the CPU; events applied (pushed and
  committed) divided by the seconds from the trainer's first record to its last batch.
- `events_per_second_concurrent_producer`: the trainer consumes while the log is produced.

The bound is measured in the same run: the raw client library producing and consuming the same
bytes (streamrec.stream.bench.raw_bound); `events_per_second_vs_raw_consume` is the ratio that
holds on a noisy machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamrec.core.config import Settings
from streamrec.stream.bench import raw_bound, raw_records, synthetic_events
from streamrec.stream.events import EventSchema, iter_events
from streamrec.stream.loaders import load_log
from streamrec.stream.publish import EventPublisher
from streamrec.stream.topics import create_topics, delete_topics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

STREAMREC = str(Path(sys.executable).parent / "streamrec")
CHECKPOINT_EVERY_SECONDS = 10.0


def _events(n: int, data_path: str | None, fmt: str) -> list[dict[str, Any]]:
    if data_path is None:
        return synthetic_events(n)
    log = load_log(data_path, fmt)
    log = log.take(slice(0, n))
    return list(iter_events(log.user_id, log.item_id, log.event_types(), log.rating, log.timestamp, log.event_ids()))


def _publish(settings: Settings, client: str, topic: str, events: list[dict[str, Any]]) -> float:
    """Seconds for our publisher to produce `events` and flush them."""
    publisher = EventPublisher.from_settings(settings.model_copy(update={"kafka_client": client}), "bench", topic)
    start = time.perf_counter()
    for i, event in enumerate(events):
        publisher.publish(event, {"bench": i})
    publisher.close()
    return time.perf_counter() - start


@dataclass
class TrainerRun:
    report: dict[str, Any]
    produce_seconds: float
    produced_at: float  # wall clock when the log was fully produced
    checkpoints: int  # written while the trainer ran (a run shorter than the interval may see none)


def _train(settings: Settings, client: str, topic: str, events: list[dict[str, Any]], preload: bool) -> TrainerRun:
    """One trainer process (with a fresh parameter server and feature prefix) over `events` on
    `topic`; the log is produced before the trainer starts (`preload`) or while it runs."""
    work = Path(tempfile.mkdtemp(prefix="streamrec-bench-pipeline-"))
    prefix = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "STREAMREC_HOME": str(work), "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "STREAMREC_REDIS_URL": settings.redis_url, "STREAMREC_TOPIC": topic, "STREAMREC_KAFKA_CLIENT": client,
           "STREAMREC_CONSUMER_GROUP": f"bench-{topic}", "STREAMREC_FEATURE_PREFIX": prefix}
    produce_seconds = _publish(settings, client, topic, events) if preload else 0.0
    produced_at = time.time()
    server_log = work / "param_server.log"
    with server_log.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamrec.param_server", "--port", "0", "--checkpoint-dir",
             str(work / "checkpoints"), "--checkpoint-every", str(CHECKPOINT_EVERY_SECONDS),
             "--keep-checkpoints", "1000"],
            env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    trainer = None
    try:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"the parameter server did not start: {server_log.read_text()[-2000:]}")
        env["STREAMREC_PARAM_SERVERS"] = json.loads(line)["address"]
        report_path = work / "trainer.json"
        trainer = subprocess.Popen(
            [STREAMREC, "train-online", "--report", str(report_path), "--max-events", str(len(events)),
             "--idle-exit", "60"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if not preload:
            produce_seconds = _publish(settings, client, topic, events)
            produced_at = time.time()
        _, err = trainer.communicate(timeout=600)
        if trainer.returncode != 0:
            raise RuntimeError(f"trainer failed: {err[-2000:]}")
        checkpoints = len(list((work / "checkpoints").rglob("ckpt-*.srps")))
        return TrainerRun(json.loads(report_path.read_text()), produce_seconds, produced_at, checkpoints)
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        server.send_signal(signal.SIGTERM)  # its final checkpoint is part of the cost
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        FeatureStore.from_url(settings.redis_url, FeatureStoreConfig(prefix=prefix)).clear()
        shutil.rmtree(work, ignore_errors=True)


def _applied_rate(report: dict[str, Any]) -> float:
    seconds = report.get("active_seconds") or 0.0
    return report["applied"] / seconds if seconds > 0 else 0.0


def run_pipeline_bench(settings: Settings, n: int, client: str, data_path: str | None = None,
                       fmt: str = "ml-100k") -> dict[str, Any]:
    events = _events(n, data_path, fmt)
    n = len(events)
    partitions = settings.topic_partitions
    preloaded = f"streamrec.bench.pipeline.{uuid.uuid4().hex[:8]}"
    concurrent = f"streamrec.bench.pipeline.{uuid.uuid4().hex[:8]}"
    topics = [preloaded, preloaded + settings.dlq_suffix, concurrent, concurrent + settings.dlq_suffix]
    create_topics(settings.kafka_bootstrap, topics, partitions)
    try:
        alone = _train(settings, client, preloaded, events, preload=True)
        raw = raw_bound(settings, client, raw_records(events, EventSchema.from_settings(settings)), preloaded,
                        partitions)
        shared = _train(settings, client, concurrent, events, preload=False)
    finally:
        delete_topics(settings.kafka_bootstrap, topics)
    report = alone.report
    rate, shared_rate = _applied_rate(report), _applied_rate(shared.report)
    return {
        "client": client, "events": n, "source": data_path or "synthetic", "format": fmt if data_path else None,
        "checkpoint_every_seconds": CHECKPOINT_EVERY_SECONDS, "checkpoints_during_run": alone.checkpoints,
        "active_seconds": round(report["active_seconds"], 3),
        "events_per_second": round(rate),
        "events_per_second_concurrent_producer": round(shared_rate),
        "p50_batch_seconds": round(report["p50_batch_seconds"], 4),
        "p99_batch_seconds": round(report["p99_batch_seconds"], 4),
        "lag_after_seconds": round(max(0.0, shared.report["finished_at"] - shared.produced_at), 3),
        "produce_events_per_second": round(n / alone.produce_seconds),
        "applied": report["applied"], "prequential_hr@10": report["prequential"]["hr@10"],
        "prequential_hr@10_concurrent_producer": shared.report["prequential"]["hr@10"],
        **raw,
        "events_per_second_vs_raw_consume": round(rate / raw["raw_consume_events_per_second"], 3),
        "produce_vs_raw": round(n / alone.produce_seconds / raw["raw_produce_events_per_second"], 3),
    }
