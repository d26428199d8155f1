"""`streamrec simulate`: arms of an experiment compared end to end, through the real path.

A private stack (broker topic, parameter server, online trainer, one serving worker) serves an
experiments file with one experiment, `simulate`, whose arms split users equally. The log is
replayed in time order in chunks of `chunk_events`. Before a chunk is produced, every user who
appears in it asks serving for `k` items, and the answer is a hit when it holds the item of the
user's first event in the chunk: what the user actually consumed next. Serving decides each
user's arm itself, by its sticky hash, exactly as in production.

Results must not depend on timing. The trainer takes exactly one chunk per batch (its batch size
is the chunk's, its batch wait unbounded in practice), so the model after each chunk is the same in
every run; and before each chunk's queries a barrier waits until
1. the trainer has committed every event produced so far (it commits after its pushes to the
   parameter server and its writes to Redis: the model, the histories and the trending list
   include the whole prefix), and
2. the serving worker's last poll reached the parameter server's version at that moment
   (`/readyz` `synced_version`), with the trending list read afresh for each request.
Serving waits as long as the barrier for a user's row and history (`--user-pull-timeout`,
`--redis-timeout`), and a run in which any answer was served degraded anyway is refused: on a
busy machine a 0.1 s timeout served a few users as unknown, which moved hit@10 by 4 hits in 8,115.
At the end the simulator reads serving's own per-arm request counters and refuses to report when
they differ from its count of queries, so a simulation cannot pass by scoring anything locally.
Intervals and lifts are those of `streamrec experiments report` (a bootstrap over users), the hit
rate named after the k asked for (`hit@{k}`, with `k` beside it).

The first chunk is asked nothing (there is no model before it), so a log of one chunk or less can
give no query: it is refused before any process starts. Serving listens only once it has a model
(or after its first-poll wait), so every read of its /readyz or /metrics first waits until it
answers.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from kafka.admin import KafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from streamrec.app.stack import Stack, StackOptions, running_stack
from streamrec.core.config import Settings
from streamrec.core.progress import progress_bar
from streamrec.param_server.artifacts import CATALOGUE_BLOB, encode_catalogue
from streamrec.param_server.client import ParamClient
from streamrec.serving.experiment_report import (
    bootstrap_ratio,
    experiment_report,
    interval95,
)
from streamrec.stream.catalogue import ItemCatalogue, read_catalogue
from streamrec.stream.events import iter_events
from streamrec.stream.loaders import InteractionLog, id_strings
from streamrec.stream.publish import EventPublisher
from streamrec.stream.topics import admin_client, group_committed
from streamrec.trainer.content_tower import refresh_content_tower
from streamrec.trainer.content_tower_cli import mark_fresh
from streamrec.trainer.online.exploration import ExplorationStore

EXPERIMENT = "simulate"
ARM_SPECS = {  # what each arm name serves (arms that serve other tables or rankers are not there yet)
    "online-bpr": "{name: online-bpr}",
    "popularity": "{name: popularity, source: popularity}",
}
COUNTER = "streamrec_serving_experiment_requests"
BATCH_WAIT_S = 3600.0  # the trainer waits for a whole chunk (a chunk's records may arrive in several fetches)
IMPRESSIONS_FLUSH_S = 0.005  # serving's impression sends: the impressions barrier waits for them every chunk
EXPLORE_REFRESH_S = 0.005  # serving's reads of the exploration counts: the exploration barrier waits for one
ONLINE_ITEM_TABLE = "bpr_items"  # online-bpr's items, which serving indexes and the content tower seeds


@dataclass(frozen=True)
class SimulateOptions:
    arms: tuple[str, ...] = ("online-bpr", "popularity")
    chunk_events: int = 10  # the trainer's learning step and the prequential protocol's granularity
    k: int = 10
    limit: int | None = None  # events of the log to replay (None: all)
    barrier_timeout_s: float = 300.0
    seed: int = 0  # the bootstrap's
    impression_negatives: int = 0  # online-bpr's negatives per positive taken from what serving showed
    cold_items: float = 0.0  # share of the items withheld until the middle of the replay (new items)
    catalogue: Path | None = None  # item metadata (u.item, CSV, JSON lines): published, the new items at the middle
    content_tower: bool = False  # at the middle, fit the content tower and seed the new items' rows from it
    explore: float = 0.0  # the online-bpr arm's share of exploration slots (the trainer counts for them)
    # replays of each configuration, the online learner seeded 0 .. n-1: which negatives it draws
    # decides its trajectory, and one trajectory's hit@k is one draw (docs/serving.md)
    trainer_seeds: int = 1
    trainer_seed: int = 0  # the online learner's seed in one replay

    def __post_init__(self) -> None:
        if self.trainer_seeds < 1:
            raise ValueError(f"trainer seeds: at least 1, not {self.trainer_seeds}")


def experiments_file(arms: tuple[str, ...], explore: float = 0.0) -> str:
    """The simulated experiment; with `explore`, the online-bpr arm gives that share of its slots
    to fresh items."""
    unknown = [arm for arm in arms if arm not in ARM_SPECS]
    if unknown or len(arms) < 2 or len(set(arms)) != len(arms):
        raise ValueError(f"arms {list(arms)}: two or more distinct arms of {sorted(ARM_SPECS)}")
    specs = [ARM_SPECS[arm] if arm != "online-bpr" or not explore else f"{{name: online-bpr, explore: {explore}}}"
             for arm in arms]
    return f"experiments: [{{name: {EXPERIMENT}, arms: [{', '.join(specs)}]}}]\n"


@dataclass(frozen=True)
class ColdItems:
    """The new items of a cold-start simulation: withheld (their events dropped) until the event
    at position `middle` of the replayed log, then released."""

    ids: frozenset[str]
    middle: int


def withhold_items(log: InteractionLog, share: float, seed: int) -> tuple[InteractionLog, ColdItems]:
    """`share` of the log's items, drawn with `seed`, lose their events of the first half (by
    time): they do not exist before the middle of the replay."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"cold items: a share in (0, 1), not {share}")
    item_ids = id_strings(log.item_id)
    items = np.sort(pd.unique(item_ids))
    chosen = np.random.default_rng(seed).choice(items, size=max(1, round(share * len(items))), replace=False)
    early = np.arange(len(log)) < len(log) // 2
    dropped = early & np.isin(item_ids, chosen)
    kept = log.take(np.flatnonzero(~dropped))
    return kept, ColdItems(frozenset(chosen.tolist()), int(np.count_nonzero(early & ~dropped)))


def wait_exploration(stack: Stack, http: httpx.Client, explore: ExplorationStore, produced: int, queried: int,
                     timeout_s: float) -> None:
    """Until the trainer has counted every event produced (the store's marks) and the impressions
    of all `queried` answers, and serving has read the counts afresh since: the next draws see the
    whole prefix, whatever the timing."""
    deadline = time.monotonic() + timeout_s
    topic = stack.settings.topic + "/"
    while sum(v for k, v in explore.marks().items() if k.startswith(topic)) < produced:
        _check_deadline(stack, deadline, f"the trainer did not count the {produced} events for exploration")
    while counter_total(httpx.get(stack.trainer_metrics_url, timeout=10.0).text,
                        "streamrec_trainer_exploration_counted", kind="impressions") < queried:
        _check_deadline(stack, deadline, f"the trainer did not count the impressions of {queried} answers")
    reads = http.get("/readyz").json()["explore_reads"]
    while http.get("/readyz").json()["explore_reads"] < reads + 2:  # a read that began after the counts
        _check_deadline(stack, deadline, "serving did not re-read the exploration counts")


def _check_deadline(stack: Stack, deadline: float, what: str) -> None:
    stack.processes.check()
    if time.monotonic() > deadline:
        raise TimeoutError(what)
    time.sleep(0.002)


def release_items(client: ParamClient, settings: Settings, catalogue: ItemCatalogue, cold: ColdItems,
                  content_tower: bool, explore: bool) -> dict[str, Any]:
    """The middle of a cold-start replay: the full catalogue is published; with `content_tower`,
    one round of `streamrec content-tower fit` (fit on the online table, seed the new items' rows,
    with `explore` make them fresh for exploration)."""
    client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue))
    report: dict[str, Any] = {"released": len(cold.ids)}
    if content_tower:
        report["content_tower"] = refresh_content_tower(client, ONLINE_ITEM_TABLE,
                                                        before_assign=mark_fresh(settings) if explore else None)
    return report


def events_with_clicks(chunk: InteractionLog, answered: dict[str, tuple[str, set[str]]]) -> list[dict[str, Any]]:
    """The chunk's events; an event on an item its user was just shown carries that answer's
    `request_id` in its context: a click on the recommendation, which the trainer joins."""
    events = list(iter_events(chunk.user_id.astype(str).tolist(), chunk.item_id.astype(str).tolist(),
                              chunk.event_types(), chunk.rating, chunk.timestamp, chunk.event_ids()))
    for event in events:
        answer = answered.get(event["user_id"])
        if answer is not None and event["item_id"] in answer[1]:
            event["context"] = {"request_id": answer[0]}
    return events


def require_queries(log: InteractionLog, chunk_events: int) -> None:
    """Refuse a log that can give no query, before any process starts: users are asked before
    every chunk but the first, so the log needs more events than one chunk. `--limit 10` with
    chunks of 10 started the whole stack, then failed reading serving's counters."""
    if len(log) <= chunk_events:
        raise ValueError(f"the log has {len(log)} events to replay: a simulation needs more than one chunk "
                         f"({chunk_events} events, --chunk), since users are asked before each chunk after the "
                         "first; replay more events or use smaller chunks")


def wait_serving(stack: Stack, http: httpx.Client, timeout_s: float) -> dict[str, Any]:
    """Serving's /readyz body once it answers at all. A starting worker listens only after its
    first model (or its first-poll wait), so a read of /readyz or /metrics before then was
    refused (httpx.ConnectError); raises if a stack process died or `timeout_s` ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return http.get("/readyz").json()
        except httpx.TransportError:  # not listening yet
            stack.processes.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"serving at {stack.serving_url} did not answer in {timeout_s} s") from None
            time.sleep(0.05)


def wait_barrier(stack: Stack, admin: KafkaAdminClient, client: ParamClient, http: httpx.Client, produced: int,
                 timeout_s: float) -> None:
    """Until the trainer has committed `produced` events and serving has polled past them."""
    deadline = time.monotonic() + timeout_s
    settings = stack.settings
    while True:
        stack.processes.check()
        committed = sum(group_committed(admin, settings.consumer_group, settings.topic).values())
        if committed >= produced:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the trainer committed {committed} of {produced} events in {timeout_s} s")
        time.sleep(0.005)
    target = sum(int(meta["version"]) for meta in client.get_meta())
    while wait_serving(stack, http, max(0.0, deadline - time.monotonic())).get("synced_version", 0) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"serving did not poll past version {target} in {timeout_s} s")
        time.sleep(0.005)


def served_counts(http: httpx.Client) -> dict[str, int]:
    """Serving's own count of answers per arm of the simulated experiment."""
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        if family.name == COUNTER:
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("experiment") == EXPERIMENT:
                    counts[sample.labels["arm"]] = int(sample.value)
    return counts


def counter_total(metrics_text: str, family_name: str, **labels: str) -> float:
    """A Prometheus counter's value with these labels (0 before its first increment)."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name == family_name:
            for sample in family.samples:
                if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
    return 0.0


def wait_impressions(stack: Stack, http: httpx.Client, queried: int, timeout_s: float) -> None:
    """Until serving has had the impressions of its `queried` answers acknowledged by the broker
    and the trainer has read them: the next chunk's negatives then include what was shown."""
    deadline = time.monotonic() + timeout_s
    while True:
        stack.processes.check()
        produced = counter_total(http.get("/metrics").text, "streamrec_serving_impressions", outcome="produced")
        read = counter_total(httpx.get(stack.trainer_metrics_url, timeout=10.0).text, "streamrec_trainer_impressions",
                             outcome="kept") if produced >= queried else 0.0
        if read >= queried:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queried} answers: serving logged {produced:.0f} impressions, the trainer read "
                               f"{read:.0f}, in {timeout_s} s")
        time.sleep(0.002)


def replay_through_stack(settings: Settings, log: InteractionLog, options: SimulateOptions,
                         cold: ColdItems | None = None) -> tuple[pd.DataFrame, dict[str, int], dict[str, Any]]:
    """Replay `log` through a private stack; one row per query (arm, user_id, hit, items shown,
    whether the target is a `cold` item and whether the query comes after their release) and
    serving's own count of answers per arm (checked against the rows); and what the release of the
    `cold` items did (the content tower's fit report; empty without a release)."""
    require_queries(log, options.chunk_events)
    spec = experiments_file(options.arms, options.explore)
    rows: list[tuple[str, str, bool, list[str], bool, bool, int]] = []
    trainer_args = ["--batch-events", str(options.chunk_events), "--batch-seconds", str(BATCH_WAIT_S)]
    if options.impression_negatives:
        trainer_args += ["--param", f"online-bpr.impression_negatives={options.impression_negatives}"]
    if options.explore:
        trainer_args.append("--explore")
    if options.trainer_seed:
        trainer_args += ["--param", f"online-bpr.seed={options.trainer_seed}"]
    catalogue = read_catalogue(options.catalogue) if options.catalogue is not None else None
    with tempfile.TemporaryDirectory(prefix="streamrec-simulate-") as tmp:
        work = Path(tmp)
        (work / "experiments.yaml").write_text(spec)
        # one trainer batch per chunk: the next chunk is produced only after the barrier, so the
        # batches (and with them the model) do not depend on when the broker hands records over
        stack_options = StackOptions(
            workers=1, poll_interval=0.05, trainer_args=tuple(trainer_args),
            serve_args=("--experiments", str(work / "experiments.yaml"), "--trending-cache", "0",
                        "--impressions-flush", str(IMPRESSIONS_FLUSH_S),
                        "--user-pull-timeout", str(options.barrier_timeout_s),
                        "--redis-timeout", str(options.barrier_timeout_s),
                        "--explore-refresh", str(EXPLORE_REFRESH_S), "--explore-seed", str(options.seed)))
        with running_stack(settings, work, stack_options) as stack, \
                ParamClient(stack.settings.param_servers, timeout=30.0) as client, \
                httpx.Client(base_url=stack.serving_url, timeout=30.0) as http:
            explore = ExplorationStore.from_url(stack.settings.redis_url, stack.settings.feature_prefix,
                                                stack.settings.redis_cluster) \
                if options.explore else None
            if catalogue is not None:  # before the release only the items that exist then
                client.put_blob(CATALOGUE_BLOB, encode_catalogue(
                    catalogue.without(cold.ids) if cold is not None else catalogue))
            publisher = EventPublisher.from_settings(stack.settings, "simulate")
            admin = admin_client(stack.settings.kafka_bootstrap)
            produced = 0
            released = cold is None
            release: dict[str, Any] = {}
            try:
                with progress_bar("simulate", total=len(log)) as advance:
                    for start in range(0, len(log), options.chunk_events):
                        chunk = log.take(slice(start, start + options.chunk_events))
                        answered: dict[str, tuple[str, set[str]]] = {}
                        if produced:
                            wait_barrier(stack, admin, client, http, produced, options.barrier_timeout_s)
                            # released before the chunk that holds the middle (a trainer batch is a
                            # whole chunk): the new items' events all come after it
                            if not released and start + options.chunk_events > cold.middle:
                                release = release_items(client, stack.settings, catalogue, cold,
                                                        options.content_tower, explore is not None)
                                released = True
                                wait_barrier(stack, admin, client, http, produced, options.barrier_timeout_s)
                            if explore is not None:
                                wait_exploration(stack, http, explore, produced, len(rows), options.barrier_timeout_s)
                            users, first = np.unique(chunk.user_id.astype(str), return_index=True)
                            for user, position in zip(users.tolist(), first.tolist()):
                                reply = http.get("/recommend", params={"user_id": user, "k": options.k})
                                reply.raise_for_status()
                                body = reply.json()
                                shown = [item["item_id"] for item in body["items"]]
                                target = str(chunk.item_id[position])
                                answered[user] = (body["request_id"], set(shown))
                                explored = sum(item["sources"] == ["explore"] for item in body["items"])
                                rows.append((body["arm"], user, target in shown, shown,
                                             cold is not None and target in cold.ids, released and cold is not None,
                                             explored))
                            if options.impression_negatives:
                                wait_impressions(stack, http, len(rows), options.barrier_timeout_s)
                        for event in events_with_clicks(chunk, answered):
                            if not publisher.publish(event, {"file": log.source, "simulate": start}):
                                raise ValueError(f"an event of the log was refused: {event}")
                        publisher.flush()
                        produced = publisher.accepted  # the publisher's running count
                        advance(len(chunk))
            finally:
                publisher.close()
                admin.close()
            wait_serving(stack, http, options.barrier_timeout_s)
            served = served_counts(http)
            metrics = http.get("/metrics").text
            late = {reason: counter_total(metrics, "streamrec_serving_degraded", reason=reason)
                    for reason in ("param_server", "redis")}
    if any(late.values()):  # answered without the user's row or history: the result would depend on timing
        raise RuntimeError(f"serving answered queries degraded {late} (a dependency answered late); "
                           "the simulation is not reproducible")
    frame = pd.DataFrame(rows, columns=["arm", "user_id", "hit", "items", "cold", "released", "explored"]
                         ).assign(click=False)
    # every arm, 0 where nobody was asked: serving's series of every arm exist from the start, at 0
    queried = {**dict.fromkeys(options.arms, 0), **frame["arm"].value_counts().to_dict()}
    if served != queried:
        raise RuntimeError(f"serving counted {served} answers per arm, the simulator sent {queried}")
    return frame, served, release


def replay_seeds(settings: Settings, log: InteractionLog, options: SimulateOptions, cold: ColdItems | None = None,
                 ) -> tuple[list[pd.DataFrame], dict[str, int], dict[str, Any]]:
    """`options.trainer_seeds` replays of the same configuration, the online learner seeded
    0 .. n-1: each replay's frame (with its `trainer_seed`), serving's answers per arm summed over
    them, and the last replay's release report. The same users are asked the same queries in
    every replay, so per-user sums over the frames stay paired with another configuration's."""
    frames, served, release = [], {}, {}
    for trainer_seed in range(options.trainer_seeds):
        frame, counts, release = replay_through_stack(settings, log, replace(options, trainer_seed=trainer_seed),
                                                      cold)
        frames.append(frame.assign(trainer_seed=trainer_seed))
        for arm, count in counts.items():
            served[arm] = served.get(arm, 0) + count
    return frames, served, release


def simulate(settings: Settings, log: InteractionLog, options: SimulateOptions = SimulateOptions()) -> dict[str, Any]:
    if options.limit is not None:
        log = log.take(slice(0, options.limit))
    started = time.monotonic()
    frames, served, _ = replay_seeds(settings, log, options)
    frame = pd.concat(frames, ignore_index=True)
    report = experiment_report(frame, {arm: 1.0 for arm in options.arms}, np.random.default_rng(options.seed),
                               k=options.k)
    for arm in report["arms"].values():  # no feedback is sent in a simulation: no clicks to report
        for key in ("clicks", "ctr", "ctr_ci95"):
            arm.pop(key)
    return {**report, "events": len(log), "chunk_events": options.chunk_events, "k": options.k,
            "impression_negatives": options.impression_negatives, "trainer_seeds": options.trainer_seeds,
            "per_trainer_seed": [{"trainer_seed": n, **{arm: float(f.loc[f["arm"] == arm, "hit"].mean())
                                                        for arm in options.arms}} for n, f in enumerate(frames)],
            "queries": len(frame), "served_counts": served, "seconds": round(time.monotonic() - started, 1)}


def per_user_hits(frame: pd.DataFrame, arm: str, rows: pd.Series | None = None) -> pd.DataFrame:
    """Per user of `arm` (and of the `rows` mask): queries (`size`) and hits (`sum`)."""
    mine = frame["arm"] == arm if rows is None else (frame["arm"] == arm) & rows
    return frame[mine].groupby("user_id")["hit"].agg(["size", "sum"])


def paired_lift(before: pd.DataFrame, after: pd.DataFrame, seed: int) -> dict[str, Any]:
    """Hit rates of two replays that asked the same users the same queries (per-user `size` and
    `sum`), and the relative lift with a paired bootstrap interval: one draw of users applies to
    both runs."""
    after = after.reindex(before.index)
    if after["size"].isna().any() or not np.array_equal(before["size"].to_numpy(), after["size"].to_numpy()):
        raise RuntimeError("the two replays asked different queries")
    replicates = [bootstrap_ratio(p["sum"].to_numpy(np.float64), p["size"].to_numpy(np.float64),
                                  np.random.default_rng(seed)) for p in (before, after)]  # the same draws
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = replicates[1] / replicates[0] - 1
    rates = [float(p["sum"].sum() / p["size"].sum()) if p["size"].sum() else 0.0 for p in (before, after)]
    return {"users": len(before), "requests": int(before["size"].sum()), "before": rates[0], "after": rates[1],
            "relative": rates[1] / rates[0] - 1 if rates[0] else None, "ci95": interval95(relative),
            "method": "paired per-user bootstrap of the ratio of hit rates"}


def compare_impression_negatives(settings: Settings, log: InteractionLog, options: SimulateOptions,
                                 ) -> dict[str, Any]:
    """The same replay twice: online-bpr learning from sampled negatives only, then with
    `options.impression_negatives` of them taken from what serving showed. The online-bpr arm's
    lift comes from a paired bootstrap over its users: both runs assign the same users to it and
    ask them the same queries."""
    if "online-bpr" not in options.arms or not options.impression_negatives:
        raise ValueError("comparing impression negatives needs the online-bpr arm and impression negatives > 0")
    if options.limit is not None:
        log = log.take(slice(0, options.limit))
    started = time.monotonic()
    runs, per_user = {}, {}
    for name, count in (("sampled", 0), ("impressions", options.impression_negatives)):
        frame = pd.concat(replay_seeds(settings, log, replace(options, impression_negatives=count))[0],
                          ignore_index=True)
        runs[name] = experiment_report(frame, {arm: 1.0 for arm in options.arms}, np.random.default_rng(options.seed),
                                       k=options.k)
        per_user[name] = per_user_hits(frame, "online-bpr")
    lift = paired_lift(per_user["sampled"], per_user["impressions"], options.seed)
    k = options.k
    return {"runs": runs, "online-bpr": {
        "users": lift["users"], "requests": lift["requests"], f"hit@{k} sampled": lift["before"],
        f"hit@{k} impressions": lift["after"], "relative": lift["relative"], "ci95": lift["ci95"],
        "method": lift["method"]},
        "impression_negatives": options.impression_negatives, "trainer_seeds": options.trainer_seeds,
        "events": len(log), "chunk_events": options.chunk_events, "k": options.k,
        "seconds": round(time.monotonic() - started, 1)}


def cold_start_lifts(without: pd.DataFrame, with_: pd.DataFrame, k: int, seed: int) -> dict[str, dict[str, Any]]:
    """The online-bpr arm's paired lifts from the replays without and with the content tower and
    exploration: hit@k on the new items after their release, and overall."""
    new_items = [per_user_hits(f, "online-bpr", f["cold"] & f["released"]) for f in (without, with_)]
    overall = [per_user_hits(f, "online-bpr") for f in (without, with_)]
    return {f"new items hit@{k}": paired_lift(*new_items, seed), f"overall hit@{k}": paired_lift(*overall, seed)}


def compare_cold_start(settings: Settings, log: InteractionLog, options: SimulateOptions) -> dict[str, Any]:
    """Issue 17's cold-start acceptance: `options.cold_items` of the items are withheld until the
    middle of the replay, then released (the full catalogue published). The same replay twice
    (each `options.trainer_seeds` times): without content tower and exploration, then with both
    (`options.explore` of the online-bpr arm's slots). Reported for the online-bpr arm, each with a
    paired per-user bootstrap over every seed's queries: hit@k on the new items after their release
    (queries whose next item is a new one), and hit@k overall; each seed's own lifts; the content
    tower's fit report at the release (its validation error against the mean-row baseline says
    whether the metadata predicted anything)."""
    if "online-bpr" not in options.arms or options.catalogue is None or not options.explore:
        raise ValueError("comparing cold start needs the online-bpr arm, a --catalogue and --explore > 0")
    if options.limit is not None:
        log = log.take(slice(0, options.limit))
    started = time.monotonic()
    log, cold = withhold_items(log, options.cold_items, options.seed)
    runs, per_seed, frames, release = {}, {}, {}, {}
    for name, tower, explore in (("without", False, 0.0), ("with", True, options.explore)):
        per_seed[name], _, release = replay_seeds(settings, log, replace(options, content_tower=tower, explore=explore),
                                                  cold)
        frames[name] = pd.concat(per_seed[name], ignore_index=True)
        runs[name] = experiment_report(frames[name], {arm: 1.0 for arm in options.arms},
                                       np.random.default_rng(options.seed), k=options.k)
    arm = frames["with"][frames["with"]["arm"] == "online-bpr"]
    shown_new = arm["items"].map(lambda items: sum(item in cold.ids for item in items))
    k = options.k
    return {"runs": runs, "online-bpr": cold_start_lifts(frames["without"], frames["with"], k, options.seed),
        "per_trainer_seed": [
            {"trainer_seed": n, **{name: lift["relative"] for name, lift in
                                   cold_start_lifts(without, with_, k, options.seed).items()}}
            for n, (without, with_) in enumerate(zip(per_seed["without"], per_seed["with"]))],
        "trainer_seeds": options.trainer_seeds,
        "explored_slots_per_answer": float(arm["explored"].mean()) if len(arm) else 0.0,
        "new_items_shown_per_answer_after_release": float(shown_new[arm["released"]].mean()) if len(arm) else 0.0,
        "new_items": len(cold.ids), "released_at_event": cold.middle, "explore": options.explore,
        "explore_candidates": settings.explore_candidates,
        "content_tower": release.get("content_tower"),  # the "with" replay's, the last
        "events": len(log), "chunk_events": options.chunk_events, "k": options.k,
        "seconds": round(time.monotonic() - started, 1)}
