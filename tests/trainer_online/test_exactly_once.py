"""Exactly-once model state across crashes of any process, against real processes.

Every check counts independently of the deduplication's own bookkeeping: each shard counts the
events it applied per item, the feature store counts events per item, and both are compared with
a direct count of what was produced (a shortfall is a lost event, an excess a duplicate).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from streamrec.app import infra
from streamrec.param_server.client import ParamClient
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.trainer_online.conftest import (
    TrainerProcess,
    applied,
    planted_events,
    produce_events,
    unique_prefix,
    wait_until,
)


def per_item(events: list[dict]) -> Counter:
    return Counter(e["item_id"] for e in events)


def shard_counts_match(address: str, events: list[dict]) -> None:
    expected = per_item(events)
    with ParamClient([address]) as client:
        for counts in client.item_event_counts():
            lost = sum(max(0, n - counts.get(item, 0)) for item, n in expected.items())
            duplicated = sum(max(0, n - expected.get(item, 0)) for item, n in counts.items())
            assert (lost, duplicated) == (0, 0)
        assert client.applied_events() == len(events)


def restart_on_same_port(start_server, address: str, *args: str):
    return start_server(*args, "--port", address.rsplit(":", 1)[1])


def trainer_that_applied(settings, address: str, tmp_path, events: list[dict]) -> TrainerProcess:
    """A trainer (no feature store) of the server at `address` once it has applied `events`."""
    trainer = TrainerProcess(settings, address, tmp_path / "r.json", "--no-feature-store")
    produce_events(settings, events)
    wait_until(lambda: applied(address) == len(events), timeout=120)
    return trainer


@pytest.mark.parametrize("checkpoints", ["old", "deleted"])
def test_a_restarted_parameter_server_loses_nothing(online_settings, start_server, tmp_path, checkpoints):
    """The issue's three steps: 3,000 events applied, the server SIGKILLed and restarted from a
    checkpoint taken before they arrived ("old": only the start-up one) or with its checkpoint
    directory deleted (it starts empty: the whole topic is learned again), 2,000 more events: all
    5,000 applied exactly once."""
    ckpt = tmp_path / "ckpt"
    args = ("--checkpoint-dir", str(ckpt), "--checkpoint-every", "3600" if checkpoints == "old" else "1")
    server = start_server(*args)
    events = planted_events(5000)
    trainer = trainer_that_applied(online_settings, server.address, tmp_path, events[:3000])
    server.kill()
    if checkpoints == "deleted":
        shutil.rmtree(ckpt)
    server = restart_on_same_port(start_server, server.address, *args)
    produce_events(online_settings, events[3000:])
    wait_until(lambda: applied(server.address) >= 5000, timeout=120)
    trainer.kill()
    shard_counts_match(server.address, events)


def test_trainer_sigkills_apply_each_event_once(online_settings, start_server, tmp_path):
    server = start_server("--no-checkpoints")
    events = planted_events(12000)
    produce_events(online_settings, events)
    for n, stop_at in enumerate((2000, 6000)):
        trainer = TrainerProcess(online_settings, server.address, tmp_path / f"r{n}.json", "--no-feature-store")
        wait_until(lambda: applied(server.address) >= stop_at, timeout=120, interval=0.02)
        trainer.kill()  # anywhere: between a push and its commit too
    last = TrainerProcess(online_settings, server.address, tmp_path / "last.json", "--no-feature-store",
                          "--idle-exit", "8")
    last.wait(timeout=240)
    shard_counts_match(server.address, events)


def test_redis_outage_and_wipe_lose_and_double_nothing(online_settings, start_server, tmp_path):
    """Redis (no persistence) stops during the stream and comes back empty: the trainer pauses
    instead of dropping features, then rebuilds the store from the topic by itself."""
    redis_home = tmp_path / "redis"
    redis_home.mkdir()
    redis = infra.start_redis(redis_home)
    url = f"redis://127.0.0.1:{redis.port}/0"
    settings = online_settings.model_copy(update={"redis_url": url, "feature_prefix": unique_prefix()})
    server = start_server("--no-checkpoints")
    events = planted_events(6000)
    trainer = TrainerProcess(settings, server.address, tmp_path / "r.json", "--idle-exit", "15")
    produce_events(settings, events[:3000])
    wait_until(lambda: applied(server.address) == 3000, timeout=120)
    infra.stop(redis.to_json())
    produce_events(settings, events[3000:])
    wait_until(lambda: applied(server.address) > 3000, timeout=60)  # learned, pushed, now held up by Redis
    redis = infra.start_redis(redis_home, port=redis.port)  # back, and empty
    try:
        trainer.wait(timeout=240)
        store = FeatureStore.from_url(url, FeatureStoreConfig(prefix=settings.feature_prefix))
        assert store.item_event_counts() == dict(per_item(events))
        seen = Counter((e["user_id"], e["item_id"]) for e in events)
        some_user = events[0]["user_id"]
        assert store.seen_items(some_user) == {item for user, item in seen if user == some_user}
        shard_counts_match(server.address, events)
    finally:
        infra.stop(redis.to_json())


@pytest.mark.parametrize("when", ["idle", "mid-batch"])
def test_sigterm_stops_a_trainer_whose_parameter_server_is_gone(online_settings, start_server, tmp_path, when):
    """An orphaned trainer (its parameter server SIGKILLed, never back) still stops on SIGTERM,
    promptly and cleanly, whether it noticed the outage while idle or with a batch in hand."""
    server = start_server("--no-checkpoints")
    events = planted_events(3000)
    trainer = trainer_that_applied(online_settings, server.address, tmp_path, events[:1000])
    server.kill()
    if when == "mid-batch":
        produce_events(online_settings, events[1000:])  # the next push finds no server
    time.sleep(3)
    assert trainer.proc.poll() is None  # it waits for the server, as it should
    started = time.monotonic()
    trainer.proc.send_signal(signal.SIGTERM)
    trainer.wait(timeout=30)
    assert time.monotonic() - started < 20


@pytest.mark.slow  # half a minute: a replay, a reshard and a second replay
def test_resharding_mid_replay_applies_every_event_once(online_settings, start_server, tmp_path):
    """The live migration of docs/operations.md, mid-replay: a trainer applies 3,000 events to two
    shards; the trainer stops (SIGTERM), the shards stop (final checkpoints), `param-server
    reshard` splits them into three, three shards start on the new directory and a trainer pointed
    at them resumes from the committed offsets; 3,000 more events follow. Every shard's independent
    per-item counts and the applied total equal what was produced."""
    def shards(directory, n: int) -> list:
        return [start_server("--shard", str(i), "--num-shards", str(n), "--checkpoint-dir", str(directory),
                             "--checkpoint-every", "1") for i in range(n)]

    def addresses(servers: list) -> str:
        return ",".join(server.address for server in servers)

    def applied_on(servers: list) -> int:
        with ParamClient([server.address for server in servers]) as client:
            return client.applied_events()

    events = planted_events(6000)
    old = shards(tmp_path / "two", 2)
    trainer = TrainerProcess(online_settings, addresses(old), tmp_path / "before.json", "--no-feature-store")
    produce_events(online_settings, events[:3000])
    wait_until(lambda: applied_on(old) == 3000, timeout=120)
    trainer.proc.send_signal(signal.SIGTERM)
    trainer.wait()
    for server in old:
        server.stop()  # a final checkpoint each
    split = subprocess.run([str(Path(sys.executable).with_name("streamrec")), "param-server", "reshard",
                            "--from", str(tmp_path / "two"), "--to", str(tmp_path / "three"), "--shards", "3"],
                           capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if k != "STREAMREC_PARAM_SERVER_TOKEN"})
    assert split.returncode == 0, split.stderr
    new = shards(tmp_path / "three", 3)
    trainer = TrainerProcess(online_settings, addresses(new), tmp_path / "after.json", "--no-feature-store",
                             "--idle-exit", "15")
    produce_events(online_settings, events[3000:])
    trainer.wait(timeout=240)
    with ParamClient([server.address for server in new]) as client:
        expected = dict(per_item(events))
        assert client.item_event_counts() == [expected] * 3  # nothing lost, nothing applied twice, on every shard
        assert client.applied_events() == len(events)
        assert sum(client.watermarks()[0].values()) == len(events)
