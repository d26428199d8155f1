"""`OnlineRecommender`: the one interface of online models (River's `learn_many`, implicit's scores).

An online model learns a stream of `EventBatch`es in order and can score items for users at any
moment between (or, through a step hook, within) batches. Its parameters live in parameter-server
tables (a `TableStore`: the network `ParamClient`, or the in-process `LocalStore` by default), so
the live trainer and `streamrec evaluate --protocol prequential` run the same code; only a small
JSON `state()` (e.g. a running mean) travels beside the Kafka offsets in the push's meta record.

Construction is shared with the batch models: `cls(**hyperparams, store=..., roles=...)`, the
hyper-parameters declared by the pydantic class attribute `Params` and validated on construction.

Learning one batch is three hooks, so that several models can share ONE pull and ONE push (the
push carries every model's deltas, the offsets and the event count atomically): `needs` (rows to
pull), `learn_pulled` (walk the batch in steps on the pulled rows, return the deltas) and the push
in `learn_together`. `learn_many` is that for a single model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from streamrec.core.params import ModelParams, SearchSpace, parse_params, space
from streamrec.param_server.client import Delta, Rows
from streamrec.param_server.keys import Keys
from streamrec.param_server.local_store import LocalStore
from streamrec.param_server.replica import TableMirror
from streamrec.param_server.specs import TableSpec
from streamrec.param_server.table import initial_values
from streamrec.param_server.table_store import TableStore
from streamrec.stream.events import EventBatch
from streamrec.stream.loaders import id_codes
from streamrec.trainer.online.kernels import rank_count
from streamrec.trainer.online.roles import EventRoles
from streamrec.trainer.online.shown import ShownItems

Updates = dict[str, tuple[list, np.ndarray]]  # table -> (ids, gradients to push)
StepHook = Callable[[slice], None]  # called before each step learns events[slice]


class OnlineParams(ModelParams):
    """Hyper-parameters every online model has."""

    step_events: int = Field(10, ge=1)  # events learned per vectorised step (see `steps`)


@dataclass(frozen=True)
class ItemScores:
    """Scores of some users over the items a model holds: `scores[r, c]` is row r's score of
    `item_ids[c]`. -inf marks an item the model holds but does not know yet (or any more)."""

    item_ids: pd.Index
    scores: np.ndarray  # (users, len(item_ids))


@dataclass
class StepStats:
    events: int = 0
    examples: int = 0  # positives (BPR), ratings (MF) or counted events (popularity) learned
    loss_sum: float = 0.0  # summed loss of the examples, each before its step's update
    squared_error: float = 0.0  # MF: summed squared error of predict-then-learn

    @property
    def loss(self) -> float:
        return self.loss_sum / self.examples if self.examples else float("nan")


class OnlineRecommender(ABC):
    """Base of every online model. Subclasses declare `name`, `Params`, their tables
    (`table_specs`, with an "items" table that the model mirrors to rank every item) and implement
    `_learn` and `_scores`."""

    name: ClassVar[str]
    Params: ClassVar[type[OnlineParams]]
    search_space: ClassVar[SearchSpace] = space()  # where `streamrec tune` looks; empty: nothing to tune

    def __init__(self, *, store: TableStore | None = None, roles: EventRoles | None = None, **params: object) -> None:
        self.params = parse_params(self.Params, params, self.name)
        self.store: TableStore = LocalStore() if store is None else store
        self.roles = roles or EventRoles()
        self.create_tables()
        self.items = TableMirror(self.store, self.table_specs()["items"].name)  # every item's row, for rankings
        self.hidden = np.zeros(0, bool)  # item rows added for this batch whose first event is not reached yet
        self._mid_batch = False
        # what serving showed each user, for models that learn from impressions (the trainer's
        # ImpressionFollower fills it); None: the model does not read impressions
        self.shown: ShownItems | None = None

    def create_tables(self) -> None:
        """Create the model's tables (idempotent): at construction, and again after a shard of
        the store restarted empty."""
        for spec in self.table_specs().values():
            self.store.create_table(spec.name, spec.dim, scalars=spec.scalars, optimizer="sgd", lr=1.0,
                                    init_std=spec.init_std, seed=spec.seed, min_count=spec.min_count)

    @property
    def table_prefix(self) -> str:
        """`online-bpr` keeps its rows in `bpr_users` / `bpr_items` (the tables serving reads)."""
        return self.name.removeprefix("online-")

    # ---- tables -------------------------------------------------------------------------------
    @abstractmethod
    def table_specs(self) -> dict[str, TableSpec]:
        """The model's tables by role ("items", and "users" where it has user rows)."""

    def needs(self, batch: EventBatch) -> dict[str, list]:
        """Rows to pull before learning `batch` (one round trip for every model together)."""
        return {}

    def _add_new_items(self, item_ids: np.ndarray) -> np.ndarray:
        """Items the mirror lacks join it with their server-side initial value; returns their rows
        (hidden until the step of their first event, so earlier events cannot rank them)."""
        new = np.asarray(pd.unique(item_ids[self.items.positions(item_ids) < 0]), dtype=object)
        if not len(new):
            return np.zeros(0, np.int64)
        keys = Keys.from_strings(new.tolist())
        spec = self.table_specs()["items"]
        values = initial_values(spec, keys.hash64())
        changes = self.items.apply(Delta(values=values, found=np.ones(len(new), bool), dim=spec.dim, ids=keys,
                                         deleted=Keys.empty("str"), version=self.items.version, full=False))
        return changes.upserted

    def steps(self, n: int) -> list[slice]:
        """A batch is learned in steps of `step_events` events, 10 by default: the prequential
        protocol's granularity. On MovieLens a user's next item is best predicted from their last
        few events; learning a 256-event micro-batch at once drops prequential hr@10 from 0.12 to
        0.06-0.08 (measured), while steps of 10 keep it, at numpy speed, without a round trip each."""
        size = self.params.step_events
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    # ---- learning -----------------------------------------------------------------------------
    def learn_many(self, batch: EventBatch) -> StepStats:
        """Learn the events of `batch` in order: one pull, vectorised local steps, one push."""
        return learn_together([self], batch)[self.name]

    def learn_pulled(self, batch: EventBatch, rows: dict[str, Rows], before_step: StepHook | None = None,
                     ) -> tuple[Updates, StepStats]:
        """Learn `batch` from the rows pulled for `needs(batch)`; returns the deltas to push.
        `before_step(step)` runs before each step learns (prequential scoring sees every event
        before it is learned); scores asked meanwhile come from the local working copy."""
        self._mid_batch = True
        try:
            return self._learn(batch, rows, before_step)
        finally:
            self._mid_batch = False

    @abstractmethod
    def _learn(self, batch: EventBatch, rows: dict[str, Rows], before_step: StepHook | None,
               ) -> tuple[Updates, StepStats]:
        """Walk the batch in `steps`, calling `before_step` before each; return deltas and statistics."""

    # ---- scoring ------------------------------------------------------------------------------
    def score_users(self, user_ids: np.ndarray) -> ItemScores:
        """Scores of `user_ids` over every item the model holds, from its newest state (between
        batches: the store's, synced; within one: the local copy). Users without a row score like
        a zero vector (the items' biases: a learned popularity prior for cold users)."""
        self.scoring_index()
        return self._scores_as_held(user_ids)

    def _scores_as_held(self, user_ids: np.ndarray) -> ItemScores:
        """`score_users` against the item rows as the mirror holds them now (no sync). A model
        without item rows yet scores nothing (online MF ranking first on a log of clicks only:
        its mirror had no width, and indexing the bias column raised)."""
        if not len(self.items.index):
            return ItemScores(self.items.index, np.zeros((len(user_ids), 0)))
        scores = np.array(self._scores(np.asarray(user_ids, dtype=object), self.items.values), np.float64)
        scores[:, ~self.items.alive] = -np.inf
        if len(self.hidden) == scores.shape[1] and self.hidden.any():
            scores[:, self.hidden] = -np.inf
        return ItemScores(self.items.index, scores)

    def scoring_index(self) -> pd.Index:
        """The items `score_users` and `rank_one` score, in their column order, from the newest
        state (synced first between batches)."""
        if not self._mid_batch:
            self.items.sync()
        return self.items.index

    def rank_one(self, user: str, target: int, excluded: np.ndarray) -> tuple[int, int]:
        """The prequential count of one scored event (`kernels.rank_count`): how many candidates
        of `user` score above column `target` of the index `scoring_index()` returned and how many
        others tie it, the columns `excluded` left out. It ranks against the items as that call
        left them (no second sync: the columns name that index). The live trainer asks this
        before every tenth step, so models whose scores are linear override it with one compiled
        pass."""
        scores = self._scores_as_held(np.array([user], object))
        return rank_count(np.ascontiguousarray(scores.scores[0]), excluded, target)

    @abstractmethod
    def _scores(self, user_ids: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """(users, items) scores against the mirrored item rows (vectors then scalars)."""

    def observe_history(self, batch: EventBatch) -> None:
        """Events the parameter server learned before this process started, read again after a
        restart (warmup.py): what the model derives from the stream as it learns and the server
        does not keep (a sampler's catalogue, current sessions) catches up, nothing is learned.
        Models without such caches have nothing to do."""

    # ---- state beside the offsets --------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Small JSON state kept beside the offsets in the parameter server's meta record."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Inverse of `state` (after a restart)."""


def meta_record(models: Sequence[OnlineRecommender], offsets: dict[str, int] | None = None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The meta pushed with every batch: the consumed offsets, each model's state, and the
    trainer's own state beside them (`extra`, e.g. its recent event ids)."""
    return {"offsets": offsets or {}, "models": {m.name: m.state() for m in models}, **(extra or {})}


def restore_states(models: Sequence[OnlineRecommender], meta: dict[str, Any] | None) -> None:
    """Give each model its state back from a meta record written by `meta_record`."""
    states = (meta or {}).get("models") or {}
    for model in models:
        model.restore(states.get(model.name, {}))


def learn_together(models: Sequence[OnlineRecommender], batch: EventBatch, offsets: dict[str, int] | None = None,
                   before_step: StepHook | None = None,
                   ranges: Mapping[str, tuple[int, int]] | None = None,
                   extra_meta: Mapping[str, Any] | None = None) -> dict[str, StepStats]:
    """Several models on one store learn `batch`: one pull of every model's rows, each learns
    (the first, the ranker, calls `before_step`), then ONE push: the deltas, the offsets and the
    applied-event count land together, so a checkpoint never holds one without the others.

    `ranges` (partition key -> [first, next) offsets the batch covers) makes the push exactly-once
    on every shard: a shard applies it only if it continues exactly where the shard stands, skips
    it if it already has it, and refuses anything else (see docs/operations.md). The push then also
    carries the batch's events per item, the independent count the chaos suite checks. `extra_meta`
    joins the meta record of the same push."""
    store = models[0].store
    if any(model.store is not store for model in models):
        raise ValueError("models learning together must share one store")
    needs = {table: ids for model in models for table, ids in model.needs(batch).items()}
    rows = store.pull_many(needs) if needs else {}
    updates: Updates = {}
    stats = {}
    for model in models:
        model_updates, stats[model.name] = model.learn_pulled(batch, rows, before_step if model is models[0] else None)
        updates.update(model_updates)
    event_time = float(batch.timestamp.max()) if len(batch) else None
    if ranges is None:
        store.push(updates, meta=meta_record(models, offsets, extra_meta), events=len(batch), event_time=event_time)
    else:
        codes, items = id_codes(batch.item_id)  # never fixed-width strings: they cut trailing NULs
        store.push(updates, meta=meta_record(models, offsets, extra_meta), events=len(batch), event_time=event_time,
                   ranges=ranges, item_counts=(items.tolist(), np.bincount(codes, minlength=len(items))))
    return stats
