"""Per-row optimisers applied on the server, vectorised over the rows of one push.

A row is `dim` vector values followed by `scalars` side values (biases); each part has its own
learning rate (Koren-style SGD uses e.g. 0.007 for factors and 0.005 for biases), expressed as one
per-column learning-rate vector so the update stays a single array expression.
The math mirrors torch.optim.SGD / torch.optim.Adagrad (no momentum, decay or weight decay:
regularisation is the trainer's job), which the tests use as the reference.
"""

from __future__ import annotations

import numpy as np

from streamrec.param_server.kernels import apply_rows, kernel_input
from streamrec.param_server.specs import OptimizerSpec


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
