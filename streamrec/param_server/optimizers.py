"""Per-row optimisers applied on the server, vectorised over the rows of one push.

A row is `dim` vector values followed by `scalars` side values (biases); each part has its own
learning rate (Koren-style SGD uses e.g. 0.007 for factors and 0.005 for biases), expressed as one
per-column learning-rate vector so the update stays a single array expression.
The math mirrors torch.optim.SGD / torch.optim.Adagrad (no momentum, decay or weight decay:
regularisation is the trainer's job), which the tests use as the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from streamrec.param_server.kernels import apply_rows, kernel_input

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


class RowOptimizer:
    """Applies one push's summed gradients to distinct rows of a table's block in place (values,
    then Adagrad's accumulators), in one compiled pass per row (`kernels.apply_rows`)."""

    def __init__(self, spec: OptimizerSpec, dim: int, scalars: int):
        self.spec = spec
        self.lr = spec.learning_rates(dim, scalars)
        self.eps = np.float32(spec.eps)
        self.adagrad = spec.name == "adagrad"

    def apply(self, block: np.ndarray, rows: np.ndarray, grads: np.ndarray) -> None:
        apply_rows(block, kernel_input(rows, np.int64), kernel_input(grads, np.float32), self.lr, self.eps,
                   self.adagrad)
