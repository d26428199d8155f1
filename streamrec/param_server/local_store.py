"""The parameter server's tables in-process: a `TableStore` like `ParamClient`, without sockets.

`streamrec evaluate --protocol prequential --model online-bpr` runs the exact learning code of the
live trainer without a network: the models only see the `TableStore` methods, served here by the
same `ParamStore` a server process holds. It is every online model's default store, so
`OnlineBPR()` works standalone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from streamrec.param_server.client import Delta, Rows
from streamrec.param_server.keys import IdsLike, as_keys
from streamrec.param_server.optimizers import OptimizerSpec
from streamrec.param_server.store import ParamStore
from streamrec.param_server.table import TableSpec


class LocalStore:
    """A one-shard parameter server living in this process (same semantics, no sockets)."""

    num_shards = 1

    def __init__(self) -> None:
        self.store = ParamStore()

    def create_table(
        self, name: str, dim: int, *, scalars: int = 0, optimizer: str = "adagrad", lr: float = 0.01,
        scalar_lr: float | None = None, init_std: float = 0.01, seed: int = 0, min_count: int = 1,
        ttl: float | None = None,
    ) -> dict[str, Any]:
        spec = TableSpec(name=name, dim=dim, scalars=scalars, optimizer=OptimizerSpec(optimizer, lr, scalar_lr),
                         init_std=init_std, seed=seed, min_count=min_count, ttl=ttl)
        return self.store.create_table(spec)

    def pull(self, table: str, ids: IdsLike) -> Rows:
        values, found, dim = self.store.pull(table, as_keys(ids))
        return Rows(values, found, dim)

    def pull_many(self, requests: Mapping[str, IdsLike]) -> dict[str, Rows]:
        return {table: self.pull(table, ids) for table, ids in requests.items()}

    def push(
        self, updates: Mapping[str, tuple[IdsLike, np.ndarray]], *, meta: dict[str, Any] | None = None,
        events: int = 0, event_time: float | None = None,
    ) -> dict[int, int]:
        batch = [(name, as_keys(ids), np.ascontiguousarray(grads, np.float32)) for name, (ids, grads) in updates.items()]
        version, _ = self.store.push(batch, meta=meta, events=events, event_time=event_time)
        return {0: version}

    def delta(self, table: str, since: int | tuple[int, ...] = 0) -> Delta:
        since = since[0] if isinstance(since, tuple) else since
        plan = self.store.delta_plan(table, since)
        keys, values, dim = self.store.delta_rows(table, plan.rows)
        return Delta(values=values, found=np.ones(len(keys), bool), dim=dim, ids=keys, deleted=plan.deleted,
                     version=(plan.version,), full=plan.reset)

    def get_meta(self) -> list[dict[str, Any]]:
        return [self.store.meta_record()]

    def close(self) -> None:
        """Nothing to release (parity with ParamClient)."""

