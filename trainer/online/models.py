"""Online models: each micro-batch pulls the rows it needs, computes gradients vectorised, pushes them.

The models hold no embeddings themselves (TorchRec's separation of tables from the models that use
them): rows live in parameter-server tables, created on first use by the server's admission, and
the optimiser (Adagrad / SGD, per row) runs on the server. A model only turns events into gradients.

- `OnlineBPR` (implicit feedback): x_uij = p_u . (q_i - q_j) + b_i - b_j, loss -w log sigma(x_uij)
  over `negatives` sampled items j per positive (uniform, popularity^0.75 or in-batch), plus a
  pointwise -log sigma(-(p_u . q_j + b_j)) for explicit negatives (skips).
- `OnlineMF` (explicit ratings): r = mu + b_u + b_i + p_u . q_i with Koren's SGD defaults, mu the
  running mean of the ratings seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from trainer.online.batch import TrainBatch, scatter_sum
from trainer.online.roles import EventRoles
from trainer.online.sampling import NegativeSampler


Updates = dict[str, tuple[list, np.ndarray]]


@dataclass
class StepStats:
    events: int = 0
    examples: int = 0  # positives (BPR) or ratings (MF) learned
    loss: float = float("nan")  # mean loss over the examples, before the update
    squared_error: float = 0.0  # MF: sum of squared errors of predict-then-learn


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


class OnlineModel:
    """Shared plumbing: table names, creation, pulling rows for a batch, scoring from rows."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]

    def __init__(self, roles: EventRoles | None = None, prefix: str | None = None, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameters {sorted(unknown)}; known: {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}
        self.roles = roles or EventRoles()
        prefix = prefix or self.name.replace("online-", "")
        self.user_table, self.item_table = f"{prefix}_users", f"{prefix}_items"

    def table_specs(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def create_tables(self, store: Any) -> None:
        for name, spec in self.table_specs().items():
            store.create_table(name, **spec)

    def gradients(self, store: Any, batch: TrainBatch) -> tuple[Updates, StepStats]:
        """Pull what the batch needs and return {table: (ids, summed gradients)} to push."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Small JSON state kept beside the offsets in the parameter server's meta record."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Inverse of `state` (after a restart)."""

    def score(self, user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """(users, items) scores from pulled/mirrored rows (vectors then scalars)."""
        raise NotImplementedError


@dataclass
class _Pulled:
    """Rows of the distinct ids of one batch and where each event's ids sit among them."""

    ids: np.ndarray
    rows: np.ndarray
    found: np.ndarray


def _pull(store: Any, table: str, ids: np.ndarray) -> _Pulled:
    rows = store.pull(table, ids.tolist())
    return _Pulled(ids, rows.values.astype(np.float64), rows.found)


class OnlineBPR(OnlineModel):
    name = "online-bpr"
    defaults: ClassVar[dict[str, Any]] = {
        "dim": 32, "lr": 0.2, "reg": 0.01, "negatives": 10, "sampling": "uniform", "pool": 512,
        "init_std": 0.1, "min_count": 1, "seed": 0, "skip_weight": 1.0, "optimizer": "adagrad",
    }

    def __init__(self, roles: EventRoles | None = None, prefix: str | None = None, **params: Any) -> None:
        super().__init__(roles, prefix, **params)
        p = self.params
        self.sampler = NegativeSampler(p["sampling"], int(p["pool"]), int(p["seed"]))
        self.rng = np.random.default_rng(int(p["seed"]) + 1)

    def table_specs(self) -> dict[str, dict[str, Any]]:
        p = self.params
        common = {"optimizer": p["optimizer"], "lr": p["lr"], "init_std": p["init_std"],
                  "min_count": int(p["min_count"]), "seed": int(p["seed"])}
        return {self.user_table: {"dim": int(p["dim"]), **common},
                self.item_table: {"dim": int(p["dim"]), "scalars": 1, **common}}

    def score(self, user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        dim = int(self.params["dim"])
        return user_rows[:, :dim] @ item_rows[:, :dim].T + item_rows[:, dim]

    def gradients(self, store: Any, batch: TrainBatch) -> tuple[Updates, StepStats]:
        p, dim = self.params, int(self.params["dim"])
        weight = self.roles.positive_weight(batch.event_type, batch.value)
        positive = weight > 0
        skip = self.roles.is_negative(batch.event_type)
        self.sampler.observe(batch.item_id[positive | skip])
        stats = StepStats(events=len(batch), examples=int(positive.sum()))
        if not positive.any() and not skip.any():
            return {}, stats

        pos_users, pos_items, w = batch.user_id[positive], batch.item_id[positive], weight[positive]
        pool = self.sampler.pool(pos_items)
        k = int(p["negatives"])
        neg_items = pool[self.rng.integers(0, len(pool), (len(pos_items), k))] if len(pool) else np.empty((0, k), object)
        skip_users, skip_items = batch.user_id[skip], batch.item_id[skip]

        user_codes, user_ids = pd.factorize(np.concatenate([pos_users, skip_users]))
        item_codes, item_ids = pd.factorize(np.concatenate([pos_items, neg_items.ravel(), skip_items]))
        users = _pull(store, self.user_table, np.asarray(user_ids, dtype=object))
        items = _pull(store, self.item_table, np.asarray(item_ids, dtype=object))
        n_pos, reg = len(pos_items), float(p["reg"])
        u_pos, u_skip = user_codes[:n_pos], user_codes[n_pos:]
        i_pos = item_codes[:n_pos]
        i_neg = item_codes[n_pos : n_pos + neg_items.size].reshape(n_pos, k)
        i_skip = item_codes[n_pos + neg_items.size :]

        P, Q = users.rows, items.rows
        grad_users = np.zeros_like(P)
        grad_items = np.zeros_like(Q)
        losses = []
        if n_pos and k:
            pu, qi, qj = P[u_pos], Q[i_pos], Q[i_neg]  # (n, d+0), (n, d+1), (n, k, d+1)
            diff = qi[:, None, :dim] - qj[..., :dim]
            x = np.einsum("nd,nkd->nk", pu, diff) + qi[:, None, dim] - qj[..., dim]
            g = w[:, None] * _sigmoid(-x)  # d(-log sigma(x))/dx = -sigma(-x)
            losses.append(-(w[:, None] * _log_sigmoid(x)).mean(axis=1))
            gs = g.sum(axis=1)
            grad_u = -np.einsum("nk,nkd->nd", g, diff) + reg * k * pu
            grad_i = np.hstack([-gs[:, None] * pu, -gs[:, None]]) + reg * k * qi
            grad_j = np.concatenate([g[..., None] * pu[:, None, :], g[..., None]], axis=2) + reg * qj
            grad_users += scatter_sum(u_pos, grad_u, len(P))
            grad_items += scatter_sum(np.concatenate([i_pos, i_neg.ravel()]),
                                      np.vstack([grad_i, grad_j.reshape(-1, dim + 1)]), len(Q))
        if len(i_skip):
            pu, qj = P[u_skip], Q[i_skip]
            s = np.einsum("nd,nd->n", pu, qj[:, :dim]) + qj[:, dim]
            g = float(p["skip_weight"]) * _sigmoid(s)  # d(-log sigma(-s))/ds = sigma(s)
            losses.append(-float(p["skip_weight"]) * _log_sigmoid(-s))
            grad_users += scatter_sum(u_skip, g[:, None] * qj[:, :dim] + reg * pu, len(P))
            grad_items += scatter_sum(i_skip, np.hstack([g[:, None] * pu, g[:, None]]) + reg * qj, len(Q))
        stats.loss = float(np.concatenate(losses).mean())
        return {self.user_table: (users.ids.tolist(), grad_users),
                self.item_table: (items.ids.tolist(), grad_items)}, stats


class OnlineMF(OnlineModel):
    name = "online-mf"
    defaults: ClassVar[dict[str, Any]] = {
        "dim": 32, "lr": 0.007, "reg": 0.015, "bias_lr": 0.005, "bias_reg": 0.005, "init_std": 0.1,
        "min_count": 1, "seed": 0,
    }

    def __init__(self, roles: EventRoles | None = None, prefix: str | None = None, **params: Any) -> None:
        super().__init__(roles, prefix, **params)
        self.rating_sum = 0.0
        self.rating_count = 0

    @property
    def mu(self) -> float:
        return self.rating_sum / self.rating_count if self.rating_count else 0.0

    def table_specs(self) -> dict[str, dict[str, Any]]:
        p = self.params
        spec = {"dim": int(p["dim"]), "scalars": 1, "optimizer": "sgd", "lr": p["lr"], "scalar_lr": p["bias_lr"],
                "init_std": p["init_std"], "min_count": int(p["min_count"]), "seed": int(p["seed"])}
        return {self.user_table: spec, self.item_table: spec}

    def state(self) -> dict[str, Any]:
        return {"rating_sum": self.rating_sum, "rating_count": self.rating_count}

    def restore(self, state: dict[str, Any]) -> None:
        self.rating_sum = float(state.get("rating_sum", 0.0))
        self.rating_count = int(state.get("rating_count", 0))

    def score(self, user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        dim = int(self.params["dim"])
        return (self.mu + user_rows[:, dim][:, None] + item_rows[:, dim][None, :]
                + user_rows[:, :dim] @ item_rows[:, :dim].T)

    def gradients(self, store: Any, batch: TrainBatch) -> tuple[Updates, StepStats]:
        p, dim = self.params, int(self.params["dim"])
        rated = self.roles.is_rating(batch.event_type, batch.value)
        stats = StepStats(events=len(batch), examples=int(rated.sum()))
        if not rated.any():
            return {}, stats
        r = batch.value[rated]
        self.rating_sum += float(r.sum())
        self.rating_count += len(r)
        user_codes, user_ids = pd.factorize(batch.user_id[rated])
        item_codes, item_ids = pd.factorize(batch.item_id[rated])
        users = _pull(store, self.user_table, np.asarray(user_ids, dtype=object))
        items = _pull(store, self.item_table, np.asarray(item_ids, dtype=object))
        pu, qi = users.rows[user_codes], items.rows[item_codes]
        prediction = self.mu + pu[:, dim] + qi[:, dim] + np.einsum("nd,nd->n", pu[:, :dim], qi[:, :dim])
        error = r - prediction
        stats.squared_error = float((error**2).sum())
        stats.loss = stats.squared_error / len(r)
        reg, bias_reg = float(p["reg"]), float(p["bias_reg"])
        grad_u = np.hstack([-error[:, None] * qi[:, :dim] + reg * pu[:, :dim], (-error + bias_reg * pu[:, dim])[:, None]])
        grad_i = np.hstack([-error[:, None] * pu[:, :dim] + reg * qi[:, :dim], (-error + bias_reg * qi[:, dim])[:, None]])
        return {self.user_table: (users.ids.tolist(), scatter_sum(user_codes, grad_u, len(user_ids))),
                self.item_table: (items.ids.tolist(), scatter_sum(item_codes, grad_i, len(item_ids)))}, stats


ONLINE_MODELS: dict[str, type[OnlineModel]] = {OnlineBPR.name: OnlineBPR, OnlineMF.name: OnlineMF}


def create_online_model(name: str, roles: EventRoles | None = None, **params: Any) -> OnlineModel:
    try:
        cls = ONLINE_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown online model {name!r}; known: {sorted(ONLINE_MODELS)}") from None
    return cls(roles, **params)
