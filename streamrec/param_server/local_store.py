"""The parameter server's tables in-process: a `TableStore` like `ParamClient`, without sockets.

`streamrec evaluate --protocol prequential --model online-bpr` runs the exact learning code of the
live trainer without a network: the models only see the `TableStore` methods, served here by the
same `ParamStore` a server process holds (so ranged pushes follow the very same exactly-once rule).
It is every online model's default store, so `OnlineBPR()` works standalone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from streamrec.param_server.client import (
    Delta,
    Fenced,
    OffsetsRefused,
    PushOutcome,
    Rows,
    ShardRestart,
)
from streamrec.param_server.keys import IdsLike, as_keys
from streamrec.param_server.ledger import OffsetConflict, StaleEpoch
from streamrec.param_server.specs import OptimizerSpec, TableSpec
from streamrec.param_server.store import ParamStore


class LocalStore:
    """A one-shard parameter server living in this process (same semantics, no sockets)."""

    num_shards = 1

    def __init__(self) -> None:
        self.store = ParamStore()
        self._epochs: dict[str, int] = {}

    def create_table(
        self, name: str, dim: int, *, scalars: int = 0, optimizer: str = "adagrad", lr: float = 0.01,
        scalar_lr: float | None = None, init_std: float = 0.01, seed: int = 0, min_count: int = 1,
        ttl: float | None = None, max_rows: int | None = None,
    ) -> dict[str, Any]:
        spec = TableSpec(name=name, dim=dim, scalars=scalars, optimizer=OptimizerSpec(optimizer, lr, scalar_lr),
                         init_std=init_std, seed=seed, min_count=min_count, ttl=ttl,
                         max_rows=max_rows or self.store.default_max_rows)
        return self.store.create_table(spec)

    def pull(self, table: str, ids: IdsLike) -> Rows:
        values, found, dim = self.store.pull(table, as_keys(ids))
        return Rows(values, found, dim)

    def pull_many(self, requests: Mapping[str, IdsLike]) -> dict[str, Rows]:
        return {table: self.pull(table, ids) for table, ids in requests.items()}

    def push(
        self, updates: Mapping[str, tuple[IdsLike, np.ndarray]], *, meta: dict[str, Any] | None = None,
        events: int = 0, event_time: float | None = None, ranges: Mapping[str, tuple[int, int]] | None = None,
        item_counts: tuple[Sequence[str], np.ndarray] | None = None,
    ) -> PushOutcome:
        batch = [(name, as_keys(ids), np.ascontiguousarray(grads, np.float32)) for name, (ids, grads) in updates.items()]
        epochs = {pkey: self._epochs[pkey] for pkey in ranges or {} if pkey in self._epochs}
        try:
            result = self.store.push(batch, meta=meta, events=events, event_time=event_time, ranges=ranges,
                                     epochs=epochs, item_counts=item_counts)
        except StaleEpoch as exc:
            raise Fenced(0, str(exc), exc.next_offsets, PushOutcome([], [])) from exc
        except OffsetConflict as exc:
            raise OffsetsRefused(0, str(exc), exc.next_offsets, PushOutcome([], [])) from exc
        return PushOutcome([0], []) if result.applied else PushOutcome([], [0])

    def claim(self, pkeys: Sequence[str]) -> list[dict[str, int]]:
        claimed = self.store.claim(pkeys)
        self._epochs.update(claimed.epochs)
        return [claimed.next_offsets]

    def watermarks(self) -> list[dict[str, int]]:
        return [self.store.watermarks()]

    def item_event_counts(self) -> list[dict[str, int]]:
        return [self.store.item_event_counts()]

    def take_restarts(self) -> list[ShardRestart]:
        """An in-process store never restarts."""
        return []

    def delta(self, table: str, since: int | tuple[int, ...] = 0) -> Delta:
        since = since[0] if isinstance(since, tuple) else since
        plan, _, (keys, values, dim, _) = self.store.delta_start(table, since, 2**62)  # one chunk: exact
        return Delta(values=values, found=np.ones(len(keys), bool), dim=dim, ids=keys, deleted=plan.deleted,
                     version=(plan.version,), full=plan.reset)

    def get_meta(self) -> list[dict[str, Any]]:
        return [self.store.meta_record()]

    def close(self) -> None:
        """Nothing to release (parity with ParamClient)."""
