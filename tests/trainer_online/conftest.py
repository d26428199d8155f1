"""Real processes for the online-trainer tests: broker and Redis (session fixtures), a parameter
server subprocess, and `streamrec train-online` subprocesses (or in-process trainers)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from streamrec.core.config import Settings
from streamrec.core.parent_watch import watched_env
from streamrec.param_server.client import ParamClient
from streamrec.stream.kafka import make_producer
from streamrec.stream.publish import EventPublisher
from streamrec.stream.topics import create_topics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests import children
from tests.conftest import settings_env
from tests.param_server.conftest import start_server  # noqa: F401  (a fixture shared with these suites)

STREAMREC = str(Path(sys.executable).parent / "streamrec")


def planted_events(n: int, users: int = 200, clusters: int = 4, items_per_cluster: int = 25, seed: int = 0,
                   start: float = 1_700_000_000.0) -> list[dict]:
    """Users belong to a cluster and interact (90%) with their cluster's items: learnable structure."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n)
    cluster = user % clusters
    own = rng.random(n) < 0.9
    item_cluster = np.where(own, cluster, rng.integers(0, clusters, n))
    item = item_cluster * items_per_cluster + rng.integers(0, items_per_cluster, n)
    return [
        {"event_id": f"e{i}" if seed == 0 else f"s{seed}e{i}", "user_id": f"u{u}", "item_id": f"i{it}", "event_type": "click",
         "timestamp": start + i * 0.5}
        for i, (u, it) in enumerate(zip(user.tolist(), item.tolist()))
    ]


def produce_events(settings: Settings, events: list[dict]) -> None:
    publisher = EventPublisher.from_settings(settings, "test")
    for n, event in enumerate(events):
        publisher.publish(event, {"test": n})
    publisher.close()
    assert publisher.dead_lettered == 0


@pytest.fixture
def online_settings(settings: Settings, tmp_path: Path) -> Settings:
    """Test settings with a fresh topic (3 partitions) and a feature-store prefix of its own."""
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 3)
    return settings


class TrainerProcess:
    """`streamrec train-online` as a real process; `report()` reads its --report file. What a
    test leaves running is killed after it (`tests.children`): a test that failed before its own
    kill would otherwise leave a trainer looping for good."""

    def __init__(self, settings: Settings, ps_address: str, report: Path, *args: str) -> None:
        env = {**os.environ, **settings_env(settings), "STREAMREC_PARAM_SERVERS": ps_address}
        self.report_path = report
        self.proc = children.track(subprocess.Popen(
            [STREAMREC, "train-online", "--report", str(report), "--batch-events", "200", *args],
            env=watched_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))

    def report(self) -> dict | None:
        try:
            return json.loads(self.report_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait(self, timeout: float = 120) -> str:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        assert self.proc.returncode == 0, err[-3000:]
        return out

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate()


def wait_until(predicate: Callable[[], bool], timeout: float = 60, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not reached")


def applied(address: str) -> int:
    with ParamClient([address]) as client:
        return client.applied_events()


def unique_prefix() -> str:
    return f"srt{uuid.uuid4().hex[:8]}"


TOPIC_EVENTS = 1500


@pytest.fixture
def topic_events(online_settings: Settings) -> list[dict]:
    """Records that break the schema (written by a faulty producer), then TOPIC_EVENTS valid events, on the
    3-partition topic."""
    with make_producer(online_settings.kafka_bootstrap, online_settings.kafka_client) as producer:
        for n, junk in enumerate((b"not json", b'{"user_id": "u1"}', b"[]")):
            producer.send(online_settings.topic, junk, key=f"u{n}".encode())
        producer.flush()
    events = planted_events(TOPIC_EVENTS, users=60, items_per_cluster=10)
    produce_events(online_settings, events)
    return events


_QUOTED = re.compile(rb'"((?:\\.|[^"\\])*)"')  # MONITOR's quoted arguments, escapes kept as they are


def monitored_script_keys(server: redis.Redis, prefix: str, action: Callable[[], object]) -> tuple[set[bytes], set[bytes], set[bytes]]:
    """Watch `server` (MONITOR) while `action()` runs: (the keys its EVALSHA calls declared, the
    keys under `prefix` that commands run by scripts touched, those commands' names). Arguments
    are compared as MONITOR quotes them, so ids that need escaping compare exactly too."""
    sentinel = f"monitor-end-{uuid.uuid4().hex}".encode()
    declared: set[bytes] = set()
    touched: set[bytes] = set()
    commands: set[bytes] = set()
    with server.monitor() as monitor:
        action()
        server.echo(sentinel)
        while True:
            line = monitor.connection.read_response()
            args = _QUOTED.findall(line if isinstance(line, bytes) else line.encode())
            if len(args) == 2 and args[0].upper() == b"ECHO" and args[1] == sentinel:
                return declared, touched, commands
            if b" lua] " in line and len(args) > 1 and args[1].startswith(prefix.encode()):
                commands.add(args[0].upper())
                touched.add(args[1])
            elif args and args[0].upper() == b"EVALSHA":
                declared.update(args[3 : 3 + int(args[2])])


@pytest.fixture
def new_store(redis_url: str) -> Iterator[Callable[[], FeatureStore]]:
    """Makes feature stores, each under a fresh key prefix, cleared at the end."""
    made: list[FeatureStore] = []

    def make() -> FeatureStore:
        made.append(FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=unique_prefix())))
        return made[-1]

    yield make
    for store in made:
        store.clear()
