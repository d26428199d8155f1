"""Online factor models: learn a consumed batch in small sequential steps locally, push one delta.

The rows live in parameter-server tables (TorchRec's separation of tables from the models that use
them); a model pulls the rows a batch needs once, then walks the batch in steps (`steps`), each
vectorised, updating its local copy, and finally returns the change of every touched row. The
online tables use the server's SGD with learning rate 1, so a pushed "gradient" of -delta adds the
delta: concurrent trainers' updates add up, and a row the server has not created yet is created
with the same deterministic initial value the model assumed (`streamrec.param_server.table.initial_values`).

- `OnlineBPR` (implicit): x_uij = p_u . (q_i - q_j) + b_i - b_j, loss -w log sigma(x_uij) over
  `negatives` items j per positive (uniform over known items, popularity^0.75, or in-batch), and
  -log sigma(-(p_u . q_j + b_j)) for explicit negatives (skips). SGD with `lr`, L2 `reg`.
- `OnlineMF` (explicit ratings): r = mu + b_u + b_i + p_u . q_i with Koren's SGD defaults
  (lr 0.007, reg 0.015, bias lr 0.005, bias reg 0.005); mu is the running mean of the ratings.
"""

from __future__ import annotations

from itertools import repeat
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field
from scipy.special import expit

from streamrec.core.params import FloatRange, IntRange, space
from streamrec.param_server.client import Rows
from streamrec.param_server.keys import as_keys
from streamrec.param_server.optimizers import OptimizerSpec
from streamrec.param_server.table import TableSpec, initial_values
from streamrec.param_server.table_store import TableStore
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.base import (
    OnlineParams,
    OnlineRecommender,
    StepHook,
    StepStats,
    Updates,
)
from streamrec.trainer.online.roles import EventRoles
from streamrec.trainer.online.sampling import NegativeSampler, SamplingMode

SMALL_LOOKUP = 16  # users: below this, row lookups go through a dict (pandas' setup costs more)


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
        self.values = pulled.values.astype(np.float64)
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


class OnlineBPRParams(FactorParams):
    lr: float = Field(0.05, gt=0.0)
    reg: float = Field(0.01, ge=0.0)
    negatives: int = Field(10, ge=0)
    sampling: SamplingMode = "uniform"
    skip_weight: float = Field(1.0, ge=0.0)
    user_iterations: int = Field(3, ge=1)  # extra passes over a step's user rows move new users faster


class OnlineMFParams(FactorParams):
    lr: float = Field(0.007, gt=0.0)
    reg: float = Field(0.015, ge=0.0)
    bias_lr: float = Field(0.005, ge=0.0)
    bias_reg: float = Field(0.005, ge=0.0)


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
            position = self.users.index.get_indexer(pd.Index(user_ids, dtype=object))
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
                    negatives=IntRange(1, 30), dim=IntRange(8, 128, log=True), user_iterations=IntRange(1, 5))
    params: OnlineBPRParams

    def __init__(self, *, store: TableStore | None = None, roles: EventRoles | None = None, **params: object) -> None:
        super().__init__(store=store, roles=roles, **params)
        self.sampler = NegativeSampler(self.params.sampling, self.params.seed)

    def table_specs(self) -> dict[str, TableSpec]:
        return {"users": self._spec(self.user_table, 0), "items": self._spec(self.item_table, 1)}

    def needs(self, batch: EventBatch) -> dict[str, list]:
        return {self.user_table: list(pd.unique(batch.user_id))} if len(batch) else {}

    def _scores(self, user_ids: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        dim = self.params.dim
        return _dot(self.user_rows(user_ids)[:, :dim], item_rows[:, :dim]) + item_rows[:, dim]

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
        u_all = self.users.index.get_indexer(batch.user_id)
        i_all = self.items.positions(batch.item_id)
        # negatives for the whole batch up front: the touched item rows are then known
        positive_pos = np.flatnonzero(weight > 0)
        negatives = self.items.positions(self.sampler.sample(batch.item_id[positive_pos], (len(positive_pos), k)).ravel())
        negatives = negatives.reshape(len(positive_pos), k)
        # an item evicted meanwhile is no candidate: its pair contributes nothing
        negatives = np.where(negatives >= 0, negatives, i_all[positive_pos][:, None])
        touched = np.unique(np.concatenate([i_all[learnable], negatives.ravel()]))
        start_items = self.items.values[touched].astype(np.float64)
        # Users carry a constant 1 after their vector, so x = [p_u, 1] . (q_i - q_j) includes the
        # item biases and the item update needs no special bias column.
        P = np.hstack([self.users.values, np.ones((len(user_ids), 1))]).astype(np.float32)
        self.users.values = P[:, :dim]  # a view: scoring between steps sees the newest vectors
        Q = self.items.values  # the mirror's storage: updated in place
        U, I, W = u_all[positive_pos], i_all[positive_pos], weight[positive_pos].astype(np.float32)
        skip_pos = np.flatnonzero(skip)
        steps = self.steps(len(batch))
        bounds = np.searchsorted(positive_pos, [st.start for st in steps] + [len(batch)])
        skip_bounds = np.searchsorted(skip_pos, [st.start for st in steps] + [len(batch)])
        margins = []
        lr32, reg_k, reg32 = np.float32(lr), np.float32(reg * k), np.float32(reg)
        user_iterations = p.user_iterations
        for n, step in enumerate(steps):
            if before_step is not None:
                before_step(step)
            self.hidden[i_all[step][learnable[step]]] = False
            a, b = bounds[n], bounds[n + 1]
            if b > a and k:
                u, i, j, w = U[a:b], I[a:b], negatives[a:b], W[a:b]
                pu, qi, qj = P[u], Q[i], Q[j]
                diff = qi[:, None, :] - qj  # (n, k, dim + 1)
                x = np.einsum("nd,nkd->nk", pu, diff)
                margins.append((x, w))
                g = w[:, None] * expit(-x)  # minus the derivative of -w log sigma(x)
                item_steps = np.concatenate([g.sum(axis=1)[:, None] * pu - reg_k * qi,
                                             (-(g[..., None] * pu[:, None, :]) - reg32 * qj).reshape(-1, dim + 1)])
                for iteration in range(user_iterations):  # extra passes move new users faster
                    if iteration:
                        pu = P[u]
                        g = w[:, None] * expit(-np.einsum("nd,nkd->nk", pu, diff))
                    user_step = np.einsum("nk,nkd->nd", g, diff) - reg_k * pu
                    user_step[:, dim] = 0.0  # the constant stays 1
                    np.add.at(P, u, lr32 * user_step)
                np.add.at(Q, np.concatenate([i, j.ravel()]), lr32 * item_steps)
            a, b = skip_bounds[n], skip_bounds[n + 1]
            if b > a:
                u, j = u_all[skip_pos[a:b]], i_all[skip_pos[a:b]]
                pu, qj = P[u], Q[j]
                s = np.einsum("nd,nd->n", pu, qj)
                margins.append((-s, np.full(len(s), p.skip_weight, np.float32)))
                g = p.skip_weight * expit(s)  # derivative of -log sigma(-s)
                user_step = -(g[:, None] * qj + reg32 * pu)
                user_step[:, dim] = 0.0
                np.add.at(P, u, lr32 * user_step)
                np.add.at(Q, j, -lr32 * (g[:, None] * pu + reg32 * qj))
        for x, w in margins:  # the loss, from the margins each example had before its step
            stats.loss_sum -= float((w[:, None] * _log_sigmoid(x.reshape(len(w), -1))).mean(axis=1).sum())
            stats.examples += len(w)
        self.hidden[:] = False
        item_delta = Q[touched].astype(np.float64) - start_items
        item_ids = list(self.items.index[touched])
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
        dim = p.dim
        rated = self._rated(batch)
        stats = StepStats(events=len(batch))
        if not rated.any():  # nothing to learn; the hook still sees every step
            for step in self.steps(len(batch)):
                if before_step is not None:
                    before_step(step)
            return {}, stats
        needs = self.needs(batch)
        specs = self.table_specs()
        users = self.users = LocalRows(specs["users"], needs[self.user_table], rows[self.user_table])
        items = LocalRows(specs["items"], needs[self.item_table], rows[self.item_table])
        u_all = users.index.get_indexer(batch.user_id)
        i_all = items.index.get_indexer(batch.item_id)
        lr, reg, blr, breg = p.lr, p.reg, p.bias_lr, p.bias_reg
        P, Q = users.values, items.values
        for step in self.steps(len(batch)):
            if before_step is not None:
                before_step(step)
            pos = np.flatnonzero(rated[step]) + step.start
            if not len(pos):
                continue
            r, u, i = batch.value[pos], u_all[pos], i_all[pos]
            pu, qi = P[u], Q[i]
            error = r - (self.mu + pu[:, dim] + qi[:, dim] + np.einsum("nd,nd->n", pu[:, :dim], qi[:, :dim]))
            self.rating_sum += float(r.sum())  # predict first, then learn (mu included)
            self.rating_count += len(r)
            stats.squared_error += float((error**2).sum())
            stats.loss_sum += float((error**2).sum())
            stats.examples += len(pos)
            np.add.at(P, u, np.hstack([lr * (error[:, None] * qi[:, :dim] - reg * pu[:, :dim]),
                                       (blr * (error - breg * pu[:, dim]))[:, None]]))
            np.add.at(Q, i, np.hstack([lr * (error[:, None] * pu[:, :dim] - reg * qi[:, :dim]),
                                       (blr * (error - breg * qi[:, dim]))[:, None]]))
        return {self.user_table: users.delta_update(), self.item_table: items.delta_update()}, stats
