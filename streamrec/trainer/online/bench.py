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

import bisect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamrec.core.children import stop_children
from streamrec.core.config import Settings
from streamrec.core.parent_watch import watched_env
from streamrec.core.procstat import cpu_seconds, machine_busy_seconds
from streamrec.stream.bench import raw_bound, raw_records, synthetic_events
from streamrec.stream.events import EventSchema, iter_events
from streamrec.stream.loaders import load_log
from streamrec.stream.publish import EventPublisher
from streamrec.stream.topics import create_topics, delete_topics
from streamrec.trainer.online.feature_bench import RedisCpu
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

STREAMREC = str(Path(sys.executable).parent / "streamrec")
CHECKPOINT_EVERY_SECONDS = 10.0
# several trainers cannot stop at the log's last event (each holds a share): they stop this long
# after their last record (or their start: long enough for the group to form and the producer to
# begin); the span measured ends at the last batch, so the wait is not counted. One trainer stops
# at the last event and waits at most SAFETY_IDLE_EXIT_SECONDS for it.
IDLE_EXIT_SECONDS = 20.0
SAFETY_IDLE_EXIT_SECONDS = 60.0


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
    cpu: dict[str, float | None]  # CPU seconds over the trainers' active span, per component


@dataclass
class CpuSampler:
    """Cumulative CPU seconds of the machine, the parameter-server shards and Redis, sampled every
    `every` seconds from a thread, so that the CPU spent inside the trainers' active span (known
    only from their reports, afterwards) can be read off: the operations guide's cost per event."""

    shards: list[int]
    settings: Settings  # the store's Redis, or every node of its Redis Cluster
    every: float = 0.2
    samples: list[tuple[float, float, float, float | None]] = field(default_factory=list)  # wall, machine, shards, redis
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._redis = RedisCpu(self.settings)
        self.thread = threading.Thread(target=self._run, name="bench-cpu", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            shards = sum(cpu_seconds(pid) or 0.0 for pid in self.shards)
            self.samples.append((time.time(), machine_busy_seconds(), shards, self._redis.seconds()))
            self.stop.wait(self.every)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stop sampling (idempotent)."""
        if not self.stop.is_set():
            self.stop.set()
            self.thread.join()
            self._redis.close()

    def between(self, start: float | None, end: float | None) -> dict[str, float | None]:
        """CPU seconds from the last sample at or before `start` to the first at or after `end`."""
        times = [sample[0] for sample in self.samples]
        if start is None or end is None or not times:
            return {"machine": None, "param_server": None, "redis": None}
        first = self.samples[max(0, bisect.bisect_right(times, start) - 1)]
        last = self.samples[min(len(times) - 1, bisect.bisect_left(times, end))]
        redis_cpu = None if first[3] is None or last[3] is None else last[3] - first[3]
        return {"machine": last[1] - first[1], "param_server": last[2] - first[2], "redis": redis_cpu,
                "span_seconds": last[0] - first[0]}


def _start_shards(work: Path, env: dict[str, str], shards: int) -> list[subprocess.Popen]:
    """`shards` parameter-server processes (checkpointing as in production); their addresses, in
    shard order, go into env["STREAMREC_PARAM_SERVERS"]."""
    servers: list[subprocess.Popen] = []
    addresses = []
    for shard in range(shards):
        server_log = work / f"param_server-{shard}.log"
        with server_log.open("w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "streamrec.param_server", "--port", "0", "--shard", str(shard),
                 "--num-shards", str(shards), "--checkpoint-dir", str(work / "checkpoints"),
                 "--checkpoint-every", str(CHECKPOINT_EVERY_SECONDS), "--keep-checkpoints", "1000"],
                env=watched_env(env), stdout=subprocess.PIPE, stderr=log, text=True)
        servers.append(server)
        line = server.stdout.readline()
        if not line:
            stop_children(servers)
            raise RuntimeError(f"parameter-server shard {shard} did not start: {server_log.read_text()[-2000:]}")
        addresses.append(json.loads(line)["address"])
    env["STREAMREC_PARAM_SERVERS"] = ",".join(addresses)
    return servers


def _train(settings: Settings, client: str, topic: str, events: list[dict[str, Any]], preload: bool,
           trainers: int = 1, shards: int = 1) -> TrainerRun:
    """`trainers` trainer processes in one consumer group (with `shards` fresh parameter-server
    shards and a fresh feature prefix) over `events` on `topic`; the log is produced before the
    trainers start (`preload`) or while they run. One trainer stops after the log's last event;
    several stop when idle for IDLE_EXIT_SECONDS, and their reports are combined (`_combined`)."""
    work = Path(tempfile.mkdtemp(prefix="streamrec-bench-pipeline-"))
    prefix = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "STREAMREC_HOME": str(work), "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "STREAMREC_REDIS_URL": settings.redis_url, "STREAMREC_TOPIC": topic, "STREAMREC_KAFKA_CLIENT": client,
           "STREAMREC_CONSUMER_GROUP": f"bench-{topic}", "STREAMREC_FEATURE_PREFIX": prefix}
    produce_seconds = _publish(settings, client, topic, events) if preload else 0.0
    produced_at = time.time()
    servers = _start_shards(work, env, shards)
    processes: list[subprocess.Popen] = []
    sampler = CpuSampler([server.pid for server in servers], settings)
    try:
        sampler.start()
        stop_rule = (["--max-events", str(len(events)), "--idle-exit", str(SAFETY_IDLE_EXIT_SECONDS)] if trainers == 1
                     else ["--idle-exit", str(IDLE_EXIT_SECONDS)])
        report_paths = [work / f"trainer-{slot}.json" for slot in range(trainers)]
        for path in report_paths:
            processes.append(subprocess.Popen(
                [STREAMREC, "train-online", "--report", str(path), *stop_rule],
                env=watched_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        if not preload:
            produce_seconds = _publish(settings, client, topic, events)
            produced_at = time.time()
        for process in processes:
            _, err = process.communicate(timeout=600)
            if process.returncode != 0:
                raise RuntimeError(f"trainer failed: {err[-2000:]}")
        sampler.close()
        checkpoints = len(list((work / "checkpoints").rglob("ckpt-*.srps")))
        reports = [json.loads(path.read_text()) for path in report_paths]
        report = _combined(reports)
        active = [r for r in reports if r.get("first_record_wall") is not None]
        cpu = sampler.between(min((r["first_record_wall"] for r in active), default=None),
                              max((r["last_batch_wall"] for r in active), default=None))
        cpu["trainers"] = sum(r.get("active_cpu_seconds", 0.0) for r in reports)
        return TrainerRun(report, produce_seconds, produced_at, checkpoints, cpu)
    finally:
        sampler.close()
        stop_children(processes, signal.SIGKILL)
        stop_children(servers)
        FeatureStore.from_url(settings.redis_url, FeatureStoreConfig.from_settings(settings, prefix)).clear()
        shutil.rmtree(work, ignore_errors=True)


def _combined(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report for trainers that shared the log: applied events summed over the span from the
    first trainer's first record to the last one's last batch; batch times of the slowest trainer;
    prequential hr@10 weighted by each trainer's evaluated events."""
    if len(reports) == 1:
        return reports[0]
    active = [r for r in reports if r.get("first_record_wall") is not None]
    span = (max(r["last_batch_wall"] for r in active) - min(r["first_record_wall"] for r in active)) if active else 0.0
    evaluated = sum(r["prequential"].get("evaluated", 0) for r in reports)
    hits = sum((r["prequential"].get("hr@10") or 0.0) * r["prequential"].get("evaluated", 0) for r in reports)
    return {
        "applied": sum(r["applied"] for r in reports), "active_seconds": span,
        "p50_batch_seconds": max(r["p50_batch_seconds"] for r in reports),
        "p99_batch_seconds": max(r["p99_batch_seconds"] for r in reports),
        # the last batch, not the report at exit (the trainers idled IDLE_EXIT_SECONDS before exiting)
        "finished_at": max(r["last_batch_wall"] for r in active) if active else max(r["finished_at"] for r in reports),
        "prequential": {"hr@10": hits / evaluated if evaluated else None, "evaluated": evaluated},
        "applied_per_trainer": [r["applied"] for r in reports],
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _applied_rate(report: dict[str, Any]) -> float:
    seconds = report.get("active_seconds") or 0.0
    return report["applied"] / seconds if seconds > 0 else 0.0


def run_pipeline_bench(settings: Settings, n: int, client: str, data_path: str | None = None,
                       fmt: str = "ml-100k", trainers: int = 1, shards: int = 1) -> dict[str, Any]:
    events = _events(n, data_path, fmt)
    n = len(events)
    partitions = max(settings.topic_partitions, trainers)
    preloaded = f"streamrec.bench.pipeline.{uuid.uuid4().hex[:8]}"
    concurrent = f"streamrec.bench.pipeline.{uuid.uuid4().hex[:8]}"
    topics = [preloaded, preloaded + settings.dlq_suffix, concurrent, concurrent + settings.dlq_suffix]
    create_topics(settings.kafka_bootstrap, topics, partitions)
    try:
        alone = _train(settings, client, preloaded, events, preload=True, trainers=trainers, shards=shards)
        raw = raw_bound(settings, client, raw_records(events, EventSchema.from_settings(settings)), preloaded,
                        partitions)
        shared = _train(settings, client, concurrent, events, preload=False, trainers=trainers, shards=shards)
    finally:
        delete_topics(settings.kafka_bootstrap, topics)
    report = alone.report
    rate, shared_rate = _applied_rate(report), _applied_rate(shared.report)
    return {
        "client": client, "events": n, "source": data_path or "synthetic", "format": fmt if data_path else None,
        "trainers": trainers, "shards": shards, "partitions": partitions,
        "applied_per_trainer": report.get("applied_per_trainer", [report["applied"]]),
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
        # CPU of the pre-loaded run over the trainers' active span: seconds per component (the
        # machine's total includes the broker, and anything else running), and per applied event
        "cpu_seconds": {k: _round(v, 3) for k, v in alone.cpu.items()},
        "cpu_microseconds_per_event": {k: round(v / report["applied"] * 1e6, 1) if v is not None and report["applied"]
                                       else None for k, v in alone.cpu.items() if k != "span_seconds"},
    }
