"""`streamrec demo`: the whole real-time pipeline on one machine, watched live.

Starts (and always stops) a parameter server, the online trainer and two serving workers as
processes, runs a refit loop (item kNN and ALS every N events, read back from the topic and
published to serving), replays a log at compressed speed, queries serving as users would, shows a
live display, and ends with a summary and plots. Every refit model is scored prequentially on the
events that arrive after it was fitted, exactly as the online trainer scores itself, so the plot
compares like with like.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from streamrec.app.processes import (
    STREAMREC,
    Processes,
    pipeline_env,
    read_json,
    start_param_server,
)
from streamrec.app.query_load import Queries
from streamrec.app.stack import remove_run_state
from streamrec.core import net
from streamrec.core.config import Settings
from streamrec.param_server.client import ParamClient
from streamrec.stream.events import EventBatch
from streamrec.stream.loaders import InteractionLog, load_log
from streamrec.stream.publish import EventPublisher
from streamrec.stream.reader import read_log
from streamrec.stream.replay import replay
from streamrec.stream.topics import create_topics
from streamrec.trainer.evaluation.prequential import PrequentialScorer, ScoreFn
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Recommender
from streamrec.trainer.online.base import ItemScores


@dataclass
class DemoOptions:
    data: Path
    fmt: str = "ml-100k"
    duration_s: float = 120.0  # replay the whole log in about this long (unless speed is given)
    speed: float | None = None
    poll_interval: float = 5.0
    refit_every: int | None = None  # events between refits; None: a quarter of the log, so refits get scored
    query_rate: float = 20.0
    out_dir: Path | None = None


def refit_scores(model: Recommender) -> ScoreFn:
    """A fitted batch model as the prequential scorer sees a model: user ids -> scores over its items."""
    items = pd.Index(model.items.ids, dtype=object)

    def score_users(user_ids: np.ndarray) -> ItemScores:
        return ItemScores(items, model.user_scores(model.users.index(user_ids)))

    return score_users


class StreamScorer:
    """Prequential scoring of the refit models on the replayed stream with the trainer's own
    computation (`PrequentialScorer`): every 10th event, before it counts as the user's history.

    A refit model scores the events after the last one it was trained on, however late it
    arrives: spans replayed after a refit started wait on the scorer's thread (never the replay)
    until that refit is published or given up, and a span is split where the model's training
    data ends. So a slow refit (a cold start on a loaded machine) is scored all the same, and
    no model scores an event it learned."""

    def __init__(self, log: InteractionLog, every: int = 10) -> None:
        self.stream = EventBatch.from_log(log)
        self.prequential = PrequentialScorer(every)
        self.ranges: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self.models: dict[str, ScoreFn] = {}  # name -> the newest refit model in use
        self.staged: list[tuple[int, str, ScoreFn]] = []  # (events it was trained on, name, model)
        self.refit_from: int | None = None  # replay position at which the refit in flight started
        self.points: dict[str, list[tuple[float, float, float]]] = defaultdict(list)  # (time, hit, ndcg)
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="scorer", daemon=True)
        self.thread.start()

    def refit_started(self, position: int) -> None:
        with self.lock:
            self.refit_from = position

    def publish_model(self, name: str, model: Recommender, trained_on: int) -> None:
        """`model` was fitted on the first `trained_on` events of the stream."""
        scores = refit_scores(model)
        with self.lock:
            self.staged.append((trained_on, name, scores))

    def refit_finished(self) -> None:
        with self.lock:
            self.refit_from = None
            self.lock.notify_all()

    def submit(self, start: int, stop: int) -> None:
        """Score events[start:stop] on the scorer's own thread (the replay keeps its pace)."""
        self.ranges.put((start, stop))

    def finish(self) -> None:
        self.ranges.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (span := self.ranges.get()) is not None:
            start, stop = span
            with self.lock:
                self.lock.wait_for(lambda start=start: self.refit_from is None or start < self.refit_from)
                due = sorted(entry for entry in self.staged if entry[0] < stop)
                self.staged = [entry for entry in self.staged if entry[0] >= stop]
            for trained_on, name, scores in due:
                if trained_on > start:
                    self.score_span(start, trained_on)
                    start = trained_on
                self.models[name] = scores
            self.score_span(start, stop)

    def score_span(self, start: int, stop: int) -> None:
        for name, evaluated in self.prequential.evaluate(self.stream.take(slice(start, stop)), self.models).items():
            self.points[name].extend(zip(evaluated.timestamp.tolist(), evaluated.hit.tolist(), evaluated.ndcg.tolist()))


@dataclass
class RefitLoop:
    """Refits item kNN and ALS every `every` replayed events from the topic and publishes them."""

    settings: Settings
    scorer: StreamScorer
    every: int
    until: int  # the log's length: a refit starting there would have no event left to be scored on
    durations: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    done: int = 0
    next_at: int = 0
    busy: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.next_at = self.every

    def maybe_start(self, replayed: int) -> None:
        if self.next_at <= replayed < self.until and self.busy.acquire(blocking=False):
            self.next_at = replayed + self.every
            self.scorer.refit_started(replayed)
            threading.Thread(target=self._refit, name="refit", daemon=True).start()

    def _refit(self) -> None:
        from streamrec.stream.events import EventSchema
        from streamrec.trainer.models import create
        from streamrec.trainer.refit import publish

        try:
            log, _, _ = read_log(self.settings.kafka_bootstrap, self.settings.topic, EventSchema.from_settings(self.settings))
            data = Interactions.from_log(log, implicit=True)  # both refit models rank from interactions
            with ParamClient.from_settings(self.settings) as client:
                for name, params in (("item-knn", {}), ("als", {})):
                    t0 = time.perf_counter()
                    model = create(name, **params).fit(data)
                    publish(client, model, self.done + 1)
                    self.durations[name].append(time.perf_counter() - t0)
                    self.scorer.publish_model(name, model, len(log))
            self.done += 1
        finally:
            self.scorer.refit_finished()
            self.busy.release()


def run_demo(settings: Settings, options: DemoOptions, display: Any) -> dict[str, Any]:
    """Everything the demo does; `display(status: dict)` is called about twice a second."""
    run = uuid.uuid4().hex[:8]
    out = options.out_dir or Path(settings.home) / "demo" / run
    out.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={
        "topic": f"streamrec.demo.{run}", "consumer_group": f"demo-{run}", "feature_prefix": f"demo{run}",
    })
    log = load_log(options.data, options.fmt)
    span = float(log.timestamp[-1] - log.timestamp[0]) or 1.0
    speed = options.speed if options.speed is not None else span / options.duration_s
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], settings.topic_partitions)

    processes = Processes(out)
    env = pipeline_env(settings)
    queries: Queries | None = None
    try:
        ps_metrics, trainer_metrics, serving_port = net.free_port(), net.free_port(), net.free_port()
        ps_address = start_param_server(processes, "param-server", env, [
            "--port", "0", "--checkpoint-dir", str(out / "checkpoints"), "--metrics-port", str(ps_metrics)])["address"]
        env["STREAMREC_PARAM_SERVERS"] = ps_address
        settings = settings.model_copy(update={"param_servers": [ps_address]})
        report_path = out / "trainer.json"
        processes.start("trainer", [STREAMREC, "train-online", "--report", str(report_path),
                                    "--metrics-port", str(trainer_metrics)], env)
        # the serving console shows the whole pipeline: it reads the other processes' /metrics
        sources = {"trainer": trainer_metrics, "param_server": ps_metrics}
        serving_env = {**env, "STREAMREC_METRICS_SOURCES": ",".join(
            f"{name}=http://127.0.0.1:{port}/metrics" for name, port in sources.items())}
        processes.start("serving", [STREAMREC, "serve", "--workers", "2", "--port", str(serving_port),
                                    "--poll-interval", str(options.poll_interval)], serving_env)
        url = f"http://127.0.0.1:{serving_port}"
        scorer = StreamScorer(log)
        refits = RefitLoop(settings, scorer, options.refit_every or max(1_000, len(log) // 4), len(log))
        queries = Queries(url, options.query_rate, np.unique(log.user_id))
        queries.thread.start()
        publisher = EventPublisher.from_settings(settings, "demo")
        replayed = 0
        started = time.monotonic()
        last_draw = 0.0

        def progress(n: int) -> None:
            nonlocal replayed, last_draw
            scorer.submit(replayed, replayed + n)
            replayed += n
            refits.maybe_start(replayed)
            if time.monotonic() - last_draw > 0.5:
                last_draw = time.monotonic()
                processes.check()
                display(_status(replayed, len(log), started, report_path, ps_address, queries, refits))

        result = replay(log, publisher, speed, progress=progress, chunk=500)
        publisher.close()
        # drain: wait until the trainer has learned everything that was produced
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            report = read_json(report_path)
            if report and report["consumed"] >= result.produced:
                break
            display(_status(replayed, len(log), started, report_path, ps_address, queries, refits))
            time.sleep(0.5)
        _await_serving_answer(queries, options.poll_interval + 1, processes)
        queries.stop.set()
        queries.thread.join()
        while refits.busy.locked():
            time.sleep(0.2)
        scorer.finish()
    finally:
        if queries is not None:
            queries.stop.set()
        processes.stop_all()
        remove_run_state(settings)  # what the run wrote is in `out`; its topics and keys are not needed
    report = read_json(report_path) or {}
    plots = _plots(out, report, scorer, queries)
    prequential = report.get("prequential") or {}
    latencies = [ms for _, ms in queries.latencies]
    return {
        "events": result.produced, "dead_lettered": result.dead_lettered,
        "events_per_second": round(result.produced / result.seconds, 1) if result.seconds else None,
        "replay_seconds": round(result.seconds, 1), "speed": speed,
        "trainer": {"consumed": report.get("consumed"), "events_per_second": report.get("events_per_second")},
        "prequential": {"hr@10": prequential.get("hr@10"), "ndcg@10": prequential.get("ndcg@10"),
                        "rmse": prequential.get("rmse"),
                        "refit_models": {name: {"hr@10": float(np.mean([p[1] for p in points])),
                                                "ndcg@10": float(np.mean([p[2] for p in points])),
                                                "evaluated": len(points)}
                                         for name, points in scorer.points.items() if points}},
        "serving": {"requests": len(latencies), "p50_ms": _pct(latencies, 50), "p99_ms": _pct(latencies, 99),
                    "staleness_seconds": queries.staleness, "before_first_model": len(queries.unavailable)},
        "serving_errors": queries.errors, "last_serving_error": queries.last_error,
        "refits": {name: {"count": len(d), "mean_seconds": float(np.mean(d))} for name, d in refits.durations.items()},
        "plots": plots, "logs": str(out),
    }


def _await_serving_answer(queries: Queries, settle_s: float, processes: Processes, patience_s: float = 90.0) -> None:
    """One more poll so serving holds the final model, then until serving has answered a query
    after it. On a loaded machine the workers can still be starting (answering 503, which is no
    error) when a short replay ends; stopping the queries then would report a pipeline whose
    serving nobody ever heard from. Bounded: a serving that never answers is reported as it is."""
    time.sleep(settle_s)
    settled = time.monotonic()
    deadline = settled + patience_s
    while time.monotonic() < deadline and not (queries.latencies and queries.latencies[-1][0] >= settled):
        processes.check()
        time.sleep(0.2)


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fixed(value: float | None, digits: int, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def status_rows(status: dict[str, Any]) -> list[tuple[str, str]]:
    """The live display as (label, text) rows: every count with thousands separators, rates and
    times rounded, `-` for what is not known yet."""
    rows = status.get("ps_rows") or {}
    return [
        ("replayed", f"{_count(status['replayed'])} / {_count(status['total'])} events"),
        ("replay rate", _fixed(status["events_per_second"], 0, " events/s")),
        ("trainer consumed", _count(status.get("trainer_consumed"))),
        ("consumer lag", _count(status.get("lag"))),
        ("prequential hr@10 (last 1,000)", _fixed(status.get("hr@10"), 3)),
        ("parameter-server rows", ", ".join(f"{name} {_count(n)}" for name, n in rows.items()) or "-"),
        ("serving p99 (last 200)", _fixed(status.get("serving_p99_ms"), 1, " ms")),
        ("serving requests / errors", f"{_count(status['serving_requests'])} / {_count(status['serving_errors'])}"),
        ("serving staleness", _fixed(status.get("staleness_s"), 1, " s")),
        ("refits", _count(status.get("refits"))),
        ("web console", status.get("console") or "-"),
    ]


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The end-of-run summary (`run_demo`'s dict) as (label, text) rows a person reads as a
    report: rounded figures with units, the online model beside the refits, where plots and logs are."""
    prequential, serving = summary["prequential"], summary["serving"]
    refits = prequential.get("refit_models") or {}

    def side_by_side(metric: str) -> str:
        cells = [f"online {_fixed(prequential.get(metric), 3)}"]
        cells += [f"{name} (refit) {_fixed(scores.get(metric), 3)}" for name, scores in refits.items()]
        if not refits:
            cells.append("refits: none scored (no events arrived after the first refit; lower --refit-every)")
        return "  |  ".join(cells)

    trainer = summary.get("trainer") or {}
    errors = summary.get("serving_errors") or 0
    replay = (f"{_fixed(summary['replay_seconds'], 1, ' s')} at {_fixed(summary['events_per_second'], 0)} events/s "
              f"(event time x{_count(summary['speed'])})")
    consumed = f"{_count(trainer.get('consumed'))} consumed, {_fixed(trainer.get('events_per_second'), 0, ' events/s')}"
    latency = (f"p50 {_fixed(serving.get('p50_ms'), 1, ' ms')}, p99 {_fixed(serving.get('p99_ms'), 1, ' ms')} "
               f"over {_count(serving.get('requests'))} requests")
    refit_runs = ", ".join(f"{name} {_count(r['count'])}x, {_fixed(r['mean_seconds'], 1, ' s')} each"
                           for name, r in (summary.get("refits") or {}).items())
    rows = [
        ("events", f"{_count(summary['events'])} replayed, {_count(summary['dead_lettered'])} dead-lettered"),
        ("replay", replay),
        ("online trainer", consumed),
        ("hr@10 (prequential)", side_by_side("hr@10")),
        ("ndcg@10 (prequential)", side_by_side("ndcg@10")),
        ("serving latency", latency),
        ("serving errors", _count(errors) + (f" (last: {summary['last_serving_error']})" if errors else "")),
        ("serving staleness", _fixed(serving.get("staleness_seconds"), 1, " s")),
        ("refits", refit_runs or "-"),
    ]
    rows += [("plot", path) for path in summary.get("plots") or []]
    rows.append(("logs", str(summary["logs"])))
    return rows


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _status(replayed: int, total: int, started: float, report_path: Path, ps_address: str, queries: Queries,
            refits: RefitLoop) -> dict[str, Any]:
    report = read_json(report_path) or {}
    rows = None
    try:
        with ParamClient([ps_address], timeout=1.0) as client:
            rows = {name: info["rows"] for name, info in client.tables().items()}
    except (OSError, RuntimeError):
        pass
    elapsed = time.monotonic() - started
    return {
        "replayed": replayed, "total": total, "events_per_second": replayed / elapsed if elapsed else 0.0,
        "trainer_consumed": report.get("consumed"), "lag": report.get("lag"),
        "hr@10": (report.get("prequential") or {}).get("windows", {}).get("1000", {}).get("hr@10"),
        "ps_rows": rows, "serving_p99_ms": queries.percentile(99, last=200), "serving_requests": len(queries.latencies),
        "serving_errors": queries.errors, "last_serving_error": queries.last_error, "staleness_s": queries.staleness, "refits": refits.done,
        "console": f"{queries.url}/ui/",
    }


def _plots(out: Path, report: dict[str, Any], scorer: StreamScorer, queries: Queries | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = (report.get("prequential") or {}).get("series") or []
    if series:
        ax.plot([np.datetime64(int(p["event_time"]), "s") for p in series], [p["hr@10"] for p in series],
                label="online BPR (live trainer)", linewidth=2)
    for name, points in scorer.points.items():
        if len(points) >= 50:
            times, hits = np.array([p[0] for p in points]), np.array([p[1] for p in points])
            window = 500
            rolling = np.convolve(hits, np.ones(window) / window, mode="valid") if len(hits) >= window else hits
            ax.plot(times[len(times) - len(rolling):].astype("datetime64[s]"), rolling, label=f"{name} (refit)")
    ax.set_title("prequential hr@10 over event time (500 evaluated events per point)")
    ax.set_ylabel("hr@10")
    ax.legend()
    fig.autofmt_xdate()
    path = out / "prequential_hr10.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(str(path))
    if queries is not None and queries.latencies:
        fig, ax = plt.subplots(figsize=(9, 4))
        t0 = queries.latencies[0][0]
        ax.scatter([t - t0 for t, _ in queries.latencies], [ms for _, ms in queries.latencies], s=4, alpha=0.5)
        ax.set_xlabel("seconds since the first request")
        ax.set_ylabel("/recommend latency (ms)")
        ax.set_yscale("log")
        ax.set_title(f"serving latency: p50 {_pct([m for _, m in queries.latencies], 50)} ms, "
                     f"p99 {_pct([m for _, m in queries.latencies], 99)} ms")
        path = out / "serving_latency.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(path))
    return paths
