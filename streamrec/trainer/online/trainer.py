"""`streamrec train-online`: the consumer loop that makes recommendations real-time.

Per consumed batch (bounded by size and time): validate (bad records to the dead-letter topic),
then one pull of the rows the batch needs, learning in small steps locally (prequential scoring
of sampled events before each step), and ONE push carrying the deltas, the Kafka offset range
of each partition it covers and the event count; the feature-store write of the batch runs on a
background thread meanwhile; offsets are committed only after both are done.

Exactly once, whatever crashes (docs/operations.md):
- The parameter server's state decides where the trainer resumes. On assignment the trainer
  claims its partitions on every shard (fencing an older owner) and gets each shard's next offset;
  it seeks to the smallest, so every shard sees every event it lacks.
- Every shard applies a push only if its range continues exactly where the shard stands, skips one
  it already has, and refuses anything else. Batches are cut at the shards' offsets, so a replayed
  batch is either new or old for each shard as a whole: healthy shards never apply it twice.
- A shard that restarted (its incarnation changed) makes the trainer re-claim and rewind.
- The feature store keeps its own offsets per partition in the same Lua call as the features; a
  Redis outage stops consumption (partitions paused, the member stays in its group) instead of
  dropping features; a wiped store is rebuilt from the topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from redis.exceptions import RedisError, ResponseError

from streamrec.core.allocator import HeapTrimmer
from streamrec.core.config import Settings
from streamrec.param_server.client import Fenced, OffsetsRefused, ParamServerError
from streamrec.stream.deadletter import DeadLetterSink
from streamrec.stream.events import EventBatch, EventSchema
from streamrec.stream.kafka import (
    BROKER_ERRORS,
    Consumer,
    KafkaError,
    Record,
    TopicPartition,
    make_consumer,
    producer_from,
)
from streamrec.stream.metrics import EVENTS_ACCEPTED
from streamrec.stream.topics import end_offsets, offset_key
from streamrec.trainer.online.base import (
    OnlineRecommender,
    learn_together,
    restore_states,
)
from streamrec.trainer.online.dedup import (
    DUPLICATE_EVENTS,
    META_KEY,
    REASON,
    EventIdWindow,
)
from streamrec.trainer.online.exploration import ExplorationStore
from streamrec.trainer.online.exploration_follower import ExplorationFollower
from streamrec.trainer.online.feature_rebuild import rebuild_features
from streamrec.trainer.online.feature_store import (
    FeatureStore,
    FeatureStoreCorrupt,
    popularity_weights,
)
from streamrec.trainer.online.impression_follower import ImpressionFollower
from streamrec.trainer.online.live_eval import LivePrequential
from streamrec.trainer.online.metrics import (
    BATCH_SECONDS,
    CONSUMER_LAG,
    EVENT_TIME,
    EVENTS_APPLIED,
    EVENTS_CONSUMED,
    EVENTS_LOST_TO_RETENTION,
    FEATURE_BACKPRESSURE,
    FEATURE_ERRORS,
    FEATURE_REBUILDS,
    FEATURE_SECONDS,
    LOSS,
    PUSH_SECONDS,
    REWINDS,
)
from streamrec.trainer.online.warmup import warm_up, warmup_ranges

log = logging.getLogger("streamrec.trainer")
# the parameter server's answers that refuse what a push carries (non-finite values, wrong shapes),
# as opposed to a shard that is down or restarting: retrying the same batch cannot help
REFUSED_CONTENT = frozenset({"ValueError", "TypeError"})
IDLE_PROBE_SECONDS = 5.0  # how often an idle trainer asks the shards whether one restarted
# an idle trainer without partitions yet (its group is still forming) is not idle: nothing could
# reach it. Kafka holds a new group's first assignment for 3 s (group.initial.rebalance.delay.ms),
# and a trainer with `idle_exit_seconds` below that exited before it got a partition. Idle time
# starts again when the assignment changes (after the warm-up on new partitions), and counts
# without one only past this long (the group's other members hold every partition).
ASSIGNMENT_GRACE_SECONDS = 15.0
PARTITION_FETCH_BYTES = 256 * 1024  # ~1,000 events per partition per fetch: a backlog interleaves in time


def recorded_offsets(meta_records: list[dict[str, Any]]) -> dict[str, int]:
    """Offsets the parameter server holds with its state: per partition the minimum over shards
    (each shard stores the meta of the pushes it received; the oldest is the safe resume point)."""
    merged: dict[str, int] = {}
    for record in meta_records:
        for key, offset in ((record.get("meta") or {}).get("offsets") or {}).items():
            merged[key] = min(merged.get(key, offset), offset)
    return merged


class UpdatesRefused(RuntimeError):
    """The parameter server refused the content of a push (REFUSED_CONTENT): the trainer stops."""


class StateOfAnotherLog(RuntimeError):
    """The parameter server's watermarks lie beyond the topic's end: its state is another log's."""


class FeatureStoreUnavailable(RuntimeError):
    """The trainer was stopped while Redis was unreachable; the batch in hand stays uncommitted."""


@dataclass
class TrainerConfig:
    batch_events: int = 5000
    batch_seconds: float = 0.5
    evaluate_every: int = 10
    max_events: int | None = None  # stop after this many consumed records (benchmarks, tests)
    idle_exit_seconds: float | None = None  # stop when nothing arrived for this long
    report_path: str | None = None  # JSON report rewritten every report_every_seconds and at exit
    report_every_seconds: float = 5.0
    dedup_window_events: int = 65_536  # per partition: an event id seen this many offsets back is a duplicate
    warmup_events: int = 300_000  # records before the resume points re-read (not learned) on start, split over the partitions
    fenced_warning_seconds: float = 60.0  # how often partitions still assigned here but fenced are reported


@dataclass
class TrainerStats:
    consumed: int = 0
    applied: int = 0
    dead_lettered: int = 0
    batches: int = 0
    batch_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))  # recent batches
    first_record_at: float | None = None
    last_batch_at: float | None = None
    first_record_cpu: float = 0.0  # time.process_time() at the first record and at the last batch: the
    last_batch_cpu: float = 0.0  # process's CPU seconds over the active span, without start-up imports
    losses: dict[str, float] = field(default_factory=dict)


class OnlineTrainer:
    def __init__(self, settings: Settings, models: list[OnlineRecommender], config: TrainerConfig | None = None,
                 feature_store: FeatureStore | None = None, consumer: Consumer | None = None,
                 exploration: ExplorationStore | None = None) -> None:
        """`models` share one store (the parameter server they were built on); the first ranks
        items for the prequential metrics. With `exploration`, a thread counts what serving's
        Thompson sampling needs (impressions, clicks, first sightings) into that store."""
        if not models:
            raise ValueError("at least one online model is needed")
        self.settings, self.models, self.config = settings, models, config or TrainerConfig()
        self.store = models[0].store
        restore_states(models, self._meta())
        self.schema = EventSchema.from_settings(settings)
        self.features = feature_store
        self.evaluator = LivePrequential(models[0], every=self.config.evaluate_every)
        self.stats = TrainerStats()
        self.stop_requested = threading.Event()
        self._producer = producer_from(settings)
        self.dead_letters = DeadLetterSink(self._producer, settings.dlq_topic, "trainer")
        self._open = True
        self._newly_assigned: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}  # next offset to process, per owned partition
        self._shard_next: list[dict[str, int]] = []  # each shard's next offset per partition key
        self._floors: dict[str, int] = {}  # earliest offset the topic still holds, per partition key
        self._fenced: set[TopicPartition] = set()  # owned by another trainer now (until reassigned)
        self._evaluated_to: dict[TopicPartition, int] = {}  # this process has seen offsets below: a replay
        self._feature_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="features")
        self._trimmer = HeapTrimmer()  # a batch's arrays, freed, would otherwise stay resident
        self._event_ids = EventIdWindow(self.config.dedup_window_events)  # restored per partition in _resync
        self.consumer = consumer or make_consumer(
            settings.kafka_bootstrap, settings.kafka_client, group_id=settings.consumer_group,
            topics=[settings.topic], session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms, on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            partition_fetch_bytes=PARTITION_FETCH_BYTES, fetch_wait_ms=settings.fetch_wait_ms,
        )
        shown = [model.shown for model in models if model.shown is not None]
        self.impressions = ImpressionFollower(settings, shown).start() if shown else None
        self.exploration = None if exploration is None else ExplorationFollower(
            settings, exploration, models[0].roles.positive_types).start()

    # ---- offsets ------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        records = self.store.get_meta()
        return (records[0].get("meta") or {}) | {"offsets": recorded_offsets(records)}

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        """Runs inside the client's poll, where it must not block: only note the partitions."""
        self._newly_assigned.extend(partitions)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Another member owns these now: stop reporting their lag from here."""
        for topic, partition in partitions:
            self._positions.pop((topic, partition), None)
            try:
                CONSUMER_LAG.remove(str(partition))
            except KeyError:
                pass  # never reported a lag for it

    def _resync(self, partitions: Sequence[TopicPartition], reason: str, claim: bool = True) -> None:
        """Seek `partitions` to where the parameter server needs them: per partition the smallest
        next offset over the shards, a shard without one needing the topic from its earliest offset
        (it is new or restarted empty). `claim` first takes the partitions on every shard (fences
        any older owner, and restores a claim a restarted shard lost)."""
        if not partitions:
            return
        keys = [offset_key(*tp) for tp in partitions]

        def position() -> None:
            self._shard_next = self.store.claim(keys) if claim else self.store.watermarks()
            self._event_ids.restore(self.store.get_meta(), keys)  # the ids as they were at the resume point

        if not self._once_param_server_answers(position, f"positioning {keys}"):
            return
        floors = self.consumer.beginning_offsets(partitions)
        self._refuse_state_of_another_log(partitions, keys)
        for tp, key in zip(partitions, keys):
            floor = floors.get(tp, 0)
            self._floors[key] = floor
            target = min(shard.get(key, floor) for shard in self._shard_next)
            if target < floor:
                log.error("partition %s: retention removed %d events the model state still needs (offsets %d..%d); "
                          "they cannot be learned", key, floor - target, target, floor - 1)
                EVENTS_LOST_TO_RETENTION.labels(key).inc(floor - target)
                target = floor
            if self._positions.get(tp) != target:
                log.warning("partition %s: %s: resuming at offset %d (was %s)", key, reason, target,
                            self._positions.get(tp))
                REWINDS.labels(reason).inc()
            self.consumer.seek(tp, target)
            self._positions[tp] = target
            self._fenced.discard(tp)
        self._warm_up(partitions)

    def _refuse_state_of_another_log(self, partitions: Sequence[TopicPartition], keys: Sequence[str]) -> None:
        """A shard that has learned a partition beyond the topic's end holds the state of another
        log under this topic's name: a memory-only broker restarted, or the topic was deleted and
        made again, while the checkpoints stayed. Resuming there skipped the new log's first
        events without a word and mixed two logs in the counts. Stopping says what to do. (A new
        log already longer than the old one cannot be told apart by offsets.)"""
        by_topic: dict[str, list[int]] = {}
        for topic, partition in partitions:
            by_topic.setdefault(topic, []).append(partition)
        try:
            ends = {(topic, p): end for topic, numbers in by_topic.items()
                    for p, (_, end) in end_offsets(self.settings.kafka_bootstrap, topic, numbers).items()}
        except (*BROKER_ERRORS, TimeoutError) as exc:
            log.warning("cannot list the end offsets of %s (%s): not checked against the model state", keys, exc)
            return
        ahead = {}
        for tp, key in zip(partitions, keys):
            learned = max(shard.get(key, 0) for shard in self._shard_next)
            if tp in ends and learned > ends[tp]:
                ahead[key] = (learned, ends[tp])
        if ahead:
            raise StateOfAnotherLog(
                "the parameter server has learned beyond the end of the topic (" + ", ".join(
                    f"{key}: learned to {learned}, topic ends at {end}" for key, (learned, end) in sorted(ahead.items()))
                + "): its state comes from another log under this topic's name (a memory-only broker restarted, "
                "or the topic was made again). Start the parameter server from an empty checkpoint directory, "
                "or point the trainer at the log it learned")

    def _warm_up(self, partitions: Sequence[TopicPartition]) -> None:
        """Re-read what this process has not seen before the resume points (warmup.py: histories
        and sessions, nothing learned). A broker that cannot serve it costs live metrics, not
        learning: the trainer goes on, with a warning."""
        per_partition = -(-self.config.warmup_events // len(partitions))
        ranges = warmup_ranges({tp: self._positions[tp] for tp in partitions}, self._evaluated_to,
                               {tp: self._floors[offset_key(*tp)] for tp in partitions}, per_partition)
        if not ranges:
            return
        try:
            warm_up(self.settings, self.schema, ranges, self.evaluator, self.models)
        except (KafkaError, TimeoutError) as exc:
            log.warning("warm-up of %s failed (%s): histories and sessions start from the resume point", ranges, exc)
            return
        for tp, (_, stop) in ranges.items():
            self._evaluated_to[tp] = max(self._evaluated_to.get(tp, 0), stop)

    def _take_assignments(self, records: list[Record]) -> list[Record]:
        """Newly assigned partitions are claimed and positioned by the server's offsets; records a
        poll fetched for them before the seek are dropped (they come again from the right place)."""
        if not self._newly_assigned:
            return records
        partitions, self._newly_assigned = sorted(set(self._newly_assigned)), []
        self._resync(partitions, "assigned")
        moved = set(partitions)
        return [r for r in records if (r.topic, r.partition) not in moved]

    def _after_restarts(self) -> bool:
        """A shard that restarted may have lost state: re-claim and rewind every owned partition."""
        restarts = self.store.take_restarts()
        if not restarts:
            return False
        for restart in restarts:
            log.warning("parameter-server shard %d restarted (%s -> %s)%s: rewinding to its offsets",
                        restart.shard, restart.old, restart.new, " EMPTY" if restart.empty else "")

        def recover() -> None:
            for model in self.models:
                model.create_tables()
            restore_states(self.models, self._meta())

        if not self._once_param_server_answers(recover, "recovering from a shard restart"):
            return True  # the batch in hand stays uncommitted, for the next run
        self._resync(self.consumer.assignment(), "shard_restarted_empty" if any(r.empty for r in restarts)
                     else "shard_restarted")
        return True

    def _once_param_server_answers(self, attempt: Callable[[], None], doing: str) -> bool:
        """Run `attempt` again until no shard is down or restarting for it (another shard going down
        while the trainer recovers used to kill it); False when a stop is requested first, which
        loses nothing uncommitted: it is read again from the shards' offsets by the next run."""
        while True:
            try:
                attempt()
                return True
            except (ParamServerError, ConnectionError) as exc:
                if self.stop_requested.is_set():
                    log.warning("stopping with the parameter server unavailable while %s (%s)", doing, exc)
                    return False
                log.warning("parameter server unavailable while %s (%s): waiting for it", doing, exc)
                self._wait_for_param_server()

    def _probe_shards(self) -> bool:
        """While no record arrives, nothing else asks the shards anything, and a shard that came
        back from an older checkpoint (or empty) went unnoticed until the next event: it served
        old rows indefinitely, and an `--idle-exit` trainer left it behind for good. One cheap call
        tells its new incarnation; returns whether the trainer rewound."""
        try:
            self.store.watermarks()
        except (ParamServerError, ConnectionError) as exc:
            log.debug("probing the parameter server while idle: %s", exc)  # known again once it answers
            return False
        return self._after_restarts()

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainerStats:
        """Consume until stopped (SIGTERM/SIGINT via `stop_requested`, max_events, or idle)."""
        cfg = self.config
        started = idle_since = last_report = last_probe = last_fence_report = time.monotonic()
        owned: set[TopicPartition] = set()  # the partitions held when idle time last started
        try:
            while not self.stop_requested.is_set():
                records = self._collect()
                if records:
                    idle_since = last_probe = time.monotonic()
                    try:
                        self.process(records)
                    except FeatureStoreUnavailable as exc:
                        log.warning("%s", exc)
                        break
                    if cfg.max_events is not None and self.stats.consumed >= cfg.max_events:
                        break
                else:
                    holding = set(self.consumer.assignment())
                    if holding != owned or (not holding and time.monotonic() - started < ASSIGNMENT_GRACE_SECONDS):
                        # still joining its group, or just given partitions (and done warming up on
                        # them, which can take seconds): not idle yet
                        owned, idle_since = holding, time.monotonic()
                    idle_exit = (cfg.idle_exit_seconds is not None
                                 and time.monotonic() - idle_since > cfg.idle_exit_seconds)
                    if idle_exit or time.monotonic() - last_probe >= IDLE_PROBE_SECONDS:
                        last_probe = time.monotonic()
                        if self._probe_shards():  # a shard went back: relearn before anything else
                            idle_since = time.monotonic()
                            continue
                    if idle_exit:
                        break
                if cfg.report_path and time.monotonic() - last_report >= cfg.report_every_seconds:
                    self.write_report()
                    last_report = time.monotonic()
                self._trimmer.trim_if_due()
                if self._fenced and time.monotonic() - last_fence_report >= cfg.fenced_warning_seconds:
                    last_fence_report = time.monotonic()
                    self._report_fenced()
        finally:
            self.close()
            if cfg.report_path:
                self.write_report()
        return self.stats

    def _report_fenced(self) -> None:
        """A fenced partition is learned by nobody here until this trainer's group assigns it again,
        which within one group follows at once. One still assigned here a minute later was claimed
        by a trainer outside this group (two groups on one parameter server), and it was silent
        for good, even after that trainer died."""
        stuck = sorted(self._fenced & set(self.consumer.assignment()))
        if stuck:
            log.error("partitions %s are assigned to this trainer but fenced: a trainer outside its consumer group "
                      "claimed them on the parameter server, and nothing of them is learned here. Run one consumer "
                      "group per parameter server, then restart this trainer", [offset_key(*tp) for tp in stuck])

    def write_report(self) -> None:
        """Atomically replace the report file (readers never see half a JSON document)."""
        path = Path(self.config.report_path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(orjson.dumps(self.report(), option=orjson.OPT_SERIALIZE_NUMPY))
        tmp.replace(path)

    def _collect(self) -> list[Record]:
        """One batch: up to batch_events records or batch_seconds after the first one."""
        cfg = self.config
        records: list[Record] = []
        deadline = None
        while len(records) < cfg.batch_events and not self.stop_requested.is_set():
            timeout = cfg.batch_seconds if deadline is None else max(0.0, deadline - time.monotonic())
            polled = self._take_assignments(self.consumer.poll(max_records=cfg.batch_events - len(records), timeout_s=timeout))
            if polled:
                records.extend(polled)
                deadline = deadline or time.monotonic() + cfg.batch_seconds
                if self.stats.first_record_at is None:
                    self.stats.first_record_at = time.monotonic()
                    self.stats.first_record_cpu = time.process_time()
            if deadline is None or time.monotonic() >= deadline:
                break
        return records

    def process(self, records: list[Record]) -> None:
        """Learn the records in groups that are uniformly new or old for each shard, write their
        features, then commit. A refusal or a shard restart rewinds instead: the records not yet
        committed come again from the offsets the server asks for."""
        started = time.perf_counter()
        if self._after_restarts():
            return
        records = [r for r in records if (r.topic, r.partition) not in self._fenced]
        applied = 0
        for group in self._uniform_groups(records):
            done = self._process_group(group)
            if done is None:
                break
            applied += done
        self._account(records, applied, time.perf_counter() - started)

    def _uniform_groups(self, records: list[Record]) -> list[list[Record]]:
        """Split records (stream order kept within a partition) so that each group is, for every
        shard, entirely at or beyond that shard's next offset or entirely before it: the cut points
        are the shards' offsets. Groups needed by fewer shards (catching up) go first. One more cut
        point per partition: where this process's replay (after a rewind) reaches new records, so
        live metrics score each event once."""
        if not records:
            return []
        topic = records[0].topic  # one topic: the interaction topic
        partitions = np.fromiter((r.partition for r in records), np.int64, len(records))
        offsets = np.fromiter((r.offset for r in records), np.int64, len(records))
        keys = [offset_key(topic, p) for p in range(int(partitions.max()) + 1)]
        signature = np.zeros(len(records), np.int64)
        for shard, nexts in enumerate(self._shard_next):
            needed = np.array([nexts.get(k, self._floors.get(k, 0)) for k in keys], np.int64)
            signature |= (offsets >= needed[partitions]).astype(np.int64) << shard
        seen_to = np.array([self._evaluated_to.get((topic, p), 0) for p in range(len(keys))], np.int64)
        signature |= (offsets >= seen_to[partitions]).astype(np.int64) << len(self._shard_next)
        order = sorted(np.unique(signature).tolist(), key=lambda sig: (sig.bit_count(), sig))
        return [[records[i] for i in np.flatnonzero(signature == sig)] for sig in order]

    def _process_group(self, records: list[Record]) -> int | None:
        """One uniform group: learn + push (unless every shard has it), features, commit.
        Returns the events applied, or None when the group was refused and the trainer rewound."""
        first = records[0]
        fresh = first.offset >= self._evaluated_to.get((first.topic, first.partition), 0)  # not a replay
        needed_by_all = fresh and all(self._needs(shard, records) for shard in range(len(self._shard_next)))
        needed_by_any = not self._shard_next or any(self._needs(s, records) for s in range(len(self._shard_next)))
        valid, decoded = self._decode(records, dead_letter=fresh)
        topic = records[0].topic  # one topic: the interaction topic
        partitions = np.fromiter((r.partition for r in records), np.int64, len(records))
        offsets = np.fromiter((r.offset for r in records), np.int64, len(records))
        ranges: dict[str, tuple[int, int]] = {}
        commits: dict[TopicPartition, int] = {}
        for partition in np.unique(partitions).tolist():
            mine = offsets[partitions == partition]
            tp = (topic, partition)
            first = int(mine.min())
            ranges[offset_key(*tp)] = (min(self._positions.get(tp, first), first), int(mine.max()) + 1)
            commits[tp] = int(mine.max()) + 1
        keys = np.array([offset_key(topic, p) for p in range(int(partitions.max()) + 1)], dtype=object)
        batch = decoded.with_origin(keys[partitions[valid]], offsets[valid])
        batch, seen_ids = self._drop_duplicates(batch, [r for r, ok in zip(records, valid) if ok], fresh)
        batch = batch.in_event_time_order()  # ties by partition and offset: never by when a fetch arrived
        pending: Future | None = None
        weights = np.ones(0)
        if self.features:  # a batch without an event still moves the store's watermarks past its records
            weights = popularity_weights(batch, self.models[0].roles)
            pending = self._feature_pool.submit(self._write_features_once, batch, weights, ranges)
        if needed_by_any:
            recorded = {offset_key(*tp): o for tp, o in {**self._positions, **commits}.items()}
            try:
                self._learn(batch, recorded, ranges, evaluate=needed_by_all, extra_meta={META_KEY: seen_ids})
            except OffsetsRefused as exc:
                self._wait_quietly(pending)
                if not self._after_restarts():
                    log.warning("shard %d refused offsets %s (its next: %s): rewinding", exc.shard, ranges,
                                exc.next_offsets)
                    self._resync(sorted(commits), "offsets_refused", claim=False)
                return None
            except Fenced as exc:
                self._wait_quietly(pending)
                if not self._after_restarts():
                    log.warning("fenced by shard %d: another trainer owns %s now; dropping the batch", exc.shard,
                                sorted(ranges))
                    REWINDS.labels("fenced").inc()
                    self._fenced.update(commits)
                return None
            except (ParamServerError, ConnectionError) as exc:  # a shard down or restarting
                self._wait_quietly(pending)
                if isinstance(exc, ParamServerError) and exc.kind in REFUSED_CONTENT:
                    # a learner produced what the server cannot store: this trainer's bug, not an
                    # outage. It used to be taken for one, and the batch was retried for ever
                    # under "unavailable" warnings; stopping says what is wrong
                    raise UpdatesRefused(f"the parameter server refused this batch's updates ({exc}); "
                                         f"offsets {dict(ranges)} stay uncommitted") from exc
                log.warning("parameter server unavailable (%s): waiting for it, then resuming from its offsets", exc)
                self._wait_for_param_server()
                if self.stop_requested.is_set():  # SIGTERM while waiting: the batch stays uncommitted, for the next run
                    return None
                if not self._after_restarts():
                    self._resync(self.consumer.assignment(), "param_server_error")
                return None
            for shard in self._shard_next:  # every shard now stands at or past each range's end
                for key, (_, end) in ranges.items():
                    shard[key] = max(shard.get(key, end), end)
        if fresh and not needed_by_all:  # learned before, by some shards only: no score, still history
            self.evaluator.observe(batch)
            if not needed_by_any:
                for model in self.models:
                    model.observe_history(batch)
        if self.dead_letters.count:
            self._producer.flush()
        if pending is not None:
            self._finish_features(pending, batch, weights, ranges)
        try:
            self.consumer.commit(commits)
        except KafkaError as exc:  # partitions revoked meanwhile: the new owner resumes from the server's offsets
            log.warning("commit of %s failed (%s); the stores already hold the batch exactly once", commits, exc)
        owned = set(self.consumer.assignment())
        self._positions.update({tp: o for tp, o in commits.items() if tp in owned})
        for tp, offset in commits.items():
            self._evaluated_to[tp] = max(self._evaluated_to.get(tp, 0), offset)
        return len(batch) if needed_by_any else 0

    def _wait_for_param_server(self) -> None:
        """Poll with paused partitions (the member stays in its group) until every shard answers."""
        owned = self.consumer.assignment()
        self.consumer.pause(owned)
        try:
            while not self.stop_requested.is_set():
                try:
                    self.store.watermarks()
                    return
                except (ParamServerError, ConnectionError):
                    self.consumer.poll(max_records=1, timeout_s=0.5)
        finally:
            self.consumer.resume(owned)

    def _needs(self, shard: int, records: list[Record]) -> bool:
        """Whether `shard` lacks these records (groups are uniform, so the first one decides)."""
        r = records[0]
        key = offset_key(r.topic, r.partition)
        return r.offset >= self._shard_next[shard].get(key, self._floors.get(key, 0))

    def _decode(self, records: list[Record], dead_letter: bool) -> tuple[np.ndarray, EventBatch]:
        """Which records are valid, and their events as a batch (decoded straight into columns);
        invalid records go to the dead-letter topic the first time they are consumed
        (`dead_letter`), not again on a replay."""
        events, invalid = self.schema.decode_many([record.value for record in records])
        valid = np.ones(len(records), bool)
        for n, exc in invalid:
            valid[n] = False
            if dead_letter:
                record = records[n]
                self.dead_letters.send(record.value, exc.reason,
                                       {"topic": record.topic, "partition": record.partition,
                                        "offset": record.offset}, exc.detail, key=record.key)
        return valid, events

    def _drop_duplicates(self, batch: EventBatch, records: list[Record], fresh: bool,
                         ) -> tuple[EventBatch, dict[str, Any]]:
        """The batch without events whose id occurred earlier in their partition (dedup.py), and
        the meta of the recent-id window to push with it. Duplicates go to the dead-letter topic
        and the metric the first time they are consumed (`fresh`), not again on a replay."""
        duplicate, previous = self._event_ids.duplicates(batch)
        seen_ids = self._event_ids.record(batch)
        if not duplicate.any():
            return batch, seen_ids
        if fresh:
            for n in np.flatnonzero(duplicate).tolist():
                record = records[n]
                self.dead_letters.send(record.value, REASON, {"topic": record.topic, "partition": record.partition,
                                                              "offset": record.offset},
                                       f"event_id {batch.event_id[n]!r} first at offset {previous[n]}", key=record.key)
            DUPLICATE_EVENTS.inc(int(duplicate.sum()))
        return batch.take(~duplicate), seen_ids

    def _learn(self, batch: EventBatch, offsets: dict[str, int], ranges: Mapping[str, tuple[int, int]],
               evaluate: bool, extra_meta: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        stats = learn_together(self.models, batch, offsets, ranges=ranges, extra_meta=extra_meta,
                               before_step=(lambda step: self.evaluator.before_step(batch, step)) if evaluate else None)
        PUSH_SECONDS.observe(time.perf_counter() - t0)
        if evaluate:
            self.evaluator.end_batch(batch)
        if len(batch):
            EVENT_TIME.set(batch.timestamp[-1])  # sorted by event time
        for name, s in stats.items():
            if np.isfinite(s.loss):
                self.stats.losses[name] = s.loss
                LOSS.labels(name).set(s.loss)
            if s.squared_error and evaluate:
                self.evaluator.record_ratings(s.squared_error, s.examples)
        self.evaluator.publish()

    # ---- feature store ------------------------------------------------------------------------
    def _write_features_once(self, batch: EventBatch, weights: np.ndarray, ranges: Mapping[str, tuple[int, int]],
                             rebuilt: Mapping[str, int] | None = None) -> dict[str, int]:
        """One attempt (on the feature thread, overlapping the learning); returns the partitions
        whose earlier events the store lacks although the topic holds them (a wiped store, or one
        restored from an older state: its offsets lie below `ranges`, the records this batch was
        cut from, each starting where the previous batch of the partition ended).
        `rebuilt`: partitions just rebuilt up to these offsets, which stand as their floors."""
        t0 = time.perf_counter()
        result = self.features.write(batch, weights, floors={**self._floors, **(rebuilt or {})}, ranges=ranges)
        FEATURE_SECONDS.observe(time.perf_counter() - t0)
        return result.missing

    def _wait_quietly(self, pending: Future | None) -> None:
        """Let an abandoned batch's feature write finish (the store's offsets make it harmless)."""
        if pending is not None:
            try:
                pending.result()
            except RedisError as exc:
                log.warning("feature store write of a refused batch failed: %s", exc)

    def _finish_features(self, pending: Future, batch: EventBatch, weights: np.ndarray,
                         ranges: Mapping[str, tuple[int, int]]) -> None:
        """Wait for the batch's features. A wiped store (or one that went back to an older state)
        is rebuilt from the topic first; while Redis is unreachable nothing is consumed or
        committed (backpressure): the partitions are paused and the consumer keeps polling, so
        this member stays in its group, until a write succeeds."""
        try:
            unmarked = pending.result()
        except RedisError as exc:
            unmarked = self._write_through_outage(batch, weights, ranges, exc)
        rebuilt: dict[str, int] = {}
        while unmarked:
            log.warning("feature store lacks events of %s before this batch (no offsets: wiped; offsets behind: "
                        "restored from an older state) although the topic holds them: rebuilding it from the topic",
                        sorted(unmarked.items()))
            FEATURE_REBUILDS.inc()
            written = rebuild_features(self.settings, self.features, unmarked,
                                       dedup_window_events=self.config.dedup_window_events)
            log.warning("feature store rebuilt: %d events rewritten", written)
            # everything below these offsets has been read now. Where none of it was a valid event
            # (a topic that starts with records the schema refuses) the rebuild leaves no
            # watermark, and asking again looped for ever: they are the partitions' floors now
            rebuilt |= unmarked
            unmarked = self._write_through_outage(batch, weights, ranges, None, rebuilt)

    def _write_through_outage(self, batch: EventBatch, weights: np.ndarray, ranges: Mapping[str, tuple[int, int]],
                              error: RedisError | None, rebuilt: Mapping[str, int] | None = None) -> dict[str, int]:
        """Write the batch until a write succeeds, consumption paused meanwhile. A store whose
        watermarks are corrupt (FeatureStoreCorrupt: the script wrote nothing) stops the trainer
        instead: writing again cannot help, and it took the retries for an outage for ever. (The
        script repairs every other key that holds what it cannot use, and goes on.)"""
        owned = self.consumer.assignment()
        paused = False
        attempt = 0
        while True:
            if error is None:
                try:
                    unmarked = self._write_features_once(batch, weights, ranges, rebuilt)
                    break
                except RedisError as exc:
                    error = exc
            if isinstance(error, FeatureStoreCorrupt):
                FEATURE_ERRORS.labels("refused").inc()
                log.error("feature store refused the batch (%s): fix or delete that key, then restart; offsets %s "
                          "stay uncommitted", error, dict(ranges))
                raise error
            refused = isinstance(error, ResponseError)  # Redis answered: a full, read-only or misused store
            FEATURE_ERRORS.labels("refused" if refused else "unreachable").inc()
            if refused:  # worth an operator's look every time (OOM, READONLY and BUSY pass)
                log.error("feature store refused the batch's write (%s): retrying, consumption paused", error)
            if not paused:
                log.warning("feature store %s (%s): consumption paused until a write succeeds",
                            "refused the write" if refused else "unreachable", error)
                self.consumer.pause(owned)
                FEATURE_BACKPRESSURE.set(1)
                paused = True
            error = None
            attempt += 1
            deadline = time.monotonic() + min(5.0, 0.2 * 2 ** min(attempt, 5))
            while time.monotonic() < deadline:
                self.consumer.poll(max_records=1, timeout_s=max(0.05, deadline - time.monotonic()))
            if self.stop_requested.is_set():
                raise FeatureStoreUnavailable("stopped during a feature-store outage; the batch is not committed")
        if paused:
            self.consumer.resume(owned)
            FEATURE_BACKPRESSURE.set(0)
            log.warning("feature store is back after %d failed attempts: consuming again", attempt)
        return unmarked

    def _account(self, records: list[Record], applied: int, seconds: float) -> None:
        s = self.stats
        s.consumed += len(records)
        s.applied += applied
        s.dead_lettered = self.dead_letters.count
        s.batches += 1
        s.batch_seconds.append(seconds)
        s.last_batch_at = time.monotonic()
        s.last_batch_cpu = time.process_time()
        EVENTS_CONSUMED.inc(len(records))
        EVENTS_APPLIED.inc(applied)
        EVENTS_ACCEPTED.labels("trainer").inc(applied)
        BATCH_SECONDS.observe(seconds)
        for (_, partition), lag in self._partition_lags().items():
            CONSUMER_LAG.labels(str(partition)).set(lag)

    def _partition_lags(self) -> dict[TopicPartition, int]:
        """End offset (latest fetch high-water mark) minus next offset, per partition owned."""
        lags = {}
        owned = set(self.consumer.assignment())
        for tp, position in self._positions.items():
            if tp not in owned:
                continue
            high = self.consumer.high_watermark(tp)
            if high is not None:
                lags[tp] = max(0, high - position)
        return lags

    def lag(self) -> int:
        return sum(self._partition_lags().values())

    def report(self) -> dict[str, Any]:
        s = self.stats
        elapsed = (s.last_batch_at - s.first_record_at) if s.first_record_at and s.last_batch_at else 0.0
        batch = np.array(s.batch_seconds) if s.batch_seconds else np.zeros(1)
        return {
            "consumed": s.consumed, "applied": s.applied, "dead_lettered": s.dead_lettered, "batches": s.batches,
            "events_per_second": s.consumed / elapsed if elapsed > 0 else None,
            "active_seconds": elapsed,  # first record polled to the end of the last batch (no idle start)
            "p50_batch_seconds": float(np.percentile(batch, 50)), "p99_batch_seconds": float(np.percentile(batch, 99)),
            "lag": self.lag() if self._open else None, "loss": s.losses, "prequential": self.evaluator.report(),
            "models": [m.name for m in self.models], "finished_at": time.time(),
            # wall-clock bounds of the active span, so the spans of several trainers can be combined
            "first_record_wall": _wall(s.first_record_at), "last_batch_wall": _wall(s.last_batch_at),
            "active_cpu_seconds": max(0.0, s.last_batch_cpu - s.first_record_cpu),
            "fenced_partitions": sorted(offset_key(*tp) for tp in self._fenced),
        }

    def close(self) -> None:
        self._open = False
        for follower in (self.impressions, self.exploration):
            if follower is not None:
                follower.close()
        self._feature_pool.shutdown(wait=True)
        try:
            self._producer.close()
        finally:
            self.consumer.close()


def _wall(monotonic_at: float | None) -> float | None:
    """A time.monotonic() reading as wall-clock time (None stays None)."""
    return None if monotonic_at is None else time.time() - (time.monotonic() - monotonic_at)
