"""Real processes for the serving tests: a parameter server (the param_server suite's helper),
`streamrec serve` workers over HTTP, and the session's Redis under a unique key prefix per test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest

from streamrec.core.parent_watch import watched_env
from streamrec.param_server.client import ParamClient
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests import children
from tests.param_server.conftest import ServerProcess

T = TypeVar("T")

STREAMREC = str(Path(sys.executable).parent / "streamrec")


def start_param_server(home: Path) -> ServerProcess:
    env = {**os.environ, "STREAMREC_HOME": str(home)}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    return ServerProcess(["--no-checkpoints"], env)


def load_model(client: ParamClient, users: dict[str, np.ndarray], items: dict[str, np.ndarray],
               biases: np.ndarray | None = None) -> None:
    """The default serving tables (BPR layout): bpr_users (dim), bpr_items (dim + bias)."""
    dim = len(next(iter(items.values())))
    client.create_table("bpr_users", dim)
    client.create_table("bpr_items", dim, scalars=1)
    client.assign("bpr_users", list(users), np.array(list(users.values()), np.float32))
    item_bias = np.zeros(len(items), np.float32) if biases is None else biases
    client.assign("bpr_items", list(items), np.array(list(items.values()), np.float32), item_bias)


def write_history(store: FeatureStore, events: list[tuple[str, str, float]]) -> None:
    """(user, item, timestamp) events through the online trainer's own writer."""
    users, items, times = zip(*events)
    store.write(EventBatch.from_columns(np.array(users, object), np.array(items, object),
                                        np.array(["click"] * len(events), object), np.array(times, np.float64)))


class Serving:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.url, self.log = proc, f"http://127.0.0.1:{port}", log
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def get(self, path: str, **params: object) -> httpx.Response:
        return self.http.get(path, params=params)

    def fresh_get(self, path: str) -> httpx.Response:
        """A new connection (with several workers: any of them may answer)."""
        return httpx.get(self.url + path, headers={"Connection": "close"}, timeout=10)

    def wait_ready(self, workers: int, timeout: float = 60.0) -> None:
        pids: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(pids) < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serving did not get ready: {self.log.read_text()[-3000:]}")
            try:
                reply = self.fresh_get("/readyz")
                if reply.status_code == 200:
                    pids.add(reply.json()["pid"])
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                children.kill(self.proc, own_group=True)  # the workers too: they would outlive their parent


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


StartServing = Callable[..., Serving]


def serving_factory(home: Path) -> tuple[StartServing, list[Serving]]:
    started: list[Serving] = []

    def start(param_server: str, redis_url: str, prefix: str, *, workers: int = 1, poll: float = 0.2,
              ready: bool = True, args: tuple[str, ...] = (), api_token: str | None = None,
              extra_env: dict[str, str] | None = None) -> Serving:
        port = free_port()
        env = {**os.environ, "STREAMREC_HOME": str(home), "STREAMREC_PARAM_SERVERS": param_server,
               "STREAMREC_REDIS_URL": redis_url, **(extra_env or {})}
        env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
        env.pop("STREAMREC_API_TOKEN", None)
        if api_token is not None:
            env["STREAMREC_API_TOKEN"] = api_token
        log = home / f"serve-{port}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [STREAMREC, "serve", "--workers", str(workers), "--port", str(port), "--poll-interval", str(poll),
             "--feature-prefix", prefix, *args], env=watched_env(env), stdout=subprocess.DEVNULL,
            stderr=log.open("w"), start_new_session=True)  # its own group, killed whole; ends with this process
        children.track(proc, own_group=True)
        serving = Serving(proc, port, log)
        started.append(serving)
        if ready:
            serving.wait_ready(workers)
        return serving

    return start, started


@pytest.fixture
def start_serving(tmp_path: Path) -> Iterator[StartServing]:
    start, started = serving_factory(tmp_path / "home")
    yield start
    for serving in started:
        serving.stop()


@pytest.fixture
def param_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_param_server(tmp_path / "ps-home")
    yield server
    if server.proc.poll() is None:
        server.kill()


@pytest.fixture
def ps(param_server: ServerProcess) -> Iterator[ParamClient]:
    with ParamClient([param_server.address]) as client:
        yield client


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A feature-store key prefix of this test alone, removed afterwards."""
    name = f"test-serving-{uuid.uuid4().hex[:10]}"
    yield name
    FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=name)).clear()


@pytest.fixture
def feature_store(redis_url: str, prefix: str) -> FeatureStore:
    return FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix))


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, step: float = 0.05) -> T:
    """The predicate's first truthy value, polled every `step` seconds; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")
