"""What a table and its optimiser are: the specs a client sends to create a table and a server
keeps with it, validated on construction.

They live apart from the table (`table.py`) and its compiled row kernels, so that a process that
only talks to a parameter server (a serving worker, a client) does not load kernels it never runs.
"""

from __future__ import annotations

import math
import numbers
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
MAX_LR = 100.0  # anything larger only makes rows non-finite
MAX_INIT_STD = 10.0


def _integer(field: str, value: object, low: int, high: int) -> None:
    """Specs arrive as JSON from any peer: a seed of [1] or a min_count of 1.5 was stored as it came."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{field} must be an integer in [{low}, {high}], got {value!r}")


def _real(field: str, value: object, low: float, high: float, *, above_low: bool = False) -> None:
    if (not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)
            or not low <= value <= high or (above_low and value == low)):
        raise ValueError(f"{field} must be a number in {'(' if above_low else '['}{low}, {high}], got {value!r}")


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
        _real("lr", self.lr, 0.0, MAX_LR, above_low=True)
        if self.scalar_lr is not None:
            _real("scalar_lr", self.scalar_lr, 0.0, MAX_LR, above_low=True)
        _real("eps", self.eps, 0.0, 1.0, above_low=True)  # Adagrad divides by sqrt(accumulator) + eps
        _real("initial_accumulator", self.initial_accumulator, 0.0, 1e6)

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
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"table name {self.name!r} must be 1-128 of [A-Za-z0-9_.-]")
        _integer("dim", self.dim, 1, MAX_WIDTH)
        _integer("scalars", self.scalars, 0, MAX_WIDTH)
        _real("init_std", self.init_std, 0.0, MAX_INIT_STD)
        _integer("seed", self.seed, 0, 2**63 - 1)
        _integer("min_count", self.min_count, 1, 2**31 - 1)
        if self.ttl is not None:
            _real("ttl", self.ttl, 0.0, 1e12, above_low=True)
        _integer("max_rows", self.max_rows, 1, 2**31 - 1)
        _integer("admission_width", self.admission_width, 1, MAX_ADMISSION_WIDTH)
        if not isinstance(self.optimizer, OptimizerSpec):
            raise ValueError(f"optimizer must be an OptimizerSpec, got {self.optimizer!r}")
        if self.dim + self.scalars > MAX_WIDTH:
            raise ValueError(f"dim + scalars must be at most {MAX_WIDTH}")
        if self.key_type not in ("int", "str"):
            raise ValueError("key_type must be 'int' or 'str'")

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
