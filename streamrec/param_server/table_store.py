"""`TableStore`: the part of the parameter server's API that models, replicas and the trainer
program against.

Two implementations satisfy it: `ParamClient` (sharded servers over the network) and `LocalStore`
(the same `ParamStore` in-process), so the live trainer and `streamrec evaluate` run the very same
learning code. Declared as a Protocol (structural typing) because the two share no base class and
should not need one: anything with these methods can hold a model's tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from streamrec.param_server.client import Delta, PushOutcome, Rows, ShardRestart
from streamrec.param_server.keys import IdsLike


class TableStore(Protocol):
    def create_table(
        self, name: str, dim: int, *, scalars: int = 0, optimizer: str = "adagrad", lr: float = 0.01,
        scalar_lr: float | None = None, init_std: float = 0.01, seed: int = 0, min_count: int = 1,
        ttl: float | None = None, max_rows: int | None = None,
    ) -> dict[str, Any]:
        """Create a table (idempotent for the same spec); returns its description. `max_rows`
        (per shard) bounds it, evicting the least recently updated rows; None: the store's default."""
        ...

    def pull(self, table: str, ids: IdsLike) -> Rows:
        """Current rows of `ids` (the table's default where an id has no row yet)."""
        ...

    def pull_many(self, requests: Mapping[str, IdsLike]) -> dict[str, Rows]:
        """Several tables' pulls in one round trip."""
        ...

    def push(
        self, updates: Mapping[str, tuple[IdsLike, np.ndarray]], *, meta: dict[str, Any] | None = None,
        events: int = 0, event_time: float | None = None, ranges: Mapping[str, tuple[int, int]] | None = None,
        item_counts: tuple[Sequence[str], np.ndarray] | None = None,
    ) -> PushOutcome:
        """Apply gradients to several tables atomically (per shard) with `meta`, the applied-event
        count and `item_counts`; with `ranges` ({pkey: (a, b)}) exactly once per shard (skipped
        where applied before; OffsetsRefused / Fenced where it does not continue the watermarks)."""
        ...

    def claim(self, pkeys: Sequence[str]) -> list[dict[str, int]]:
        """Own these partitions (new fencing epochs); per shard, their watermarks."""
        ...

    def watermarks(self) -> list[dict[str, int]]:
        """Per shard: the next offset to apply, per partition key."""
        ...

    def item_event_counts(self) -> list[dict[str, int]]:
        """Per shard: events applied per item."""
        ...

    def take_restarts(self) -> list[ShardRestart]:
        """Shard restarts noticed since the last call."""
        ...

    def delta(self, table: str, since: int | tuple[int, ...] = 0) -> Delta:
        """Rows changed (and ids deleted) since the version `since`; pass `Delta.version` back."""
        ...

    def get_meta(self) -> list[dict[str, Any]]:
        """Per shard: the meta record of its last push, its version and applied events."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
