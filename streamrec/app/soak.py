"""`streamrec bench soak`: memory of the whole pipeline under a growing id space.

Synthetic events whose id space grows linearly (by the last event `users` users and `items` items
exist; every id appears, a new user every other event and a new item every `events / items`
events) go through the real pipeline (streamrec.app.stack): broker -> trainer process ->
parameter server with checkpoints -> serving workers polling, with a steady `/recommend` load so
serving's per-user paths run too. The resident memory (VmRSS) of the trainer, of the serving
workers (summed) and of the parameter server is sampled as the trainer consumes.

Warm-up is the first 10% of events (issue 16); `*_rss_growth` is the last sample over the sample at
the end of warm-up, minus one. The parameter server's rows are read from its tables at the end,
beside their bound (max_rows per table and shard).
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.app.processes import read_json
from streamrec.app.query_load import Queries
from streamrec.app.stack import Stack, StackOptions, running_stack
from streamrec.core.config import Settings
from streamrec.core.procstat import rss_bytes
from streamrec.core.progress import progress_bar
from streamrec.param_server.client import ParamClient
from streamrec.stream.publish import EventPublisher

WARMUP_FRACTION = 0.1
CHUNK_EVENTS = 50_000  # events generated and produced at a time (bounds the soak process's own memory)
EVENT_TYPES = np.array(["view", "click", "click", "like", "purchase"], dtype=object)


@dataclass(frozen=True)
class SoakOptions:
    events: int = 2_000_000
    users: int = 1_000_000
    items: int = 100_000
    query_rate: float = 20.0  # /recommend per second during the run
    sample_seconds: float = 2.0
    poll_interval: float = 1.0
    max_rows: int | None = None  # the parameter server's row bound per table (None: its default)
    timeout_s: float = 3600.0


def soak_events(start: int, stop: int, options: SoakOptions, t0: float, run: str) -> list[dict[str, Any]]:
    """Events `start..stop` of the run: even events bring the newest user (so user j first appears
    at event 2j * users / events), odd ones an existing user; every 10th event the newest item,
    the others an existing item, skewed towards old (popular) ones. Timestamps spread over the
    hour before `t0`."""
    n, total = stop - start, options.events
    i = np.arange(start, stop, dtype=np.int64)
    rng = np.random.default_rng(start)
    user_front = i * options.users // total
    user = np.where(i % 2 == 0, user_front, (rng.random(n) * (user_front + 1)).astype(np.int64))
    item_front = i * options.items // total
    item = np.where(i % 10 == 0, item_front, (rng.random(n) ** 2 * (item_front + 1)).astype(np.int64))
    kinds = EVENT_TYPES[rng.integers(0, len(EVENT_TYPES), n)]
    ts = t0 - 3600.0 + i * (3600.0 / total)
    return [{"event_id": f"{run}-{k}", "user_id": f"u{u}", "item_id": f"i{it}", "event_type": e, "timestamp": t}
            for k, u, it, e, t in zip(i.tolist(), user.tolist(), item.tolist(), kinds.tolist(), ts.tolist())]


@dataclass
class Series:
    """Samples over the run, one list per column (a plot is `consumed` against each RSS)."""

    seconds: list[float] = field(default_factory=list)
    consumed: list[int] = field(default_factory=list)
    trainer_rss: list[int] = field(default_factory=list)
    serving_rss: list[int] = field(default_factory=list)  # summed over the workers
    param_server_rss: list[int] = field(default_factory=list)

    def add(self, seconds: float, consumed: int, pids: dict[str, list[int]]) -> None:
        self.seconds.append(round(seconds, 1))
        self.consumed.append(consumed)
        self.trainer_rss.append(sum(map(rss_bytes, pids["trainer"])))
        self.serving_rss.append(sum(map(rss_bytes, pids["serving"])))
        self.param_server_rss.append(sum(map(rss_bytes, pids["param_server"])))

    def growth(self, column: list[int], warm_consumed: int) -> float | None:
        """Last sample over the first sample at or after the end of warm-up, minus one."""
        warm = next((v for c, v in zip(self.consumed, column) if c >= warm_consumed), None)
        return round(column[-1] / warm - 1.0, 4) if warm else None

    def to_json(self) -> dict[str, list[float] | list[int]]:
        return {"seconds": self.seconds, "consumed": self.consumed, "trainer_rss_bytes": self.trainer_rss,
                "serving_rss_bytes": self.serving_rss, "param_server_rss_bytes": self.param_server_rss}


class Producer(threading.Thread):
    """Produces the run's events chunk by chunk through the validating publisher."""

    def __init__(self, settings: Settings, options: SoakOptions) -> None:
        super().__init__(name="soak-producer", daemon=True)
        self.settings, self.options = settings, options
        self.produced = 0
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        publisher = EventPublisher.from_settings(self.settings, "soak")
        run, t0 = uuid.uuid4().hex[:8], time.time()
        try:
            for start in range(0, self.options.events, CHUNK_EVENTS):
                if self.stop.is_set():
                    return
                stop = min(self.options.events, start + CHUNK_EVENTS)
                for event in soak_events(start, stop, self.options, t0, run):
                    publisher.publish(event, {"soak": run})
                publisher.flush()
                self.produced = stop
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self.error = exc
        finally:
            publisher.close()


def _table_bounds(stack: Stack) -> dict[str, dict[str, int]]:
    with ParamClient.from_settings(stack.settings) as client:
        tables = client.tables()
        shards = client.num_shards
    return {name: {"rows": t["rows"], "max_rows": t["spec"]["max_rows"] * shards,
                   "evicted_for_room": t["evicted_for_room"]} for name, t in tables.items()}


def _watch(stack: Stack, producer: Producer, options: SoakOptions, series: Series) -> float:
    """Sample until the trainer consumed every event; returns the seconds it took."""
    started = time.monotonic()
    consumed = 0
    with progress_bar("soak: events consumed by the trainer", options.events) as advance:
        while consumed < options.events:
            if producer.error is not None:
                raise RuntimeError(f"the soak producer failed: {producer.error!r}") from producer.error
            if time.monotonic() - started > options.timeout_s:
                raise TimeoutError(f"the trainer consumed {consumed} of {options.events} events in {options.timeout_s} s")
            stack.processes.check()
            now = (read_json(stack.report_path) or {}).get("consumed") or 0
            advance(now - consumed)
            consumed = now
            if consumed:  # every process is up and working
                series.add(time.monotonic() - started, consumed, stack.pids())
            time.sleep(options.sample_seconds)
    return time.monotonic() - started


def run_soak(settings: Settings, options: SoakOptions) -> dict[str, Any]:
    series = Series()
    with tempfile.TemporaryDirectory(prefix="streamrec-soak-") as tmp:
        stack_options = StackOptions(poll_interval=options.poll_interval, max_rows=options.max_rows)
        with running_stack(settings, Path(tmp), stack_options) as stack:
            producer = Producer(stack.settings, options)
            queries = Queries(stack.serving_url, options.query_rate,
                              np.array([f"u{j}" for j in range(0, options.users, max(1, options.users // 10_000))]))
            producer.start()
            queries.thread.start()
            try:
                seconds = _watch(stack, producer, options, series)
                time.sleep(2 * options.poll_interval + 1)  # serving polls the last rows in
                series.add(series.seconds[-1] + 2 * options.poll_interval + 1, options.events, stack.pids())
                tables = _table_bounds(stack)
            finally:
                producer.stop.set()
                queries.stop.set()
                queries.thread.join()
                producer.join(timeout=60)
    warm = int(options.events * WARMUP_FRACTION)
    rows = sum(t["rows"] for t in tables.values())
    bound = sum(t["max_rows"] for t in tables.values())
    return {
        "events": options.events, "users": options.users, "items": options.items,
        "trainer_rss_growth": series.growth(series.trainer_rss, warm),
        "serving_rss_growth": series.growth(series.serving_rss, warm),
        "param_server_rss_growth": series.growth(series.param_server_rss, warm),
        "param_server_rows": rows, "param_server_row_bound": bound,
        "param_server_within_bound": all(t["rows"] <= t["max_rows"] for t in tables.values()),
        "tables": tables, "warmup_events": warm, "seconds": round(seconds, 1),
        "events_per_second": round(options.events / seconds) if seconds else None,
        "queries": len(queries.latencies), "query_errors": queries.errors,
        "query_p99_ms": queries.percentile(99), "series": series.to_json(),
    }
