"""Every metric of docs/metrics.md is exposed by the process that owns it, and the key counters move.

A short real pipeline: the session's broker and Redis, a parameter-server process
(`--metrics-port`), a `streamrec train-online --metrics-port` process and `streamrec serve
--workers 2` (multiprocess metrics). Each `/metrics` is scraped twice, with events, a dead letter
and requests in between. The catalogue table is parsed, not repeated here.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamrec.stream.kafka import make_producer
from streamrec.stream.topics import create_topics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.conftest import settings_env
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import STREAMREC, free_port, serving_factory
from tests.trainer_online.conftest import TrainerProcess, planted_events, produce_events, wait_until

CATALOGUE = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\|\s*`(streamrec_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|\s*([\w-]+)\s*\|")


def catalogue() -> dict[str, tuple[str, str]]:
    """{metric: (type, process)} from the table under '## Catalogue' in docs/metrics.md."""
    text = CATALOGUE.read_text()
    section = text.split("\n## Catalogue", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line.strip())
        if match:
            name, kind, _, process = match.groups()
            rows[name] = (kind, process)
    return rows


class Scrape:
    """One /metrics answer: declared families (name -> type) and samples."""

    def __init__(self, url: str) -> None:
        reply = httpx.get(url, timeout=10)
        reply.raise_for_status()
        self.text = reply.text
        self.types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", self.text, re.M))
        self.samples = [s for family in text_string_to_metric_families(self.text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_catalogue_parses_and_follows_the_naming_convention():
    rows = catalogue()
    assert len(rows) >= 30, rows
    for name, (kind, process) in rows.items():
        assert process in {"param-server", "train-online", "serve", "refit", "experiments-watch", "catalogue-follow"}, \
            (name, process)
        assert kind in {"counter", "gauge", "histogram"}, (name, kind)
        assert (kind == "counter") == name.endswith("_total"), name
        assert re.fullmatch(r"streamrec_(stream|trainer|param_server|serving|refit)_[a-z0-9_]+", name), name


def _listening(url: str) -> bool:
    try:
        Scrape(url)
    except httpx.HTTPError:
        return False
    return True


def consumed(url: str) -> float:
    try:
        return Scrape(url).value("streamrec_trainer_events_consumed_total")
    except httpx.HTTPError:  # not listening yet
        return 0.0


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"test-e2e-{uuid.uuid4().hex[:10]}"
    yield name
    FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=name)).clear()


def test_every_catalogued_metric_is_exposed_and_counters_move(settings, redis_url, prefix, tmp_path, monkeypatch):
    rows = catalogue()
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 2)
    monkeypatch.setenv("STREAMREC_FEATURE_PREFIX", prefix)  # the trainer's feature-store prefix
    monkeypatch.delenv("STREAMREC_PARAM_SERVER_TOKEN", raising=False)

    ps_metrics, trainer_metrics, follow_metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "STREAMREC_HOME": str(tmp_path / "ps-home")}
    server = ServerProcess(["--no-checkpoints", "--metrics-port", str(ps_metrics)], env)
    trainer = TrainerProcess(settings, server.address, tmp_path / "report.json", "--model", "online-bpr",
                             "--evaluate-every", "2", "--metrics-port", str(trainer_metrics))
    start_serving, started = serving_factory(tmp_path / "serve-home")
    follower = subprocess.Popen([STREAMREC, "catalogue", "follow", "--interval", "0.2", "--metrics-port",
                                 str(follow_metrics)], env={**env, **settings_env(settings),
                                                            "STREAMREC_PARAM_SERVERS": server.address},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        events = planted_events(2400, users=100)
        produce_events(settings, events[:1200])
        urls = {"param-server": f"http://127.0.0.1:{ps_metrics}/metrics",
                "train-online": f"http://127.0.0.1:{trainer_metrics}/metrics",
                "catalogue-follow": f"http://127.0.0.1:{follow_metrics}/metrics"}
        wait_until(lambda: _listening(urls["catalogue-follow"]), timeout=40)
        wait_until(lambda: consumed(urls["train-online"]) >= 1200, timeout=40)
        experiments = tmp_path / "experiments.yaml"  # the per-arm series exist with an experiments file
        experiments.write_text("experiments: [{name: e, arms: [{name: a}, {name: b}]}]\n")
        serving = start_serving(server.address, redis_url, prefix, workers=2, poll=0.2,
                                args=("--experiments", str(experiments)))
        urls["serve"] = serving.url + "/metrics"
        serving.get("/recommend", user_id="u1", k=10)
        first = {process: Scrape(url) for process, url in urls.items()}

        produce_events(settings, events[1200:])
        with make_producer(settings.kafka_bootstrap) as producer:  # one dead letter for the trainer
            producer.send(settings.topic, b"{broken json", b"u1")
            producer.send(settings.items_topic, b'{"item_id": "i1", "genre": "g"}', b"i1")  # one item, one refusal
            producer.send(settings.items_topic, b"{broken json", b"i2")
            producer.flush()
        for n in range(20):
            assert serving.get("/recommend", user_id=f"u{n}", k=10).status_code == 200
        assert serving.get("/recommend", user_id="u1", k=0).status_code == 422  # an error to count
        wait_until(lambda: consumed(urls["train-online"]) >= 2401, timeout=40)
        wait_until(lambda: Scrape(urls["serve"]).value("streamrec_serving_model_version") > 0, timeout=20)
        wait_until(lambda: Scrape(urls["catalogue-follow"]).value("streamrec_stream_catalogue_items") == 1, timeout=20)
        second = {process: Scrape(url) for process, url in urls.items()}

        for process, scrape in second.items():
            expected = {name: kind for name, (kind, owner) in rows.items() if owner == process}
            missing = sorted(set(expected) - set(scrape.types))
            assert not missing, f"{process} does not expose {missing}"
            wrong = {n: (k, scrape.types[n]) for n, k in expected.items() if scrape.types[n] != k}
            assert not wrong, f"{process}: catalogue type vs exposed type {wrong}"

        def moved(process: str, name: str, **labels: str) -> tuple[float, float]:
            before, after = first[process].value(name, **labels), second[process].value(name, **labels)
            assert after > before, (process, name, labels, before, after)
            return before, after

        moved("serve", "streamrec_serving_experiment_requests_total", experiment="e")
        moved("catalogue-follow", "streamrec_stream_catalogue_records_total", outcome="applied")
        moved("catalogue-follow", "streamrec_stream_catalogue_records_total", outcome="dead_lettered")
        moved("catalogue-follow", "streamrec_stream_catalogue_publishes_total", cause="changes")
        moved("train-online", "streamrec_trainer_events_consumed_total")
        moved("train-online", "streamrec_trainer_events_applied_total")
        moved("train-online", "streamrec_stream_events_accepted_total", component="trainer")
        moved("train-online", "streamrec_stream_events_dead_lettered_total", component="trainer")
        moved("train-online", "streamrec_trainer_batch_seconds_count")
        moved("param-server", "streamrec_param_server_request_seconds_count", op="push")
        moved("param-server", "streamrec_param_server_applied_events_total")
        moved("param-server", "streamrec_param_server_version")
        moved("serve", "streamrec_serving_requests_total", endpoint="/recommend", status="200")
        moved("serve", "streamrec_serving_request_seconds_count", endpoint="/recommend")
        assert second["serve"].value("streamrec_serving_errors_total", endpoint="/recommend", status="422") >= 1
        assert second["param-server"].value("streamrec_param_server_table_rows", table="bpr_items") > 0
        assert second["serve"].value("streamrec_serving_index_items") > 0
        prequential = {s.labels["metric"] for s in second["train-online"].samples
                       if s.name == "streamrec_trainer_prequential"}
        assert {"hr@10", "ndcg@10"} <= prequential, prequential
    finally:
        with contextlib.ExitStack() as stops:  # last in, first run; each runs even when one before it failed
            stops.callback(server.stop)
            stops.callback(trainer.wait, 30)
            stops.callback(trainer.proc.terminate)
            for serving in reversed(started):
                stops.callback(serving.stop)
            stops.callback(follower.wait, 60)
            stops.callback(follower.terminate)
