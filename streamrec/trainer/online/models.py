"""Online factor models: learn a consumed batch in small sequential steps locally, push one delta.

The rows live in parameter-server tables (TorchRec's separation of tables from the models that use
them); a model pulls the rows a batch needs once, then walks the batch in steps (`steps`), each
one call of a compiled kernel (`streamrec.trainer.online.kernels`), updating its local copy, and
finally returns the change of every touched row. The
online tables use the server's SGD with learning rate 1, so a pushed "gradient" of -delta adds the
delta: concurrent trainers' updates add up, and a row the server has not created yet is created
with the same deterministic initial value the model assumed (`streamrec.param_server.table.initial_values`).

- `OnlineBPR` (implicit): x_uij = p_u . (q_i - q_j) + b_i - b_j, loss -w log sigma(x_uij) over
  `negatives` items j per positive (uniform over known items, popularity^0.75, or in-batch), and
  -log sigma(-(p_u . q_j + b_j)) for explicit negatives (skips). SGD with `lr`, L2 `reg`.
  With `impression_negatives` > 0, that many of each positive's negatives are items serving last
  showed the user and the user did not pick (`streamrec.trainer.online.shown`).
  With `session_weight` > 0 a user scores as (p_u + session_weight * mean of their current
  session's item vectors) . q_j + b_j (`streamrec.trainer.online.session`): a new user or session
  gets item-to-item recommendations from the session so far.
- `OnlineMF` (explicit ratings): r = mu + b_u + b_i + p_u . q_i with Koren's SGD defaults
  (lr 0.007, reg 0.015, bias lr 0.005, bias reg 0.005); mu is the running mean of the ratings.
"""

from __future__ import annotations

from functools import partial
from itertools import chain, repeat
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from streamrec.core.lookup import positions
from streamrec.core.params import FloatRange, IntRange, space
from streamrec.param_server.client import Rows
from streamrec.param_server.keys import as_keys
from streamrec.param_server.specs import OptimizerSpec, TableSpec
from streamrec.param_server.table import initial_values
from streamrec.param_server.table_store import TableStore
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.base import (
    OnlineParams,
    OnlineRecommender,
    StepHook,
    StepStats,
    Updates,
)
from streamrec.trainer.online.kernels import bpr_steps, mf_steps, rank_linear, scoring_vector
from streamrec.trainer.online.roles import EventRoles
from streamrec.trainer.online.sampling import NegativeSampler, SamplingMode
from streamrec.trainer.online.session import (
    SESSION_FADE,
    SESSION_GAP,
    SESSION_ITEMS,
    SESSION_WEIGHT,
    SessionTracker,
    faded_weight,
    session_ids,
)
from streamrec.trainer.online.shown import ShownItems

SMALL_LOOKUP = 16  # users: below this, row lookups go through a dict (pandas' setup costs more)
NO_ROWS = np.zeros(0, np.int64)  # a user without a session: no item rows


def _dot(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """users @ items.T in the items' precision (float32 in the mirror): a float64 user row would
    make numpy convert the whole item matrix first, five times the cost of the product itself."""
    return users.astype(items.dtype, copy=False) @ items.T


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


class LocalRows:
    """A batch's working copy of some rows: pulled values, rows the server lacks initialised as
    the server will initialise them, and the change since the pull."""

    def __init__(self, spec: TableSpec, ids: list, pulled: Rows) -> None:
        self.ids = ids
        self.index = pd.Index(ids, dtype=object)
        self.row_of = dict(zip(ids, range(len(ids))))  # the scorer's per-event lookups: dict hits, not pandas calls
        self.values = np.array(pulled.values, np.float64, order="C")  # a copy, in the kernels' layout
        if not pulled.found.all():
            missing = np.flatnonzero(~pulled.found)
            self.values[missing] = initial_values(spec, as_keys([ids[m] for m in missing]).hash64())
        self.start = self.values.copy()

    def delta_update(self) -> tuple[list, np.ndarray]:
        """(ids, -delta): with the server's SGD at lr 1 this adds exactly the local change."""
        return self.ids, (self.start - self.values).astype(np.float32)


class FactorParams(OnlineParams):
    """Table layout shared by the factor models."""

    dim: int = Field(32, ge=1)
    init_std: float = Field(0.1, ge=0.0)
    min_count: int = Field(1, ge=1)  # sightings before an id gets a row (the server's admission)
    seed: int = 0
    # every row a step touches is kept within this norm (max-norm regularisation): a burst of one
    # user's events diverged to NaN without it. Learned rows stay far inside (MovieLens 100K: 4.2)
    max_norm: float = Field(32.0, gt=0.0)


class OnlineBPRParams(FactorParams):
    lr: float = Field(0.05, gt=0.0)
    reg: float = Field(0.01, ge=0.0)
    negatives: int = Field(10, ge=0)
    sampling: SamplingMode = "uniform"
    skip_weight: float = Field(1.0, ge=0.0)
    user_iterations: int = Field(3, ge=1)  # extra passes over a step's user rows move new users faster
    # the current session's mean item vector joins the user's (0: off, nothing tracked); see docs/models.md
    session_weight: float = Field(SESSION_WEIGHT, ge=0.0)
    session_items: int = Field(SESSION_ITEMS, ge=1)  # the last items of the session that count
    session_gap: float = Field(SESSION_GAP, gt=0.0)  # seconds of event time without an event that end a session
    session_users: int = Field(100_000, ge=1)  # sessions kept, least recently active forgotten first
    # the session term fades as the user's row matures: weight * fade / (fade + the user's events); 0: no fade
    session_fade: float = Field(SESSION_FADE, ge=0.0)
    # of the `negatives` per positive, how many come from the items serving last showed the user and
    # the user did not pick (read from the impressions topic; `streamrec.trainer.online.shown`).
    # A user with none keeps sampled negatives in those slots. 0: off
    impression_negatives: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _impressions_within_negatives(self) -> OnlineBPRParams:
        if self.impression_negatives > self.negatives:
            raise ValueError(f"impression_negatives ({self.impression_negatives}) is part of negatives "
                             f"({self.negatives}): at most that many")
        return self


class OnlineMFParams(FactorParams):
    lr: float = Field(0.007, gt=0.0)
    reg: float = Field(0.015, ge=0.0)
    bias_lr: float = Field(0.005, ge=0.0)
    bias_reg: float = Field(0.005, ge=0.0)
    # a rating counts at most this far from its prediction (gradient clipping); raise it, and lower
    # lr, for scales wider than stars
    max_error: float = Field(10.0, gt=0.0)


class _FactorModel(OnlineRecommender):
    """Plumbing of the two factor models (user and item tables); not a model of its own."""

    params: FactorParams
    users: LocalRows | None = None  # the current (or last) batch's user rows

    @property
    def user_table(self) -> str:
        return f"{self.table_prefix}_users"

    @property
    def item_table(self) -> str:
        return f"{self.table_prefix}_items"

    def _spec(self, name: str, scalars: int) -> TableSpec:
        p = self.params
        return TableSpec(name=name, dim=p.dim, scalars=scalars, optimizer=OptimizerSpec("sgd", 1.0),
                         init_std=p.init_std, seed=p.seed, min_count=p.min_count)

    def user_rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Current user rows: the batch's working copy where the user is in it, else the store's."""
        if self.users is None:
            position = np.full(len(user_ids), -1)
        elif len(user_ids) <= SMALL_LOOKUP:  # the live scorer's one user per scored event
            position = np.fromiter(map(self.users.row_of.get, user_ids, repeat(-1)), np.int64, len(user_ids))
        else:  # an object Index, not an array: pandas would first infer a string dtype for the array
            position = positions(self.users.index, user_ids)
        width = self.users.values.shape[1] if self.users is not None else self.table_specs()["users"].width
        out = np.zeros((len(user_ids), width))
        local = position >= 0
        if local.any():
            out[local] = self.users.values[position[local]]
        if (~local).any():
            out[~local] = self.store.pull(self.user_table, list(user_ids[~local])).values
        return out


class OnlineBPR(_FactorModel):
    name = "online-bpr"
    Params = OnlineBPRParams
    search_space = space(lr=FloatRange(0.005, 0.5, log=True), reg=FloatRange(1e-4, 0.1, log=True),
                    negatives=IntRange(1, 30), dim=IntRange(8, 128, log=True), user_iterations=IntRange(1, 5),
                    session_weight=FloatRange(0.0, 8.0), session_fade=FloatRange(1.0, 1000.0, log=True))
    params: OnlineBPRParams

    def __init__(self, *, store: TableStore | None = None, roles: EventRoles | None = None, **params: object) -> None:
        super().__init__(store=store, roles=roles, **params)
        p = self.params
        self.sampler = NegativeSampler(p.sampling, p.seed)
        self.sessions = SessionTracker(p.session_items, p.session_gap, p.session_users) if p.session_weight else None
        self.shown = ShownItems() if p.impression_negatives else None  # filled by the trainer's ImpressionFollower

    def table_specs(self) -> dict[str, TableSpec]:
        return {"users": self._spec(self.user_table, 0), "items": self._spec(self.item_table, 1)}

    def needs(self, batch: EventBatch) -> dict[str, list]:
        return {self.user_table: list(pd.unique(batch.user_id))} if len(batch) else {}

    def _scores(self, user_ids: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        dim = self.params.dim
        return _dot(self._user_vectors(user_ids, item_rows), item_rows[:, :dim]) + item_rows[:, dim]

    def _user_vectors(self, user_ids: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """Each user's scoring vector: their row, plus their current session's (faded) mean."""
        users = self.user_rows(user_ids)[:, :self.params.dim]
        if self.sessions is not None:
            users = users + self._session_weights(user_ids)[:, None] * self._session_means(user_ids, item_rows)
        return users

    def rank_one(self, user: str, target: int, excluded: np.ndarray) -> tuple[int, int]:
        """The scores [p_u, 1] . [q_j, b_j] computed and counted in one compiled pass (`rank_linear`)."""
        items = self.items.values
        return rank_linear(self._user_vector(user, items), items, self.items.alive, self.hidden, excluded, target)

    def _user_vector(self, user: str, item_rows: np.ndarray) -> np.ndarray:
        """`_user_vectors` of one user, as `rank_linear`'s float32 [vector, 1], without the array
        plumbing (`scoring_vector` does the session's arithmetic): the live scorer asks for one
        user per scored event, where building arrays for each of the row lookup, the session
        weight and the session's grouping cost more than its score."""
        dim = self.params.dim
        row = None if self.users is None else self.users.row_of.get(user)
        vector = (self.users.values[row, :dim].astype(np.float64) if row is not None
                  else self.user_rows(np.array([user], object))[0, :dim])
        rows, weight = NO_ROWS, 0.0
        if self.sessions is not None:
            items = self.sessions.items_of(user)
            rows = np.fromiter(map(self.items.position, items), np.int64, len(items))  # -1: evicted, dropped
            weight = float(self._faded(float(self.sessions.events_of(user))))
        return scoring_vector(vector, item_rows, rows, weight)

    def _session_weights(self, user_ids: np.ndarray) -> np.ndarray:
        """Each user's `_faded` session weight."""
        events = np.fromiter(map(self.sessions.events_of, user_ids.tolist()), np.float64, len(user_ids))
        return self._faded(events)

    def _faded(self, events: np.ndarray | float) -> np.ndarray | float:
        """`session_weight`, faded by the user's events (`faded_weight`)."""
        return faded_weight(self.params.session_weight, self.params.session_fade, events)

    def _session_means(self, user_ids: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """Mean current vector of each user's session items (zero without a session); the items
        of all users are looked up in one call, one hash lookup per item."""
        dim = self.params.dim
        sessions = [self.sessions.items_of(user) for user in user_ids.tolist()]
        lengths = np.fromiter(map(len, sessions), np.int64, len(sessions))
        means = np.zeros((len(user_ids), dim))
        if not lengths.any():
            return means
        rows = np.fromiter(map(self.items.position, chain.from_iterable(sessions)), np.int64, int(lengths.sum()))
        owner = np.repeat(np.arange(len(user_ids)), lengths)[rows >= 0]  # evicted items drop out
        counts = np.bincount(owner, minlength=len(user_ids))
        present = np.flatnonzero(counts)
        if len(present):  # each user's items are contiguous: one reduceat (np.add.at costs 30x more)
            starts = (np.cumsum(counts) - counts)[present]
            means[present] = np.add.reduceat(item_rows[rows[rows >= 0], :dim], starts, axis=0) / counts[present, None]
        return means

    def observe_history(self, batch: EventBatch) -> None:
        """The negative sampler's catalogue and counts and the current sessions, which `_learn`
        builds from the events it learns, catch up on events learned before a restart: without
        them a restarted trainer draws negatives from the items seen since, and treats every user
        as having no session and no past (full session weight)."""
        weight = self.roles.positive_weight(batch.event_type, batch.value)
        self.sampler.count_items(batch.item_id[(weight > 0) | self.roles.is_negative(batch.event_type)])
        positive = np.flatnonzero(weight > 0)
        if self.shown is not None:
            self.shown.forget(batch.user_id[positive])
        if self.sessions is not None:
            self.sessions.observe(batch.user_id[positive], batch.item_id[positive], batch.timestamp[positive],
                                  session_ids(batch.context[positive]))

    def _learn(self, batch: EventBatch, rows: dict[str, Rows], before_step: StepHook | None,
               ) -> tuple[Updates, StepStats]:
        p = self.params
        dim, k, lr, reg = p.dim, p.negatives, p.lr, p.reg
        stats = StepStats(events=len(batch))
        if not len(batch):
            return {}, stats
        self.items.sync()
        weight = self.roles.positive_weight(batch.event_type, batch.value)
        skip = self.roles.is_negative(batch.event_type)
        learnable = (weight > 0) | skip
        self.sampler.count_items(batch.item_id[learnable])
        new_rows = self._add_new_items(batch.item_id[learnable])
        self.hidden = np.zeros(len(self.items.index), bool)
        self.hidden[new_rows] = True  # not yet in the stream for the events before their first one
        user_ids = self.needs(batch)[self.user_table]
        self.users = LocalRows(self.table_specs()["users"], user_ids, rows[self.user_table])
        u_all = positions(self.users.index, batch.user_id)
        i_all = self.items.positions(batch.item_id)
        # negatives for the whole batch up front: the touched item rows are then known
        positive_pos = np.flatnonzero(weight > 0)
        negatives = self.items.positions(self.sampler.sample(batch.item_id[positive_pos], (len(positive_pos), k)).ravel())
        negatives = negatives.reshape(len(positive_pos), k)
        # an item evicted meanwhile is no candidate: its pair contributes nothing
        negatives = np.where(negatives >= 0, negatives, i_all[positive_pos][:, None])
        if self.shown is not None:  # the first slots go to shown-but-not-picked items where the user has some
            shown = self.shown.take_negatives(batch.user_id[positive_pos], batch.item_id[positive_pos],
                                              p.impression_negatives, self.sampler.rng)
            shown = self.items.positions(shown.ravel()).reshape(shown.shape)
            slots = negatives[:, :p.impression_negatives]
            slots[...] = np.where(shown >= 0, shown, slots)
        touched = np.unique(np.concatenate([i_all[learnable], negatives.ravel()]))
        start_items = self.items.values[touched].astype(np.float64)
        # Users carry a constant 1 after their vector, so x = [p_u, 1] . (q_i - q_j) includes the
        # item biases and the item update needs no special bias column.
        P = np.hstack([self.users.values, np.ones((len(user_ids), 1))]).astype(np.float32)
        self.users.values = P[:, :dim]  # a view: scoring between steps sees the newest vectors
        Q = self.items.values  # the mirror's storage: updated in place
        U, I, W = u_all[positive_pos], i_all[positive_pos], weight[positive_pos].astype(np.float32)
        skip_pos = np.flatnonzero(skip)
        sessions = self.sessions
        session_of = session_ids(batch.context[positive_pos]) if sessions is not None else []
        steps = self.steps(len(batch))
        starts = [st.start for st in steps] + [len(batch)]
        bounds, skip_bounds = np.searchsorted(positive_pos, starts), np.searchsorted(skip_pos, starts)
        margins = np.zeros((len(positive_pos), k), np.float32)  # each example's, before its step: the loss
        skip_margins = np.zeros(len(skip_pos), np.float32)
        learn = partial(bpr_steps, P, Q, U, I, negatives, W, bounds, u_all[skip_pos], i_all[skip_pos], skip_bounds)
        settings = (np.float32(lr), np.float32(reg), np.float32(reg * k), np.float32(p.skip_weight), p.user_iterations,
                    np.float32(p.max_norm), margins, skip_margins)

        def observe(a: int, b: int) -> None:  # the positives a:b join their sessions once learned
            if sessions is not None:
                learned = positive_pos[a:b]
                sessions.observe(batch.user_id[learned], batch.item_id[learned], batch.timestamp[learned],
                                 session_of[a:b])

        if before_step is None:  # nobody scores between the steps (nor sees `hidden`): all in one call
            learn(0, len(steps), *settings)
            observe(0, len(positive_pos))
        else:
            # the steps holding a new item's first event, which unhide it (steps are step_events long)
            unhides = np.zeros(len(steps), bool)
            firsts = np.flatnonzero(learnable)
            unhides[firsts[self.hidden[i_all[firsts]]] // p.step_events] = True
            for n, step in enumerate(steps):
                before_step(step)
                if unhides[n]:
                    self.hidden[i_all[step][learnable[step]]] = False
                learn(n, n + 1, *settings)
                observe(bounds[n], bounds[n + 1])  # the next step's scoring sees these items
        if k and len(W):
            stats.loss_sum -= float((W[:, None] * _log_sigmoid(margins)).mean(axis=1).sum())
            stats.examples += len(W)
        if len(skip_pos):
            stats.loss_sum -= float((p.skip_weight * _log_sigmoid(skip_margins)).sum())
            stats.examples += len(skip_pos)
        self.hidden[:] = False
        item_delta = Q[touched].astype(np.float64) - start_items
        item_ids = self.items.index.to_numpy()[touched].tolist()
        return {self.user_table: self.users.delta_update(),
                self.item_table: (item_ids, (-item_delta).astype(np.float32))}, stats


class OnlineMF(_FactorModel):
    name = "online-mf"
    Params = OnlineMFParams
    search_space = space(lr=FloatRange(1e-3, 0.05, log=True), reg=FloatRange(1e-3, 0.1, log=True),
                    bias_lr=FloatRange(1e-3, 0.05, log=True), dim=IntRange(8, 128, log=True))
    params: OnlineMFParams

    def __init__(self, *, store: TableStore | None = None, roles: EventRoles | None = None, **params: object) -> None:
        super().__init__(store=store, roles=roles, **params)
        self.rating_sum = 0.0
        self.rating_count = 0

    @property
    def mu(self) -> float:
        return self.rating_sum / self.rating_count if self.rating_count else 0.0

    def table_specs(self) -> dict[str, TableSpec]:
        return {"users": self._spec(self.user_table, 1), "items": self._spec(self.item_table, 1)}

    def state(self) -> dict[str, Any]:
        return {"rating_sum": self.rating_sum, "rating_count": self.rating_count}

    def restore(self, state: dict[str, Any]) -> None:
        self.rating_sum = float(state.get("rating_sum", 0.0))
        self.rating_count = int(state.get("rating_count", 0))

    def _scores(self, user_ids: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        dim = self.params.dim
        user_rows = self.user_rows(user_ids)
        return (self.mu + user_rows[:, dim][:, None] + item_rows[:, dim][None, :]
                + _dot(user_rows[:, :dim], item_rows[:, :dim]))

    def _rated(self, batch: EventBatch) -> np.ndarray:
        return self.roles.is_rating(batch.event_type, batch.value)

    def needs(self, batch: EventBatch) -> dict[str, list]:
        rated = self._rated(batch)
        if not rated.any():
            return {}
        return {self.user_table: list(pd.unique(batch.user_id[rated])), self.item_table: list(pd.unique(batch.item_id[rated]))}

    def _learn(self, batch: EventBatch, rows: dict[str, Rows], before_step: StepHook | None,
               ) -> tuple[Updates, StepStats]:
        p = self.params
        rated = self._rated(batch)
        stats = StepStats(events=len(batch))
        steps = self.steps(len(batch))
        if not rated.any():  # nothing to learn; the hook still sees every step
            for step in steps:
                if before_step is not None:
                    before_step(step)
            return {}, stats
        needs = self.needs(batch)
        specs = self.table_specs()
        users = self.users = LocalRows(specs["users"], needs[self.user_table], rows[self.user_table])
        items = LocalRows(specs["items"], needs[self.item_table], rows[self.item_table])
        pos = np.flatnonzero(rated)
        bounds = np.searchsorted(pos, [st.start for st in steps] + [len(batch)])
        learn = partial(mf_steps, users.values, items.values, positions(users.index, batch.user_id[pos]),
                        positions(items.index, batch.item_id[pos]), batch.value[pos], bounds)
        # predict first, then learn, per step: mu (the running mean) includes the earlier steps' ratings
        for first, last in [(0, len(steps))] if before_step is None else [(n, n + 1) for n in range(len(steps))]:
            if before_step is not None:
                before_step(steps[first])
            self.rating_sum, self.rating_count, squared = learn(first, last, p.lr, p.reg, p.bias_lr, p.bias_reg,
                                                                self.rating_sum, self.rating_count, p.max_error,
                                                                p.max_norm)
            stats.squared_error += squared
            stats.loss_sum += squared
        stats.examples += len(pos)
        return {self.user_table: users.delta_update(), self.item_table: items.delta_update()}, stats
