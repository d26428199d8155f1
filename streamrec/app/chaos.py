"""`streamrec chaos`: the whole pipeline under seeded faults, and proof that no event was lost or
counted twice.

A run replays a log at a steady rate into a fresh topic while two trainers (one consumer group),
checkpointing parameter-server shards, a two-worker `streamrec serve` under query load and the
run's own Redis process it. Faults strike at seeded moments of the replay (`chaos_plan`); each is
timed until the pipeline recovers (`chaos_monitor`), and the stores are audited just before every
fault and after the drain (`chaos_audit`). The same replay then runs again without faults (the
clean run), so the live prequential hr@10 under faults can be compared with an undisturbed one.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.app.chaos_audit import (
    NO_DIFFERENCE,
    AuditPoint,
    CountDiff,
    TopicIndex,
    audit_point,
    compare_counts,
    compare_shards,
    item_counts,
    snapshot_feature_store,
    snapshot_param_server,
)
from streamrec.app.chaos_cluster import Cluster, ClusterShape
from streamrec.app.chaos_monitor import Sampler, caught_up, first_progress, moving_again
from streamrec.app.chaos_plan import (
    DEFAULT_FAULTS,
    FaultKind,
    PlannedFault,
    plan_faults,
)
from streamrec.app.processes import read_json
from streamrec.app.query_load import Queries
from streamrec.core.config import Settings
from streamrec.core.progress import progress_bar, stderr_console
from streamrec.param_server.client import ParamClient
from streamrec.stream.loaders import InteractionLog, load_log
from streamrec.stream.publish import EventPublisher
from streamrec.stream.replay import ReplayResult, replay
from streamrec.stream.topics import end_offsets, offset_key, partitions_of
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

# Fast group membership (as the tests use): a killed trainer's partitions move after 2 s, not 6.
SESSION_TIMEOUT_MS, HEARTBEAT_INTERVAL_MS = 2000, 500
IN_FLIGHT_SLACK_S = 0.1  # a request sent this soon after a kill may still reach the dying worker's socket


@dataclass
class ChaosOptions:
    data: Path
    fmt: str = "ml-100k"
    seed: int = 0
    events: int | None = None  # replay only the first N events of the log
    rate: float = 500.0  # events per second, on average (the replay keeps the log's event-time shape)
    shape: ClusterShape = field(default_factory=ClusterShape)
    partitions: int = 4
    query_rate: float = 20.0
    redis_outage_s: float = 2.0
    drain_timeout_s: float = 300.0
    clean_run: bool = True
    faults: dict[FaultKind, int] = field(default_factory=lambda: dict(DEFAULT_FAULTS))
    out_dir: Path | None = None


@dataclass
class FaultRecord:
    planned: PlannedFault
    at_event: int  # events produced when it struck
    at: float  # time.monotonic() of the fault
    target: str
    detail: dict[str, Any] = field(default_factory=dict)
    recovery_seconds: float | None = None
    caught_up_seconds: float | None = None

    def to_json(self, replay_started: float) -> dict[str, Any]:
        return {"kind": str(self.planned.kind), "target": self.target, "planned_at_event": self.planned.at_event,
                "at_event": self.at_event, "at_seconds": round(self.at - replay_started, 2),
                "recovery_seconds": self.recovery_seconds, "caught_up_seconds": self.caught_up_seconds, **self.detail}


@dataclass
class PipelineRun:
    """What one run of the pipeline leaves behind for the report."""

    result: ReplayResult
    replay_started: float
    drained: bool
    drain_seconds: float
    applied_events: int | None
    faults: list[FaultRecord]
    points: list[AuditPoint]  # before each fault, then after the drain
    index: TopicIndex
    reports: list[dict[str, Any]]  # the final report of every trainer incarnation
    queries: Queries
    revived_trainers: int
    logs: Path
    serving_warm_at: float | None = None  # every serving worker had a model (None: not seen; faults only)


def speed_for_rate(log: InteractionLog, rate: float) -> float:
    """The replay speed (event-time seconds per wall second) that sends `rate` events/s on average."""
    span = float(log.timestamp[-1] - log.timestamp[0]) if len(log) else 0.0
    return span * rate / len(log) if span > 0 and rate > 0 else 0.0


def run_chaos(settings: Settings, options: ChaosOptions) -> dict[str, Any]:
    log = load_log(options.data, options.fmt)
    if options.events is not None:
        log = log.take(slice(0, options.events))
    base = options.out_dir or Path(settings.home) / "chaos" / uuid.uuid4().hex[:8]
    plan = plan_faults(np.random.default_rng(options.seed), len(log), options.faults)
    stderr_console.print(f"[bold]chaos[/] {len(log):,} events at {options.rate:g}/s, {len(plan)} faults; logs in {base}")
    faulty = run_pipeline(settings, log, options, plan, base / "faults")
    clean = run_pipeline(settings, log, options, [], base / "clean") if options.clean_run else None
    return chaos_report(log, options, faulty, clean)


def run_pipeline(settings: Settings, log: InteractionLog, options: ChaosOptions, plan: list[PlannedFault],
                 out: Path) -> PipelineRun:
    """One replay through a fresh pipeline (topic, group, Redis, shards, trainers, serving)."""
    run = uuid.uuid4().hex[:8]
    out.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={
        "topic": f"streamrec.chaos.{run}", "consumer_group": f"chaos-{run}", "feature_prefix": f"chaos{run}",
        "topic_partitions": max(2, options.partitions), "home": out,
        "session_timeout_ms": SESSION_TIMEOUT_MS, "heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
    })
    cluster = Cluster(settings, out, options.shape)
    sampler: Sampler | None = None
    queries: Queries | None = None
    warm_at: float | None = None
    try:
        settings = cluster.start()
        sampler = Sampler(settings.param_servers, settings.redis_url, settings.feature_prefix)
        sampler.thread.start()
        queries = Queries(cluster.serving_url, options.query_rate, np.unique(log.user_id), seed=options.seed)
        queries.thread.start()
        publisher = EventPublisher.from_settings(settings, "chaos")
        produced = [0]
        label = "replay (faults)" if plan else "replay (clean)"
        with progress_bar(label, len(log)) as advance, ThreadPoolExecutor(1, "chaos-replay") as pool:
            def progress(n: int) -> None:
                produced[0] += n
                advance(n)

            replay_started = time.monotonic()
            replaying = pool.submit(replay, log, publisher, speed_for_rate(log, options.rate), None, progress, 100)
            if plan:
                warm_at = wait_until_warm(cluster, sampler, queries, replaying)
            faults, points = inject_faults(cluster, settings, plan, produced, replaying, options)
            result = replaying.result()
        publisher.close()
        drain_started = time.monotonic()
        drained = drain(cluster, settings, options.drain_timeout_s)
        drain_seconds = time.monotonic() - drain_started
        points.append(audit_now(settings))
        with ParamClient(settings.param_servers, timeout=10.0) as client:
            applied = client.applied_events()
        queries.stop.set()
        queries.thread.join()
        sampler.stop.set()
        sampler.thread.join()
        time_recoveries(faults, sampler)
    finally:
        if queries is not None:
            queries.stop.set()
        if sampler is not None:
            sampler.stop.set()
        cluster.stop()
    reports = [report for path in cluster.reports if (report := read_json(path)) is not None]
    return PipelineRun(result, replay_started, drained, drain_seconds, applied, faults, points,
                       TopicIndex.read(settings), reports, queries, cluster.revived, out, warm_at)


def audit_now(settings: Settings) -> AuditPoint:
    features = FeatureStore.from_url(settings.redis_url, FeatureStoreConfig.from_settings(settings))
    try:
        with ParamClient(settings.param_servers, timeout=5.0, retries=1) as client:
            return AuditPoint(snapshot_param_server(client), snapshot_feature_store(features))
    finally:
        features.redis.close()


def wait_until_warm(cluster: Cluster, sampler: Sampler, queries: Queries, replaying: Future,
                    timeout_s: float = 180.0) -> float | None:
    """Faults strike a running pipeline, not one still starting: wait until the parameter server
    has applied events and every serving worker has a model (a fault planned earlier strikes then).
    Returns the time the last worker had one: the end of serving's warm-up, None if not seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not replaying.done():
        if queries.latencies and any(s.applied for s in sampler.samples[-1:]):
            return cluster.wait_every_worker_ready()
        time.sleep(0.1)
        cluster.revive_trainers()
    return None


def inject_faults(cluster: Cluster, settings: Settings, plan: list[PlannedFault], produced: list[int],
                  replaying: Future, options: ChaosOptions) -> tuple[list[FaultRecord], list[AuditPoint]]:
    """Strike each planned fault once the replay has produced its event; audit just before each."""
    records: list[FaultRecord] = []
    points: list[AuditPoint] = []
    for number, fault in enumerate(plan, 1):
        while produced[0] < fault.at_event and not replaying.done():
            time.sleep(0.05)
            cluster.revive_trainers()
        if replaying.done():
            replaying.result()  # a failed replay raises here
        points.append(audit_now(settings))
        record = strike(cluster, fault, produced[0], options)
        records.append(record)
        stderr_console.print(f"fault {number}/{len(plan)} {fault.kind} ({record.target}) at event {record.at_event:,}")
    while not replaying.done():
        time.sleep(0.2)
        cluster.revive_trainers()
    return records, points


def strike(cluster: Cluster, fault: PlannedFault, at_event: int, options: ChaosOptions) -> FaultRecord:
    shape = cluster.shape
    if fault.kind is FaultKind.TRAINER_KILL:
        slot = fault.target % shape.trainers
        cluster.kill_trainer(slot)
        return FaultRecord(fault, at_event, time.monotonic(), f"trainer-{slot}")
    if fault.kind in (FaultKind.PARAM_SERVER_KILL, FaultKind.PARAM_SERVER_WIPE):
        shard = fault.target % shape.shards
        cluster.kill_shard(shard, wipe=fault.kind is FaultKind.PARAM_SERVER_WIPE)
        at = time.monotonic()
        ready = cluster.restart_shard(shard)
        return FaultRecord(fault, at_event, at, f"param-server-{shard}",
                           {"restart_seconds": round(time.monotonic() - at, 3), "restored": ready.get("restored"),
                            "started_empty": ready.get("empty")})
    if fault.kind is FaultKind.REDIS_RESTART:
        cluster.stop_redis()
        at = time.monotonic()
        time.sleep(options.redis_outage_s)
        cluster.start_redis_again()
        return FaultRecord(fault, at_event, at, f"redis:{cluster.redis.port}",
                           {"outage_seconds": round(time.monotonic() - at, 3)})
    killed_at, serving = cluster.kill_serving_worker(fault.target)
    return FaultRecord(fault, at_event, killed_at, f"serving worker {serving.victim}",
                       {"replaced_by": serving.replaced_by, "serve_restarted": serving.serve_restarted,
                        "replacement_ready_seconds": serving.recovery_seconds})


def time_recoveries(faults: list[FaultRecord], sampler: Sampler) -> None:
    """Recovery of each fault from the sampled stores (serving's was measured when it struck)."""
    samples = sampler.samples
    for record in faults:
        kind = record.planned.kind
        if kind is FaultKind.TRAINER_KILL:
            record.recovery_seconds = _round(moving_again(samples, record.at))
            record.caught_up_seconds = record.recovery_seconds
        elif kind in (FaultKind.PARAM_SERVER_KILL, FaultKind.PARAM_SERVER_WIPE):
            record.recovery_seconds = _round(first_progress(samples, record.at))
            record.caught_up_seconds = _round(caught_up(samples, record.at, "param_server"))
        elif kind is FaultKind.REDIS_RESTART:
            record.recovery_seconds = _round(moving_again(samples, record.at, "feature_store"))
            record.caught_up_seconds = _round(caught_up(samples, record.at, "feature_store"))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def drain(cluster: Cluster, settings: Settings, timeout_s: float) -> bool:
    """Wait until every shard and the feature store hold every partition up to its end offset (the
    trainers are idle), twice in a row a second apart; False after `timeout_s`."""
    ends = {offset_key(settings.topic, p): end for p, (_, end) in
            end_offsets(settings.kafka_bootstrap, settings.topic, partitions_of(settings.kafka_bootstrap, settings.topic)).items()
            if end > 0}
    features = FeatureStore.from_url(settings.redis_url, FeatureStoreConfig.from_settings(settings))
    deadline, streak = time.monotonic() + timeout_s, 0
    try:
        with ParamClient(settings.param_servers, timeout=5.0, retries=1) as client:
            while time.monotonic() < deadline:
                cluster.revive_trainers()
                done = _at_ends(client.watermarks(), features.watermarks(), ends)
                streak = streak + 1 if done else 0
                if streak == 2:
                    return True
                time.sleep(1.0)
    finally:
        features.redis.close()
    return False


def _at_ends(param_server: list[dict[str, int]], feature_store: dict[str, int], ends: dict[str, int]) -> bool:
    stores = [*param_server, feature_store]
    return all(store.get(key) == end for store in stores for key, end in ends.items())


# ---- the report ---------------------------------------------------------------------------------
def prequential(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """hr@10 over every event any trainer incarnation scored (each report's figure weighted by
    its evaluated events; an event re-learned after a crash is scored again)."""
    evaluated = sum((r.get("prequential") or {}).get("evaluated", 0) for r in reports)
    hits = sum(((r.get("prequential") or {}).get("hr@10") or 0.0) * (r.get("prequential") or {}).get("evaluated", 0)
               for r in reports)
    return {"hr@10": round(hits / evaluated, 4) if evaluated else None, "evaluated": evaluated,
            "trainer_reports": len(reports)}


def serving_summary(queries: Queries, faults: list[FaultRecord], warm_at: float | None) -> dict[str, Any]:
    """Requests and failures; a failure is in flight on a killed worker when it got no HTTP answer
    and was under way when a worker was killed. 503s before every worker had a model (`warm_at`; the
    first answer when that was not seen) are warm-up: a worker that has not yet polled the first
    model answers 503 while a sibling already serves it."""
    kills = [f for f in faults if f.planned.kind is FaultKind.SERVING_WORKER_KILL]
    first_answer = queries.latencies[0][0] if queries.latencies else float("inf")
    warm = max(first_answer, warm_at) if warm_at is not None else first_answer
    late = [(t, detail) for t, detail in queries.unavailable if t > warm]
    late_503 = [detail for _, detail in late]
    late_note = (f"HTTP 503 after serving was ready ({len(late_503)}x): {sorted(set(late_503))[:3]}, "
                 f"{sorted({_after_fault(t, faults) for t, _ in late})[:5]}")

    def in_flight(failure: Any) -> bool:
        return failure.transport and any(
            failure.started <= k.at + IN_FLIGHT_SLACK_S and failure.ended >= k.at for k in kills)

    flight = [f for f in queries.failures if in_flight(f)]
    other = [f for f in queries.failures if not in_flight(f)]
    first_answers = []
    for k in kills:  # serving has recovered when a request is answered again (the definition)
        after = [t for t, _ in queries.latencies if t > k.at]
        k.recovery_seconds = round(after[0] - k.at, 3) if after else None
        first_answers.append(k.recovery_seconds)
    return {
        "requests": len(queries.latencies) + len(queries.failures) + len(queries.unavailable),
        "answered": len(queries.latencies),
        "failures": len(queries.failures) + len(late_503),
        "failures_in_flight_on_killed_worker": len(flight),
        "other_failures": [f.error for f in other][:10] + [late_note] * bool(late_503),
        "warm_up_503": len(queries.unavailable) - len(late_503),
        "first_answer_after_kill_seconds": first_answers,
        "p99_ms": queries.percentile(99),
    }


def _after_fault(at: float, faults: list[FaultRecord]) -> str:
    """'1.3 s after serving_worker_kill': where a failure sits in the schedule, for the report."""
    before = [f for f in faults if f.at <= at]
    if not before:
        return "before any fault"
    last = max(before, key=lambda f: f.at)
    return f"{at - last.at:.1f} s after {last.planned.kind}"


def store_totals(run: PipelineRun, expected: Any) -> dict[str, Any]:
    """Each store's final per-item counts against the file's."""
    final = run.points[-1]
    shards = final.param_server
    ps = None
    if shards is not None and all(s is not None for s in shards):
        per_shard = compare_shards(expected, [s.counts for s in shards])
        ps = {**sum(per_shard, NO_DIFFERENCE).to_json(), "shards": [d.to_json() for d in per_shard]}
    fs = None if final.feature_store is None else compare_counts(expected, final.feature_store.counts).to_json()
    return {"param_server": ps, "feature_store": fs}


def attribute(run: PipelineRun) -> tuple[dict[str, dict[str, CountDiff]], list[dict[str, Any]]]:
    """Per fault kind and store: the growth of the store's mismatch between the audit just before
    a fault and the one just before the next (or after the drain). When an audit is missing (a
    store did not answer consistently) the growth over the longer interval is unattributed."""
    kinds: dict[str, dict[str, CountDiff]] = defaultdict(lambda: {"param_server": NO_DIFFERENCE,
                                                                "feature_store": NO_DIFFERENCE})
    unattributed: list[dict[str, Any]] = []
    mismatches = [audit_point(point, run.index) for point in run.points]
    for store in ("param_server", "feature_store"):
        known = [(i, m[store]) for i, m in enumerate(mismatches) if m[store] is not None]
        for (i, before), (j, after) in zip(known, known[1:]):
            growth = CountDiff(max(0, after.lost - before.lost), max(0, after.duplicated - before.duplicated),
                               max(0, after.items_short - before.items_short), max(0, after.items_over - before.items_over))
            if j == i + 1:
                kinds[str(run.faults[i].planned.kind)][store] += growth
            elif growth != NO_DIFFERENCE:
                unattributed.append({"store": store, "faults": [str(f.planned.kind) for f in run.faults[i:j]],
                                     **growth.to_json()})
        if known and known[0][0] == 0 and known[0][1] != NO_DIFFERENCE:
            unattributed.append({"store": store, "faults": [], "before_any_fault": True, **known[0][1].to_json()})
    return kinds, unattributed


def per_kind(run: PipelineRun, options: ChaosOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    attributed, unattributed = attribute(run)
    kinds: dict[str, Any] = {}
    for kind in options.faults:
        records = [f for f in run.faults if f.planned.kind is kind]
        stores = attributed.get(str(kind), {"param_server": NO_DIFFERENCE, "feature_store": NO_DIFFERENCE})
        kinds[str(kind)] = {
            "kills": len(records),
            "lost_events": sum(d.lost for d in stores.values()),
            "duplicated_events": sum(d.duplicated for d in stores.values()),
            "by_store": {store: {"lost_events": d.lost, "duplicated_events": d.duplicated} for store, d in stores.items()},
            "recovery_seconds": [f.recovery_seconds for f in records],
            "caught_up_seconds": [f.caught_up_seconds for f in records],
        }
    return kinds, unattributed


def run_summary(run: PipelineRun, expected: Any) -> dict[str, Any]:
    return {
        "produced_events": run.result.produced, "dead_lettered": run.result.dead_lettered,
        "applied_events": run.applied_events, "drained": run.drained, "drain_seconds": round(run.drain_seconds, 1),
        "replay_seconds": round(run.result.seconds, 1), "trainer_restarts_unplanned": run.revived_trainers,
        "broker": compare_counts(expected, item_counts(run.index.items).to_dict()).to_json(),
        **store_totals(run, expected), "prequential": prequential(run.reports), "logs": str(run.logs),
    }


def chaos_report(log: InteractionLog, options: ChaosOptions, faulty: PipelineRun, clean: PipelineRun | None) -> dict[str, Any]:
    expected = item_counts(log.item_id)  # the direct count from the file
    serving = serving_summary(faulty.queries, faulty.faults, faulty.serving_warm_at)  # sets the serving faults' recovery times
    kinds, unattributed = per_kind(faulty, options)
    summary = run_summary(faulty, expected)
    live, clean_summary = summary["prequential"], None if clean is None else run_summary(clean, expected)
    clean_hr = None if clean_summary is None else clean_summary["prequential"]["hr@10"]
    return {
        "data": str(options.data), "events": len(log), "seed": options.seed, "rate": options.rate,
        "trainers": options.shape.trainers, "shards": options.shape.shards, "partitions": max(2, options.partitions),
        "faults": kinds,
        "attribution": ("per fault: growth of each store's per-item mismatch between the audits just before it and "
                        "just before the next fault (or after the drain); totals below compare the final counts "
                        "with the file"),
        "unattributed": unattributed,
        **{key: summary[key] for key in ("produced_events", "applied_events", "drained", "drain_seconds",
                                         "replay_seconds", "trainer_restarts_unplanned", "broker",
                                         "param_server", "feature_store")},
        "serving": serving,
        "prequential": {"hr@10": live["hr@10"], "evaluated": live["evaluated"], "clean_hr@10": clean_hr,
                        "clean_evaluated": None if clean_summary is None else clean_summary["prequential"]["evaluated"],
                        "difference": None if clean_hr is None or live["hr@10"] is None
                        else round(live["hr@10"] - clean_hr, 4)},
        "clean_run": clean_summary,
        "timeline": [f.to_json(faulty.replay_started) for f in faulty.faults],
        "logs": str(faulty.logs.parent),
    }
