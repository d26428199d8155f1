"""A whole running pipeline for the console test: the session's broker and Redis, a parameter
server and an online trainer (each with its /metrics port), and `streamrec serve` polling every
second with those /metrics URLs as the console's sources and an API token; seeded with a replay of
the built-in synthetic log, whose planted item groups serve as genres."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from streamrec.core.config import Settings
from streamrec.core.net import free_port
from streamrec.stream.loaders import InteractionLog
from streamrec.stream.publish import EventPublisher
from streamrec.stream.replay import replay
from streamrec.stream.topics import create_topics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.conftest import settings_env
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import Serving, serving_factory
from tests.trainer_online.conftest import TrainerProcess, wait_until


@dataclass
class Stack:
    serving: Serving
    token: str
    trainer: TrainerProcess
    param_server: ServerProcess

    def api(self, path: str, **params: object) -> httpx.Response:
        return self.serving.http.get(path, params=params, headers={"Authorization": f"Bearer {self.token}"})


@contextmanager
def console_stack(settings: Settings, log: InteractionLog, home: Path) -> Iterator[Stack]:
    """Start everything, replay `log`, wait until serving holds a model trained on all of it."""
    settings = settings.model_copy(update={"feature_prefix": f"console{uuid.uuid4().hex[:8]}"})
    home.mkdir(parents=True, exist_ok=True)
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 2)
    ps_metrics, trainer_metrics = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "STREAMREC_PARAM_SERVER_TOKEN"}
    server = ServerProcess(["--no-checkpoints", "--metrics-port", str(ps_metrics)],
                           {**env, "STREAMREC_HOME": str(home / "ps")})
    trainer = TrainerProcess(settings, server.address, home / "trainer.json", "--model", "online-bpr",
                             "--batch-seconds", "0.2", "--metrics-port", str(trainer_metrics))
    start_serving, started = serving_factory(home / "serve")
    token = uuid.uuid4().hex
    # serving's environment (serving_factory starts it with this process's): the test's broker and
    # topic for POST /events, and the other processes' /metrics for the console
    serving_env = {**settings_env(settings), "STREAMREC_METRICS_SOURCES": (
        f"trainer=http://127.0.0.1:{trainer_metrics}/metrics,param_server=http://127.0.0.1:{ps_metrics}/metrics")}
    previous = {name: os.environ.get(name) for name in serving_env}
    os.environ.update(serving_env)
    try:
        publisher = EventPublisher.from_settings(settings, "console-test")
        produced = replay(log, publisher).produced
        publisher.close()
        try:
            wait_until(lambda: trainer.proc.poll() is not None
                       or ((trainer.report() or {}).get("consumed") or 0) >= produced, timeout=180, interval=0.5)
        except TimeoutError:
            raise AssertionError(f"the trainer did not learn the {produced} events: {trainer.report()}") from None
        assert trainer.proc.poll() is None, f"the trainer exited: {trainer.proc.communicate()[1][-3000:]}"
        serving = start_serving(server.address, settings.redis_url, settings.feature_prefix, poll=1.0,
                                api_token=token)
        stack = Stack(serving, token, trainer, server)
        wait_until(lambda: stack.api("/ui/api/info").json()["users"] > 0, timeout=60)
        yield stack
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for serving in started:
            serving.stop()
        if trainer.proc.poll() is None:
            trainer.kill()
        server.kill()
        FeatureStore.from_url(settings.redis_url, FeatureStoreConfig(prefix=settings.feature_prefix)).clear()
