"""A whole pipeline on a private topic for benchmarks (`bench soak`, `bench freshness`).

Broker and Redis are the configured ones; the run gets its own topic, consumer group and feature
prefix, a parameter-server shard that checkpoints like production, an online trainer process and
a multi-worker `streamrec serve` polling it. Everything is torn down on the way out (processes,
topics, feature keys), so a benchmark leaves nothing behind.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from streamrec.app.processes import (
    STREAMREC,
    Processes,
    pipeline_env,
    start_param_server,
    worker_pids,
)
from streamrec.core import net
from streamrec.core.config import Settings
from streamrec.stream.kafka import BROKER_ERRORS
from streamrec.stream.topics import create_topics, delete_topics, list_topics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackOptions:
    poll_interval: float = 1.0  # serving's parameter-server poll
    workers: int = 2  # serving worker processes
    checkpoint_every: float = 10.0  # parameter-server checkpoints, seconds
    max_rows: int | None = None  # the parameter server's row bound per table (None: its default)
    trainer_args: tuple[str, ...] = ()  # extra `train-online` options
    serve_args: tuple[str, ...] = ()  # extra `serve` options


@dataclass
class Stack:
    settings: Settings  # pointing at this run's topic, group, prefix and parameter server
    processes: Processes
    serving_url: str
    report_path: Path
    trainer_metrics_url: str  # the trainer's Prometheus endpoint

    def pids(self) -> dict[str, list[int]]:
        """Process ids by role: the serving workers are the uvicorn children, not the parent."""
        children = self.processes.children
        return {"trainer": [children["trainer"].pid], "param_server": [children["param-server"].pid],
                "serving": worker_pids(children["serving"].pid)}

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until every serving worker answers /readyz with a model (a worker holds one after a
        poll that found items); raises if a process died or the time ran out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.processes.check()
            workers = self.pids()["serving"]
            ready: set[int] = set()
            try:
                for _ in range(4 * max(1, len(workers))):  # a new connection each: they land on any worker
                    reply = httpx.get(self.serving_url + "/readyz", timeout=5.0)
                    if reply.status_code == 200:
                        ready.add(reply.json()["pid"])
            except httpx.HTTPError:
                pass  # not listening yet
            if workers and ready >= set(workers):
                return
            time.sleep(0.5)
        raise TimeoutError(f"serving at {self.serving_url} not ready after {timeout_s} s")


@contextmanager
def running_stack(settings: Settings, work: Path, options: StackOptions = StackOptions()) -> Iterator[Stack]:
    """Start parameter server, trainer and serving on a fresh topic; stop and clean up after."""
    run = uuid.uuid4().hex[:8]
    settings = settings.model_copy(update={"topic": f"streamrec.bench.stack.{run}", "consumer_group": f"stack-{run}",
                                           "feature_prefix": f"stack{run}", "home": work})
    work.mkdir(parents=True, exist_ok=True)
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], settings.topic_partitions)
    processes = Processes(work)
    try:
        env = pipeline_env(settings)
        ps_args = ["--port", "0", "--checkpoint-dir", str(work / "checkpoints"),
                   "--checkpoint-every", str(options.checkpoint_every), "--metrics-port", "0"]
        if options.max_rows is not None:
            ps_args += ["--max-rows", str(options.max_rows)]
        address = start_param_server(processes, "param-server", env, ps_args)["address"]
        env["STREAMREC_PARAM_SERVERS"] = address
        settings = settings.model_copy(update={"param_servers": [address]})
        report_path = work / "trainer.json"
        trainer_port = net.free_port()
        processes.start("trainer", [STREAMREC, "train-online", "--report", str(report_path),
                                    "--metrics-port", str(trainer_port), *options.trainer_args], env)
        port = net.free_port()
        processes.start("serving", [STREAMREC, "serve", "--workers", str(options.workers), "--port", str(port),
                                    "--poll-interval", str(options.poll_interval), *options.serve_args], env)
        host = "127.0.0.1" if settings.metrics_host in ("0.0.0.0", "::") else settings.metrics_host
        yield Stack(settings, processes, f"http://127.0.0.1:{port}", report_path, f"http://{host}:{trainer_port}/metrics")
    finally:
        processes.stop_all()
        remove_run_state(settings)


def remove_run_state(settings: Settings) -> None:
    """Delete a finished run's topics and feature-store keys (its own names): on an external broker
    or Redis they stayed behind (a demo left ~83,000 keys, some with a 30-day expiry). A failure is
    logged, never raised over the run's own outcome."""
    ours = {settings.topic, settings.dlq_topic, settings.impressions_topic}  # impressions: when logged or read
    try:
        delete_topics(settings.kafka_bootstrap, sorted(ours & set(list_topics(settings.kafka_bootstrap))))
    except BROKER_ERRORS as exc:
        log.warning("could not delete the run's topics %s: %s", sorted(ours), exc)
    try:
        FeatureStore.from_url(settings.redis_url, FeatureStoreConfig.from_settings(settings)).clear()
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        log.warning("could not clear the run's feature-store keys (prefix %s): %s", settings.feature_prefix, exc)
