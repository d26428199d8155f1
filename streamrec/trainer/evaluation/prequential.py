"""The prequential protocol (test-then-train, EVALUATION.md): the ONE computation behind
`streamrec evaluate --protocol prequential`, the live trainer's metrics and the demo's refit curves.

Rules, the same for all three callers:
- the stream is time-ordered; every `every`-th event (stream positions 0, 10, 20, ...) is due, and
  is scored BEFORE the model learns it;
- only positive events are scored (a skip is learned, not predicted);
- an event whose item the user already interacted with earlier in the stream is a
  re-consumption: it is learned but NOT evaluated (predicting repeats is a different task), and
  the evaluated positions stay every `every`-th event of the stream (a skipped one is not
  replaced by the next event);
- candidates are the items the model holds minus the user's earlier items; the target ranks by
  its score among them, ties counted as the expected rank under a random order of the tied
  items. An item the model has not seen (not held, or held at -inf) ranks below every candidate
  it knows and is a miss: the model cannot put it in a list. EVALUATION.md allows ranking it below
  all others, unseen items included, which is a miss wherever more than 10 candidates remain; live,
  where the catalogue to come is unknown, it is always one. Counting it just below the known ones
  instead scored a one-user log (every item new, no candidate left) at hr@10 = 1.0.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import pandas as pd

from streamrec.core.progress import track
from streamrec.param_server.defaults import MAX_CLOCK_SKEW
from streamrec.stream.events import EventBatch
from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.evaluation.metrics import expected_hit, expected_ndcg
from streamrec.trainer.online.base import ItemScores, OnlineRecommender
from streamrec.trainer.online.kernels import UNSERVABLE, rank_count
from streamrec.trainer.online.roles import EventRoles

EVAL_EVERY = 10
K = 10
SMALL_CHUNK = 16  # events: below this, history updates go pair by pair
ScoreFn = Callable[[np.ndarray], ItemScores]  # user ids -> their scores over the items a model holds
Scored = ScoreFn | OnlineRecommender  # what the scorer ranks with: scores, or an online model that ranks itself
Row = tuple[int, int, int, float]  # a scored event: stream position, greater, ties, event time


def _served(greater: int, ties: int) -> tuple[int, int]:
    """`rank_count`'s counts as a served list sees them: a target the model cannot serve
    (`UNSERVABLE`) ranks past the last of the `K` slots, whatever number of candidates it knows."""
    return (max(greater, K), 0) if ties == UNSERVABLE else (greater, ties)


def _columns_of(items: Collection[str], columns: Mapping[str, int]) -> np.ndarray:
    """The columns of the held ones of `items` (an item not held has none)."""
    cols = np.fromiter(map(columns.get, items, repeat(-1)), np.int64, len(items))
    return cols[cols >= 0]


class ColumnLookup:
    """Item id -> column of an item index, as a dict rebuilt only when a different index arrives.

    A mirror's index is immutable (items joining replace it), so between joins the per-event
    lookups of the live scorer are dict hits instead of a pandas Index built per scored event
    (which cost a third of the trainer's time). Each index it takes gets a `generation` number,
    unique in the process, by which caches tell indexes apart without holding on to them."""

    _generations = itertools.count(1)

    def __init__(self) -> None:
        self._index: pd.Index | None = None
        self.columns: dict[str, int] = {}
        self.generation = 0  # none yet

    def __call__(self, index: pd.Index) -> dict[str, int]:
        if index is not self._index:
            self._index, self.columns = index, dict(zip(index.tolist(), range(len(index))))
            self.generation = next(self._generations)
        return self.columns


@dataclass(frozen=True)
class Evaluated:
    """Scored events: stream position, event time and rank counts (hit/ndcg are derived)."""

    position: np.ndarray  # int64
    timestamp: np.ndarray  # float64
    greater: np.ndarray  # int64
    ties: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.position)

    @classmethod
    def concat(cls, parts: Sequence[Evaluated]) -> Evaluated:
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("position", "timestamp", "greater", "ties")))

    @property
    def hit(self) -> np.ndarray:
        """Expected hit@10 of each event (ties in random order)."""
        return expected_hit(self.greater, self.ties, K)

    @property
    def ndcg(self) -> np.ndarray:
        """Expected ndcg@10 of each event (ties in random order)."""
        return expected_ndcg(self.greater, self.ties, K)


class _UserItems:
    """One user's earlier items: the set (the re-consumption test), the same items in the order
    they arrived, and per model the columns of the first `n` of them in that model's item index
    (so a scored event maps only the items that arrived since the user's last scored event). The
    index is named by its `ColumnLookup.generation`: holding the index itself kept every replaced
    one alive (with its hash table) for as long as a user who was scored against it was remembered:
    in a simulation of the soak (10k to 100k items, 100k users remembered) 85 replaced indexes held
    213 of the scorer's 298 MB."""

    __slots__ = ("columns", "items", "order")

    def __init__(self) -> None:
        self.items: set[str] = set()
        self.order: list[str] = []
        self.columns: dict[str, tuple[int, int, np.ndarray]] = {}  # model -> (generation, n, columns)

    def add(self, item: str) -> None:
        if item not in self.items:
            self.items.add(item)
            self.order.append(item)


_NO_COLUMNS = np.zeros(0, np.int64)


class EarlierItems:
    """Each user's items so far in the stream: the excluded candidates and the re-consumption test.
    With `max_users` (a live stream never ends) the least recently active users are forgotten,
    with their cached columns."""

    def __init__(self, max_users: int | None = None) -> None:
        self.max_users = max_users
        self._items: OrderedDict[str, _UserItems] = OrderedDict()

    def of(self, user: str) -> Collection[str]:
        known = self._items.get(user)
        return () if known is None else known.items

    def columns(self, user: str, model: str, lookup: ColumnLookup) -> np.ndarray:
        """The columns of `user`'s earlier items held in the index `lookup` took last, cached per
        model: a new index (items joined) maps the whole history again, otherwise only the items
        that arrived since the last call."""
        known = self._items.get(user)
        if known is None:
            return _NO_COLUMNS
        generation, n, cols = known.columns.get(model, (0, 0, _NO_COLUMNS))
        if generation != lookup.generation:
            n, cols = 0, _NO_COLUMNS
        if n < len(known.order):
            cols = np.concatenate([cols, _columns_of(known.order[n:], lookup.columns)])
            known.columns[model] = (lookup.generation, len(known.order), cols)
        return cols

    def add(self, users: np.ndarray, items: np.ndarray) -> None:
        """Record events (in stream order): one update per user of the chunk."""
        if not len(users):
            return
        if len(users) <= SMALL_CHUNK:  # the live trainer's steps: pandas' setup would cost more than the work
            for user, item in zip(users.tolist(), items.tolist()):
                self._known(user).add(item)
            return
        codes, uniques = pd.factorize(users)
        order = np.argsort(codes, kind="stable")
        groups = np.split(items[order], np.cumsum(np.bincount(codes))[:-1])
        for user, group in zip(uniques, groups):
            known = self._known(user)
            for item in group.tolist():
                known.add(item)

    def _known(self, user: str) -> _UserItems:
        """The user's items, created (forgetting the least recently active user beyond `max_users`)
        or marked as the most recently active."""
        known = self._items.get(user)
        if known is None:
            known = self._items[user] = _UserItems()
            if self.max_users is not None and len(self._items) > self.max_users:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(user)
        return known


class PrequentialScorer:
    """Walks the stream chunk by chunk, scoring each due event with every given model before the
    event joins the user's history; the caller lets the models learn a chunk after scoring it."""

    def __init__(self, every: int = EVAL_EVERY, roles: EventRoles | None = None, max_users: int | None = None) -> None:
        self.every = every
        self.roles = roles or EventRoles()
        self.position = 0  # stream position of the next event
        self.history = EarlierItems(max_users)
        self._columns: dict[str, ColumnLookup] = {}  # per model

    def pass_unscored(self, events: EventBatch, start: int, stop: int) -> None:
        """Rows start..stop-1 of `events` pass without being scored: they still become the users'
        earlier items."""
        self._pass(events.user_id[start:stop], events.item_id[start:stop])

    def _pass(self, users: np.ndarray, items: np.ndarray) -> None:
        self.history.add(users, items)
        self.position += len(users)

    def evaluate(self, events: EventBatch, models: Mapping[str, Scored]) -> dict[str, Evaluated]:
        """Score the due events of `events` (the next events of the stream, not learned yet) with
        each model, then record all of them as history. One scoring per evaluated event."""
        found: dict[str, list[Row]] = {name: [] for name in models}
        self.evaluate_span(events, 0, len(events), models, found)
        return {name: evaluated_rows(rows) for name, rows in found.items()}

    def evaluate_span(self, events: EventBatch, start: int, stop: int, models: Mapping[str, Scored],
                      found: Mapping[str, list[Row]]) -> None:
        """`evaluate` of rows start..stop-1 of `events`, appending each model's scored rows
        (position, greater, ties, timestamp) to `found[model]`: the live trainer's steps pass
        their batch without slicing it and build arrays once per batch."""
        observed = start
        if models:
            for q in range(start + (-self.position % self.every), stop, self.every):
                if events.event_type[q] not in self.roles.positive_types:
                    continue
                self._pass(events.user_id[observed:q], events.item_id[observed:q])
                observed = q
                user, item = events.user_id[q], events.item_id[q]
                if item in self.history.of(user):  # a re-consumption: learned, not evaluated
                    continue
                for name, model in models.items():
                    lookup = self._columns.setdefault(name, ColumnLookup())
                    ranks_itself = isinstance(model, OnlineRecommender)  # one compiled pass where it can
                    scores = None if ranks_itself else model(np.array([user], object))
                    target = lookup(model.scoring_index() if scores is None else scores.item_ids).get(item, -1)
                    excluded = self.history.columns(user, name, lookup)
                    greater, ties = _served(*(model.rank_one(user, target, excluded) if scores is None else
                                              rank_count(np.ascontiguousarray(scores.scores[0]), excluded, target)))
                    found[name].append((self.position, greater, ties, float(events.timestamp[q])))
        self.pass_unscored(events, observed, stop)


def evaluated_rows(rows: list[Row]) -> Evaluated:
    """Scored rows (`Row`) as arrays."""
    if not rows:
        return Evaluated.concat([])
    position, greater, ties, timestamp = (np.array(column) for column in zip(*rows))
    return Evaluated(position.astype(np.int64), timestamp.astype(np.float64), greater.astype(np.int64),
                     ties.astype(np.int64))


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def prequential_metrics(evaluated: Evaluated, n_events: int) -> dict[str, float | int | None]:
    """EVALUATION.md's metrics: means over the second half of the stream and over all of it; null
    where nothing was evaluated (every due event a repeat, say), which 0.0 would report as a miss."""
    late = evaluated.position >= n_events / 2
    hits, ndcgs = evaluated.hit, evaluated.ndcg
    return {
        "hr@10_second_half": _mean(hits[late]), "ndcg@10_second_half": _mean(ndcgs[late]),
        "hr@10_all": _mean(hits), "ndcg@10_all": _mean(ndcgs),
        "evaluated_events": len(evaluated), "evaluated_second_half": int(late.sum()),
    }


def check_event_times(log: InteractionLog) -> None:
    """The online models learn through a parameter server, which stamps its writes with event times
    in epoch seconds from 0 to a day ahead of now (a later one would expire its rows for good); a
    log outside that is refused up front, with its first such row, instead of halfway through."""
    outside = (log.timestamp < 0) | (log.timestamp > time.time() + MAX_CLOCK_SKEW)
    if outside.any():
        row = int(np.argmax(outside))
        raise ValueError(f"the prequential protocol needs event times in epoch seconds between 0 and a day from now; "
                         f"{int(outside.sum())} of {len(log)} events are outside, the first at {log.timestamp[row]:.0f} "
                         f"(user {log.user_id[row]!r}, item {log.item_id[row]!r}): shift the log's times")


def check_event_types(log: InteractionLog, roles: EventRoles) -> None:
    """Events of a type the online models neither learn from nor score (`play`, `View`) were
    passed over without a word: a log of nothing else evaluated nothing and exited 0. A log of
    nothing else is refused; a log with some is evaluated, with their count announced, as the
    live trainer learns nothing from them either."""
    if log.event_type is None or not len(log):
        return
    known = roles.positive_types | roles.negative_types | roles.rating_types
    types, counts = np.unique(np.asarray(log.event_type, dtype=str), return_counts=True)
    unused = {kind: int(count) for kind, count in zip(types.tolist(), counts.tolist()) if kind not in known}
    if not unused:
        return
    listed = ", ".join(f"{kind!r} x{count:,}" for kind, count in sorted(unused.items(), key=lambda kv: -kv[1])[:10])
    if sum(unused.values()) == len(log):
        raise ValueError(f"no event of the log has a type the online models learn from ({', '.join(sorted(known))}); "
                         f"its types: {listed}. Rename them in the log (types are case-sensitive)")
    print(f"note: {sum(unused.values()):,} of {len(log):,} events have a type the online models neither learn "
          f"from nor score ({listed}); known: {', '.join(sorted(known))}", file=sys.stderr)


def run_prequential(model: OnlineRecommender, log: InteractionLog) -> dict[str, Any]:
    """Feed the log (already in the protocol's order) through `model` in chunks of `EVAL_EVERY`
    events: each chunk's due event is scored, then the model learns the chunk (the protocol
    allows micro-batches up to 256; 10 keeps each evaluated event's predecessors learned)."""
    check_event_times(log)
    check_event_types(log, model.roles)
    stream = EventBatch.from_log(log)
    scorer = PrequentialScorer(EVAL_EVERY, model.roles)
    models: dict[str, Scored] = {model.name: model}
    parts = []
    learn_seconds, eval_seconds = 0.0, 0.0
    n = len(stream)
    for start in track(range(0, n, EVAL_EVERY), "prequential", total=-(-n // EVAL_EVERY)):
        chunk = stream.take(slice(start, start + EVAL_EVERY))
        t0 = time.perf_counter()
        parts.append(scorer.evaluate(chunk, models)[model.name])
        eval_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        model.learn_many(chunk)
        learn_seconds += time.perf_counter() - t0
    return {
        "metrics": prequential_metrics(Evaluated.concat(parts), n),
        "fit_seconds": learn_seconds,
        "eval_seconds": eval_seconds,
        "events_per_second": n / learn_seconds if learn_seconds > 0 else None,
    }
