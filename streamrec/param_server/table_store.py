"""`TableStore`: the part of the parameter server's API that models and replicas program against.

Two implementations satisfy it: `ParamClient` (sharded servers over the network) and `LocalStore`
(the same `ParamStore` in-process), so the live trainer and `streamrec evaluate` run the very same
learning code. Declared as a Protocol (structural typing) because the two share no base class and
should not need one: anything with these methods can hold a model's tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from streamrec.param_server.client import Delta, Rows
from streamrec.param_server.keys import IdsLike


class TableStore(Protocol):
    def create_table(
        self, name: str, dim: int, *, scalars: int = 0, optimizer: str = "adagrad", lr: float = 0.01,
        scalar_lr: float | None = None, init_std: float = 0.01, seed: int = 0, min_count: int = 1,
        ttl: float | None = None,
    ) -> dict[str, Any]:
        """Create a table (idempotent for the same spec); returns its description."""
        ...

    def pull(self, table: str, ids: IdsLike) -> Rows:
        """Current rows of `ids` (the table's default where an id has no row yet)."""
        ...

    def pull_many(self, requests: Mapping[str, IdsLike]) -> dict[str, Rows]:
        """Several tables' pulls in one round trip."""
        ...

    def push(
        self, updates: Mapping[str, tuple[IdsLike, np.ndarray]], *, meta: dict[str, Any] | None = None,
        events: int = 0, event_time: float | None = None,
    ) -> dict[int, int]:
        """Apply gradients to several tables atomically with `meta` and the applied-event count;
        returns {shard: version}."""
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
