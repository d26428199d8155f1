"""`streamrec catalogue follow` against a real broker and parameter server: the items topic becomes
the catalogue blob, refused records reach the dead-letter topic with their reason, a SIGKILL at
any moment loses nothing, a shard that restarts empty gets the catalogue again, and a file
published while following becomes the base the topic applies on top of."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from streamrec.app import infra
from streamrec.core.config import Settings
from streamrec.core.net import free_port
from streamrec.param_server.artifacts import CATALOGUE_BLOB, decode_catalogue_marks
from streamrec.param_server.catalogue_bench import run_benchmark
from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.stream.catalogue import ItemCatalogue
from streamrec.stream.deadletter import read_dead_letter
from streamrec.stream.kafka import make_consumer, make_producer
from streamrec.stream.topics import create_topics, end_offsets, offset_key, partitions_of
from tests.conftest import settings_env
from tests.param_server.conftest import StartServer

STREAMREC = str(Path(sys.executable).parent / "streamrec")


def env_for(settings: Settings, address: str) -> dict[str, str]:
    env = {**os.environ, **settings_env(settings), "STREAMREC_PARAM_SERVERS": address}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    return env


class Follower:
    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        with log.open("a") as out:
            self.proc = subprocess.Popen([STREAMREC, "catalogue", "follow", "--interval", "0.2", *args], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture
def followers(tmp_path: Path) -> Iterator[Callable[..., Follower]]:
    started: list[Follower] = []

    def start(env: dict[str, str], *args: str) -> Follower:
        follower = Follower(env, tmp_path / "follower.log", *args)
        started.append(follower)
        return follower

    yield start
    for follower in started:
        if follower.proc.poll() is None:
            follower.kill()


def send(settings: Settings, records: list[tuple[bytes | None, bytes | None]]) -> None:
    create_topics(settings.kafka_bootstrap, [settings.items_topic], settings.topic_partitions)
    with make_producer(settings.kafka_bootstrap) as producer:
        for key, value in records:
            producer.send(settings.items_topic, value, key=key)  # type: ignore[arg-type]
        producer.flush()


def put(item: str, **attributes: object) -> tuple[bytes, bytes]:
    return item.encode(), json.dumps({"item_id": item, **attributes}).encode()


def patch(item: str, **attributes: object) -> tuple[bytes, bytes]:
    return item.encode(), json.dumps({"item_id": item, "op": "patch", **attributes}).encode()


def stored(client: ParamClient) -> tuple[dict[str, dict[str, object]], dict[str, int] | None, int]:
    blob = client.get_blob(CATALOGUE_BLOB)
    assert blob is not None
    catalogue, marks = decode_catalogue_marks(blob.data)
    return rows(catalogue), marks, blob.version


def rows(catalogue: ItemCatalogue) -> dict[str, dict[str, object]]:
    return {item: {k: sorted(v) if isinstance(v, list) else v for k, v in attrs.items()}
            for item, attrs in catalogue.attributes_of(catalogue.ids.tolist()).items()}


def ends(settings: Settings) -> dict[str, int]:
    """Each partition's end, over the partitions the topic has: a topic recreated after a broker
    restart may have been auto-created with the broker's default count, not the settings'."""
    bounds = end_offsets(settings.kafka_bootstrap, settings.items_topic,
                         partitions_of(settings.kafka_bootstrap, settings.items_topic))
    return {offset_key(settings.items_topic, p): end for p, (_, end) in bounds.items()}


def describe(client: ParamClient, settings: Settings, expected: dict[str, dict[str, object]], log: Path) -> str:
    """What a failed `caught_up` saw: the items missing or different, the marks against the ends."""
    got, marks, version = stored(client)
    wrong = {item: (got.get(item), attrs) for item, attrs in expected.items() if got.get(item) != attrs}
    return (f"version {version}; missing or different: {wrong}; extra: {sorted(set(got) - set(expected))}; "
            f"marks {marks}; ends {ends(settings)}; follower log:\n{log.read_text(errors='replace')[-3000:]}")


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, state: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (AssertionError, KeyError, OSError, ParamServerError):  # no blob yet, a shard restarting
            pass
        time.sleep(0.2)
    assert condition(), state() if state is not None else "condition not reached"


def caught_up(client: ParamClient, settings: Settings, expected: dict[str, dict[str, object]]) -> bool:
    got, marks, _ = stored(client)
    return got == expected and marks == ends(settings)


def test_the_topic_becomes_the_catalogue_and_refused_records_are_dead_lettered(
        settings: Settings, start_server: StartServer, followers: Callable[..., Follower], tmp_path: Path) -> None:
    server = start_server("--no-checkpoints")
    env = env_for(settings, server.address)
    catalogue_file = tmp_path / "items.jsonl"
    catalogue_file.write_text("".join(json.dumps({"item_id": f"i{j}", "genre": ["a", "b"][j % 2], "price": j}) + "\n"
                                      for j in range(50)))
    produced = subprocess.run([STREAMREC, "catalogue", "produce", str(catalogue_file), "--json"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert produced.returncode == 0, produced.stderr
    assert json.loads(produced.stdout) == {"topic": settings.items_topic, "records": 50}
    followers(env)
    send(settings, [patch("i1", in_stock=False, price=None), (b"i2", None), put("i3", genre="c"),
                    (b"junk", b"{broken"), put("i4", price="cheap"), (b"other", json.dumps({"item_id": "i5"}).encode()),
                    put("id:with:colons", genre="a")])
    expected = {f"i{j}": {"genre": [["a", "b"][j % 2]], "price": float(j)} for j in range(50)}
    expected["i1"] = {"genre": ["b"], "in_stock": ["false"]}
    expected["i3"] = {"genre": ["c"]}
    expected["id:with:colons"] = {"genre": ["a"]}
    del expected["i2"]
    with ParamClient([server.address]) as client:
        wait_for(lambda: caught_up(client, settings, expected))

    dlq = settings.items_topic + settings.dlq_suffix
    with make_consumer(settings.kafka_bootstrap) as consumer:
        consumer.assign([(dlq, p) for p in range(settings.topic_partitions)])
        letters: list[dict[str, object]] = []
        deadline = time.monotonic() + 30
        while len(letters) < 3 and time.monotonic() < deadline:
            letters += [read_dead_letter(r.value) for r in consumer.poll(timeout_s=0.5)]
    assert sorted((letter["reason"], letter["raw"]) for letter in letters) == [
        ("key_mismatch", json.dumps({"item_id": "i5"}).encode()), ("kind_conflict", put("i4", price="cheap")[1]),
        ("not_json", b"{broken")]
    assert all(letter["component"] == "catalogue" for letter in letters)


def test_a_sigkill_at_any_moment_loses_nothing(settings: Settings, start_server: StartServer,
                                               followers: Callable[..., Follower]) -> None:
    server = start_server("--no-checkpoints")
    env = env_for(settings, server.address)
    rng = np.random.default_rng(3)
    model: dict[str, dict[str, object]] = {}
    with ParamClient([server.address]) as client:
        for round_ in range(4):
            follower = followers(env)
            batch = []
            for n in range(300):  # puts, patches and deletes of 40 items, in order per item (keyed)
                item, kind = f"sku-{rng.integers(40)}", rng.integers(3)
                if kind == 0:
                    batch.append(put(item, colour=f"c{n % 5}", stock=int(n)))
                    model[item] = {"colour": [f"c{n % 5}"], "stock": float(n)}
                elif kind == 1:
                    batch.append(patch(item, stock=None, sale="yes"))
                    model[item] = {**{k: v for k, v in model.get(item, {}).items() if k != "stock"}, "sale": ["yes"]}
                else:
                    batch.append((item.encode(), None))
                    model.pop(item, None)
            send(settings, batch)
            time.sleep(float(rng.uniform(0.0, 1.5)))  # mid-read, mid-publish or idle
            follower.kill()
        follower = followers(env)
        wait_for(lambda: caught_up(client, settings, model))
        assert follower.stop() == 0


def test_a_shard_restarted_empty_gets_the_catalogue_again(settings: Settings, start_server: StartServer,
                                                          followers: Callable[..., Follower]) -> None:
    port = free_port()
    server = start_server("--no-checkpoints", "--port", str(port))
    env = env_for(settings, server.address)
    followers(env)
    send(settings, [put("a", genre="x"), put("b", genre="y")])
    expected = {"a": {"genre": ["x"]}, "b": {"genre": ["y"]}}
    with ParamClient([server.address]) as client:
        wait_for(lambda: caught_up(client, settings, expected))
    server.kill()
    server = start_server("--no-checkpoints", "--port", str(port))
    with ParamClient([server.address]) as client:
        wait_for(lambda: caught_up(client, settings, expected), timeout=30)  # the version check runs every 5 s


def test_a_file_published_while_following_is_the_base_the_topic_applies_on(
        settings: Settings, start_server: StartServer, followers: Callable[..., Follower], tmp_path: Path) -> None:
    server = start_server("--no-checkpoints")
    env = env_for(settings, server.address)
    followers(env)
    send(settings, [put("old", genre="x"), put("kept", genre="y")])
    with ParamClient([server.address]) as client:
        wait_for(lambda: caught_up(client, settings, {"old": {"genre": ["x"]}, "kept": {"genre": ["y"]}}))
        _, marks_before, _ = stored(client)
        catalogue_file = tmp_path / "items.jsonl"
        catalogue_file.write_text('{"item_id": "kept", "genre": "z"}\n{"item_id": "file", "genre": "f"}\n')
        published = subprocess.run([STREAMREC, "catalogue", "publish", str(catalogue_file), "--json"], env=env,
                                   capture_output=True, text=True, timeout=60)
        assert published.returncode == 0, published.stderr
        got, marks, _ = stored(client)
        assert got == {"kept": {"genre": ["z"]}, "file": {"genre": ["f"]}} and marks == marks_before
        send(settings, [patch("kept", sale="yes")])
        wait_for(lambda: caught_up(client, settings, {"kept": {"genre": ["z"], "sale": ["yes"]},
                                                      "file": {"genre": ["f"]}}))


def test_the_benchmark_publishes_every_patch_it_sends(settings: Settings) -> None:
    report = run_benchmark(settings, items=2000, rate=50, seconds=2, interval_s=0.2)
    assert report["patches"] == 100 and report["patches_unpublished"] == 0
    assert 0 < report["patch_to_version_p50_ms"] <= report["patch_to_version_p99_ms"] < 60_000
    assert report["load_records_per_second"] > 0 and report["blob_bytes"] > 0 and report["publishes"] >= 2


def test_a_broker_that_comes_back_empty_is_read_from_its_beginning(
        settings: Settings, start_server: StartServer, followers: Callable[..., Follower], tmp_path: Path) -> None:
    """Tansu keeps nothing across a restart: the recreated partitions start at offset 0 again, below
    the marks. Their records used to be skipped in silence, for good."""
    broker = infra.start_broker(tmp_path / "broker").to_json()
    own = settings.model_copy(update={"kafka_bootstrap": f"{broker['host']}:{broker['port']}"})
    server = start_server("--no-checkpoints")
    try:
        followers(env_for(own, server.address))
        before = {f"old-{n}": {"g": ["x"]} for n in range(30)}
        send(own, [put(item, g="x") for item in before])
        with ParamClient([server.address]) as client:
            wait_for(lambda: caught_up(client, own, before))
            infra.stop(broker)
            broker = infra.start_broker(tmp_path / "broker2", port=broker["port"]).to_json()
            after = {**before, **{f"new-{n}": {"g": ["y"]} for n in range(5)}}
            send(own, [put(item, g="y") for item in after if item.startswith("new")])
            wait_for(lambda: caught_up(client, own, after), timeout=90,
                     state=lambda: describe(client, own, after, tmp_path / "follower.log"))
    finally:
        infra.stop(broker)
