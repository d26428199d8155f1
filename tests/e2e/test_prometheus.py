"""The Grafana dashboard against a real Prometheus scraping a real pipeline.

Debian's `prometheus` binary scrapes, every second, a parameter server, an online trainer, a
two-worker `streamrec serve` and a `streamrec refit --every` loop, with the scrape jobs of
deploy/prometheus/prometheus.yml (its DNS discovery swapped for the test's loopback ports). A small
log is replayed; then, while steady traffic runs (`Traffic`: new events, requests, and each kind
of error: a malformed record, an unknown item (404), a bad `k` (422), an unknown user (cold
start), a parameter-server call on a missing table), EVERY PromQL expression of the dashboard goes through Prometheus' HTTP API and
must return the series its panel is meant to show (`EXPECTED`), rates of what the run exercised
above zero. A panel added without an entry here fails the test, so the dashboard cannot drift away
from the metrics the code exports.

Grafana's `$__rate_interval` becomes `RATE_INTERVAL`.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
import orjson
import pytest
import yaml
from prometheus_client import REGISTRY

from streamrec.app.processes import (
    STREAMREC,
    Processes,
    pipeline_env,
    start_param_server,
)
from streamrec.core import net
from streamrec.core.config import Settings
from streamrec.param_server.client import ParamClient, ParamServerError
from streamrec.stream.kafka import make_producer
from streamrec.stream.publish import EventPublisher
from streamrec.stream.topics import create_topics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from streamrec.trainer.refit import refit_loop
from tests.trainer_online.conftest import planted_events, produce_events

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "streamrec.json"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS = Path("/usr/bin/prometheus")
RATE_INTERVAL = "1m"
GRAFANA_VARIABLES = {"$__rate_interval": RATE_INTERVAL}
EVENTS = 3000
REFIT_MODEL = "als"  # publishes tables (assign) and blobs (put_blob): both show on the refit panels


@dataclass(frozen=True)
class Expect:
    """Series (legends as Grafana renders them) a query must return; `positive`: each above zero."""

    legends: frozenset[str]
    positive: bool = True


def expect(*legends: str, positive: bool = True) -> Expect:
    return Expect(frozenset(legends), positive)


def expected(ps_instance: str) -> dict[tuple[str, str], Expect]:
    """(panel title, refId) -> what the run must make it show (`ps_instance`: the parameter
    server's scrape address, the one instance label a panel shows)."""
    return {
        ("Ingest rate (events/s)", "A"): expect("consumed"),
        ("Ingest rate (events/s)", "B"): expect("applied"),
        ("Ingest rate (events/s)", "C"): expect("accepted trainer"),
        ("Consumer lag (events)", "A"): expect("total", positive=False),  # caught up: 0
        ("Consumer lag (events)", "B"): expect("partition 0", "partition 1", "partition 2", positive=False),
        ("Dead-letter rate (records/s)", "A"): expect("trainer not_json"),
        ("Prequential hr@10 / ndcg@10", "A"): expect("hr@10 (last 1000)", "ndcg@10 (last 1000)"),
        ("Training loss", "A"): expect("online-bpr"),
        ("Trainer batch / update / feature-store time (p99)", "A"): expect("batch p99"),
        ("Trainer batch / update / feature-store time (p99)", "B"): expect("update (pull+grad+push) p99"),
        ("Trainer batch / update / feature-store time (p99)", "C"): expect("feature store p99"),
        ("Rows per table", "A"): expect("bpr_items", "bpr_users", f"refit_{REFIT_MODEL}_items",
                                        f"refit_{REFIT_MODEL}_users"),
        ("Push latency", "A"): expect("server push p50"),
        ("Push latency", "B"): expect("server push p99"),
        ("Push latency", "C"): expect("server pull p99"),
        ("Push latency", "D"): expect("trainer update p50"),
        ("Requests/s by op, applied events/s", "A"): expect("push", "pull", "delta", "assign", "put_blob"),
        ("Requests/s by op, applied events/s", "B"): expect("applied events"),
        ("Serving QPS", "A"): expect("/recommend", "/similar"),
        ("/recommend latency p50 / p99", "A"): expect("p50"),
        ("/recommend latency p50 / p99", "B"): expect("p99"),
        ("Errors", "A"): expect("serving /similar 404", "serving /recommend 422"),
        ("Errors", "B"): expect("param-server pull KeyError"),
        ("Errors", "C"): expect("serving poll failures", positive=False),  # nothing failed: 0/s
        ("Errors", "D"): expect("feature-store failures", positive=False),
        ("Errors", "E"): expect("degraded cold_start"),
        ("Staleness", "A"): expect("serving (worst worker)", positive=False),
        ("Staleness", "B"): expect(f"checkpoint age {ps_instance}", positive=False),
        ("Model version served vs. parameter server", "A"): expect("serving (oldest worker)"),
        ("Model version served vs. parameter server", "B"): expect("parameter server"),
        ("Candidates by source (/s)", "A"): expect("candidates ann"),
        ("Candidates by source (/s)", "B"): expect("served ann"),
        ("Refit durations", "A"): expect(*(f"{REFIT_MODEL} {stage}" for stage in ("load", "fit", "publish"))),
        ("Refit durations", "B"): expect("param-server assign p99", "param-server put_blob p99"),
        ("Refits finished", "A"): expect(f"{REFIT_MODEL} ok"),
        ("Scrape targets up", "A"): expect("streamrec-param-server", "streamrec-trainer", "streamrec-serving",
                                           "streamrec-refit", "streamrec-experiments-watch",
                                           "streamrec-catalogue-follow", "prometheus"),
        ("Time since the last successful refit", "A"): expect(REFIT_MODEL),
        ("Refit size (rows)", "A"): expect(f"{REFIT_MODEL} events fitted on"),
        ("Refit size (rows)", "B"): expect(f"{REFIT_MODEL} rows published"),
        ("Answers by experiment arm (/s)", "A"): expect("all-users everyone"),
        ("Answers by experiment arm (/s)", "B"): expect("experiments in force"),
        ("Impressions logged (/s)", "A"): expect("impressions produced"),
        ("Impressions logged (/s)", "B"): expect("experiments files refused (1h)", positive=False),
        # the watch: Traffic clicks the first item of each personal answer, with its request_id
        ("Hit rate and CTR by arm", "A"): expect("all-users everyone hit rate"),
        ("Hit rate and CTR by arm", "B"): expect("all-users everyone CTR"),
        ("Items shown by arm (coverage)", "A"): expect("all-users everyone"),
        ("Experiments watch: join state", "A"): expect("held impressions", "held events"),
        # the planted events carry 2023 timestamps: older than the lateness behind the clicks' clock
        ("Experiments watch: join state", "B"): expect("late impressions (/s)", "late events (/s)", positive=False),
        # the follower: Traffic sends an item's stock flip and a broken record to the items topic each round
        ("Catalogue follower: records (/s)", "A"): expect("applied", "dead_lettered"),
        ("Catalogue follower: records (/s)", "B"): expect("versions published"),
        ("Catalogue follower: items, pending, lag", "A"): expect("items"),
        ("Catalogue follower: items, pending, lag", "B"): expect("pending changes", positive=False),
        ("Catalogue follower: items, pending, lag", "C"): expect("lag (records)", positive=False),
        ("Catalogue publish time", "A"): expect("p99"),
    }


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str
    legend: str

    @property
    def promql(self) -> str:
        """The expression as Grafana sends it: its variables substituted."""
        text = self.expr
        for variable, value in GRAFANA_VARIABLES.items():
            text = text.replace(variable, value)
        assert "$" not in text, f"{self.panel} {self.ref}: unknown Grafana variable in {self.expr}"
        return text

    def legend_of(self, labels: dict[str, str]) -> str:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), self.legend)


def dashboard_queries() -> list[Query]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [Query(p["title"], t["refId"], t["expr"], t.get("legendFormat", ""))
            for p in panels for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def prometheus_binary() -> Path:
    if not PROMETHEUS.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{PROMETHEUS} is missing: CI installs Debian's `prometheus` package")
        pytest.skip(f"{PROMETHEUS} is missing (apt install prometheus)")
    return PROMETHEUS


class Prometheus:
    """A real Prometheus on a free loopback port with the deployed scrape jobs, pointed at `targets`
    (job -> host:port) and scraping every second; its data lives under `home`."""

    def __init__(self, binary: Path, home: Path, targets: dict[str, str]) -> None:
        self.port = net.free_port()
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        targets = {**targets, "prometheus": f"127.0.0.1:{self.port}"}
        jobs = [job["job_name"] for job in config["scrape_configs"]]
        assert sorted(jobs) == sorted(targets), (jobs, targets)  # the test covers every deployed job
        for job in config["scrape_configs"]:
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        home.mkdir(parents=True, exist_ok=True)
        path = home / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = home / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), f"--config.file={path}", f"--storage.tsdb.path={home / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, promql: str) -> httpx.Response:
        return self.http.get("/api/v1/query", params={"query": promql})

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Traffic:
    """What a live system sees, until stopped: a trickle of new events and of recommendation
    requests, and now and then something wrong (a malformed record, an unknown item, a bad `k`, an
    unknown user, a parameter-server call on a missing table). Steady traffic keeps every rate of
    the dashboard above zero at whatever moment a query runs, and repeating each error matters:
    a labelled counter series is born at 1, and Prometheus sees no increase until it grows again."""

    def __init__(self, settings: Settings, serving: str, ps_address: str) -> None:
        self.settings, self.serving, self.ps_address = settings, serving, ps_address
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        publisher = EventPublisher.from_settings(self.settings, "test")
        rounds = 0
        with httpx.Client(base_url=self.serving, timeout=10) as http, ParamClient([self.ps_address]) as client, \
                make_producer(self.settings.kafka_bootstrap) as producer:
            while not self.stop.wait(0.5):
                rounds += 1
                for event in planted_events(20, seed=rounds, start=1_700_100_000.0 + rounds * 10):
                    publisher.publish({**event, "event_id": f"r{rounds}-{event['event_id']}"}, {"round": rounds})
                reply = http.get("/recommend", params={"user_id": f"u{rounds % 50}", "k": 10})
                if reply.status_code != 200 or not reply.json()["items"]:
                    self.failures.append(f"/recommend u{rounds % 50}: {reply.status_code} {reply.text[:200]}")
                    continue
                answer = reply.json()
                publisher.publish({  # the user clicks what they were shown: a hit and a click for the watch
                    "event_id": f"click-{rounds}", "user_id": f"u{rounds % 50}", "item_id": answer["items"][0]["item_id"],
                    "event_type": "click", "timestamp": time.time(), "context": {"request_id": answer["request_id"]}},
                    {"round": rounds})
                producer.send(self.settings.topic, b"{broken json", b"u1")
                item = f"i{rounds % 50}"  # the product service: a stock flip, and a record nobody can read
                producer.send(self.settings.items_topic, orjson.dumps({"item_id": item, "in_stock": rounds % 2 == 0}),
                              item.encode())
                producer.send(self.settings.items_topic, b"{broken json", b"i1")
                producer.flush()
                for path, params, status in (
                    ("/recommend", {"user_id": f"new-user-{rounds}", "k": 10}, 200),  # cold start
                    ("/similar/i1", {}, 200),
                    ("/similar/no-such-item", {}, 404),
                    ("/recommend", {"user_id": "u1", "k": 0}, 422),
                ):
                    got = http.get(path, params=params).status_code
                    if got != status:
                        self.failures.append(f"{path} {params}: {got}, expected {status}")
                try:
                    client.pull("no_such_table", ["x"])
                    self.failures.append("pulling a missing table succeeded")
                except ParamServerError:
                    pass
        publisher.close()

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def test_every_dashboard_target_is_valid_promql_with_an_expectation(prometheus_binary, tmp_path):
    queries = dashboard_queries()
    listed = set(expected("x"))
    assert {(q.panel, q.ref) for q in queries} == listed, "dashboard targets and EXPECTED differ"
    prometheus = Prometheus(prometheus_binary, tmp_path / "prometheus", {
        "streamrec-param-server": "127.0.0.1:1", "streamrec-trainer": "127.0.0.1:1",
        "streamrec-serving": "127.0.0.1:1", "streamrec-refit": "127.0.0.1:1",
        "streamrec-experiments-watch": "127.0.0.1:1", "streamrec-catalogue-follow": "127.0.0.1:1"})
    try:
        invalid = {}
        for q in queries:
            reply = prometheus.query(q.promql)
            if reply.status_code != 200:
                invalid[f"{q.panel} {q.ref}"] = reply.json().get("error")
        assert not invalid, invalid
    finally:
        prometheus.stop()


def shortfall(prometheus: Prometheus, q: Query, want: Expect) -> str | None:
    """Why `q` does not (yet) show what it must, or None."""
    reply = prometheus.query(q.promql)
    assert reply.status_code == 200, (q, reply.text)
    series = {q.legend_of(r["metric"]): float(r["value"][1]) for r in reply.json()["data"]["result"]}
    missing = sorted(want.legends - set(series))
    if missing:
        return f"missing {missing}, got {series}"
    if want.positive:
        flat = {legend: value for legend, value in series.items()
                if legend in want.legends and not (value > 0 and math.isfinite(value))}
        if flat:
            return f"not above zero: {flat}"
    return None


def wait_for_http(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer")


def scraped_value(url: str, name: str) -> float:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.TransportError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def wait_until(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.3)


def test_dashboard_panels_show_a_running_pipeline(prometheus_binary, settings: Settings, tmp_path):
    settings = settings.model_copy(update={"feature_prefix": f"prom{uuid.uuid4().hex[:8]}"})
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic, settings.impressions_topic],
                  settings.topic_partitions)
    experiments = tmp_path / "experiments.yaml"  # the experiments row: one arm for everyone, impressions logged
    experiments.write_text("experiments: [{name: all-users, arms: [{name: everyone}]}]\n")
    ports = {name: net.free_port() for name in ("param-server", "trainer", "serving", "refit", "experiments-watch",
                                                "catalogue-follow")}
    processes = Processes(tmp_path)
    env = pipeline_env(settings)
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    env.pop("STREAMREC_API_TOKEN", None)
    env.pop("STREAMREC_METRICS_PORT", None)
    prometheus = Prometheus(prometheus_binary, tmp_path / "prometheus", {
        "streamrec-param-server": f"127.0.0.1:{ports['param-server']}",
        "streamrec-trainer": f"127.0.0.1:{ports['trainer']}",
        "streamrec-serving": f"127.0.0.1:{ports['serving']}",
        "streamrec-refit": f"127.0.0.1:{ports['refit']}",
        "streamrec-experiments-watch": f"127.0.0.1:{ports['experiments-watch']}",
        "streamrec-catalogue-follow": f"127.0.0.1:{ports['catalogue-follow']}",
    })
    try:
        address = start_param_server(processes, "param-server", env, [
            "--port", "0", "--checkpoint-dir", str(tmp_path / "checkpoints"), "--checkpoint-every", "2",
            "--metrics-port", str(ports["param-server"])])["address"]
        env["STREAMREC_PARAM_SERVERS"] = address
        trainer_url = f"http://127.0.0.1:{ports['trainer']}/metrics"
        processes.start("trainer", [STREAMREC, "train-online", "--evaluate-every", "2",
                                    "--metrics-port", str(ports["trainer"])], env)
        log = tmp_path / "events.csv"
        log.write_text("user_id,item_id,timestamp,event_type\n" + "".join(
            f"{e['user_id']},{e['item_id']},{e['timestamp']},{e['event_type']}\n" for e in planted_events(EVENTS)))
        replayed = subprocess.run([STREAMREC, "replay", "--data", str(log), "--format", "csv", "--json"],
                                  check=False, env=env, capture_output=True, text=True, timeout=120)
        assert replayed.returncode == 0, replayed.stderr[-3000:]
        wait_until(lambda: scraped_value(trainer_url, "streamrec_trainer_events_consumed_total") >= EVENTS,
                   "the trainer did not consume the log")
        processes.start("refit", [STREAMREC, "refit", "--model", REFIT_MODEL, "--from", "topic", "--every", "3s"],
                        {**env, "STREAMREC_METRICS_PORT": str(ports["refit"])})
        processes.start("experiments-watch", [STREAMREC, "experiments", "watch", "--metrics-port",
                                              str(ports["experiments-watch"])], env)
        processes.start("catalogue-follow", [STREAMREC, "catalogue", "follow", "--metrics-port",
                                             str(ports["catalogue-follow"])], env)
        processes.start("serving", [STREAMREC, "serve", "--workers", "2", "--port", str(ports["serving"]),
                                    "--poll-interval", "0.5", "--experiments", str(experiments)], env)
        serving = f"http://127.0.0.1:{ports['serving']}"
        wait_for_http(serving + "/readyz")
        with Traffic(settings, serving, address) as traffic:
            want = expected(f"127.0.0.1:{ports['param-server']}")
            # A query that showed what it must at one evaluation is done: the panel showed it. (Rates
            # of the traffic above fall back to zero once RATE_INTERVAL has passed.)
            pending = {(q.panel, q.ref): q for q in dashboard_queries()}
            short: dict[str, str] = {}
            deadline = time.monotonic() + 240
            while pending and time.monotonic() < deadline:
                processes.check()
                short = {}
                for key, q in list(pending.items()):
                    why = shortfall(prometheus, q, want[key])
                    if why is None:
                        del pending[key]
                    else:
                        short[f"{q.panel} [{q.ref}] {q.promql}"] = why
                time.sleep(1)
            assert not pending, "\n".join(f"{query}: {why}" for query, why in short.items())
        assert not traffic.failures, traffic.failures[:10]
    finally:
        processes.stop_all()
        prometheus.stop()
        FeatureStore.from_url(settings.redis_url, FeatureStoreConfig(prefix=settings.feature_prefix)).clear()



def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_refit_loop_counts_failures_and_goes_on(settings: Settings, tmp_path):
    """A loop outlives a failed refit (here: nothing in the topic yet) and says so in its metrics;
    the first success sets the size and the time an alert watches."""
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 1)
    failed = sample("streamrec_refit_runs_total", model="item-knn", outcome="failed")
    ok = sample("streamrec_refit_runs_total", model="item-knn", outcome="ok")
    loop = refit_loop(settings, "item-knn", [], "topic", "csv", 0.01, tmp_path / "refits", do_publish=False)
    try:
        report = next(loop)
        assert "holds no valid events" in report["error"], report
        assert sample("streamrec_refit_runs_total", model="item-knn", outcome="failed") == failed + 1
        produce_events(settings, planted_events(500))
        report = next(loop)
        assert report["events"] == 500, report
    finally:
        loop.close()
    assert sample("streamrec_refit_runs_total", model="item-knn", outcome="ok") == ok + 1
    assert sample("streamrec_refit_input_rows", model="item-knn") == 500
    assert sample("streamrec_refit_duration_seconds_count", model="item-knn", stage="fit") >= 1
    assert time.time() - sample("streamrec_refit_last_success_timestamp_seconds", model="item-knn") < 600
