"""What a table and its optimiser are: the specs a client sends to create a table and a server
keeps with it, validated on construction.

They live apart from the table (`table.py`) and its compiled row kernels, so that a process that
only talks to a parameter server (a serving worker, a client) does not load kernels it never runs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from streamrec.param_server.admission import DEFAULT_WIDTH
from streamrec.param_server.defaults import DEFAULT_MAX_ROWS
from streamrec.param_server.keys import KeyType

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
MAX_WIDTH = 8192  # floats per row: a wider table turns a small pull into a huge reply
MAX_ADMISSION_WIDTH = 1 << 22  # counters per sketch row: 64 MB of sketch at the default depth

OptimizerName = Literal["sgd", "adagrad"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: OptimizerName = "adagrad"
    lr: float = 0.01
    scalar_lr: float | None = None  # learning rate of the scalar (bias) columns; None: same as lr
    eps: float = 1e-10  # Adagrad: added to sqrt(accumulator), as torch does
    initial_accumulator: float = 0.0  # Adagrad: starting value of every accumulator

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adagrad"):
            raise ValueError(f"unknown optimiser {self.name!r}; choose sgd or adagrad")
        if self.lr <= 0 or (self.scalar_lr is not None and self.scalar_lr <= 0):
            raise ValueError("learning rates must be positive")

    @property
    def state_per_value(self) -> int:
        """Optimiser state floats stored per row value."""
        return 1 if self.name == "adagrad" else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def learning_rates(self, dim: int, scalars: int) -> np.ndarray:
        scalar_lr = self.lr if self.scalar_lr is None else self.scalar_lr
        return np.concatenate([np.full(dim, self.lr), np.full(scalars, scalar_lr)]).astype(np.float32)


@dataclass(frozen=True)
class TableSpec:
    name: str
    dim: int
    scalars: int = 0
    key_type: KeyType = "str"
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    init_std: float = 0.01  # new rows: vector part uniform with this std, deterministic per id
    seed: int = 0
    min_count: int = 1  # admission: sightings before an id gets a row
    ttl: float | None = None  # seconds of event time without update before eviction; None: never
    max_rows: int = DEFAULT_MAX_ROWS
    admission_width: int = DEFAULT_WIDTH

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"table name {self.name!r} must be 1-128 of [A-Za-z0-9_.-]")
        if self.dim < 1 or self.scalars < 0 or self.dim + self.scalars > MAX_WIDTH:
            raise ValueError(f"dim must be >= 1, scalars >= 0 and dim + scalars <= {MAX_WIDTH}")
        if self.key_type not in ("int", "str"):
            raise ValueError("key_type must be 'int' or 'str'")
        if self.min_count < 1 or (self.ttl is not None and self.ttl <= 0):
            raise ValueError("min_count must be >= 1 and ttl positive (or None)")
        if not 1 <= self.max_rows < 2**31:
            raise ValueError("max_rows must be in [1, 2**31)")
        if not 1 <= self.admission_width <= MAX_ADMISSION_WIDTH:
            raise ValueError(f"admission_width must be in [1, {MAX_ADMISSION_WIDTH}]")

    @property
    def width(self) -> int:
        return self.dim + self.scalars

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TableSpec:
        data = dict(data)
        data["optimizer"] = OptimizerSpec(**data.get("optimizer", {}))
        return TableSpec(**data)
