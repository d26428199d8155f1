"""A user as the items they interacted with: the implicit term of SVD++ and FISM, for networks
that would otherwise know a user only by an id embedding.

An id embedding learns from the user's own events alone: with three or four of them (short
histories, anonymous sessions) the row barely moves, and a tower over it stays at popularity's
hit rate. Adding `|N(u)|^-1/2 * sum_{j in N(u)} y_j` lets every user share what the item vectors
`y` learned from everyone else, the way GRU4Rec and Caser read a user's items.

In pointwise training a positive (u, i) has i in N(u); left there, the network would learn
"the item is in the history" and score nothing else. So each positive's own item is taken out
of its user's sum (FISM's rule), which is what the held-out item looks like at test time.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn


class HistoryPooling(nn.Module):
    """Item vectors `y` and, once `attach`ed, each user's items (a CSR row of item indices per user).

    The user lists are not weights: they are attached from the data (the training pairs while
    training, the model's `seen` matrix for scoring and after loading).
    Users outside the attached rows (the reserved unknown row) pool nothing.
    """

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items, dim)
        nn.init.normal_(self.items.weight, std=0.01)
        self.attach(sp.csr_matrix((0, n_items)), torch.device("cpu"))

    def attach(self, matrix: sp.csr_matrix, device: torch.device) -> None:
        """Pool from `matrix`'s rows (users x items, any nonzero = interacted). `indptr` gets its
        last entry twice: the one row past the end is empty, and every user beyond it maps there."""
        matrix = sp.csr_matrix(matrix)
        self.indptr = torch.as_tensor(np.r_[matrix.indptr, matrix.indptr[-1]].astype(np.int64), device=device)
        self.indices = torch.as_tensor(matrix.indices.astype(np.int64), device=device)

    def forward(self, users: torch.Tensor, holdout: torch.Tensor | None = None) -> torch.Tensor:
        """(*users.shape, dim) pooled vectors. `holdout` (same shape): an item to take out of that
        entry's sum, or -1 for none (positives of pointwise training; the item must be in the
        user's history)."""
        unique, inverse = torch.unique(users, return_inverse=True)
        rows = unique.clamp(max=len(self.indptr) - 2)  # users outside the attached rows: the empty one
        starts = self.indptr[rows]
        counts = self.indptr[rows + 1] - starts
        offsets = torch.cumsum(counts, 0) - counts
        flat = torch.repeat_interleave(starts - offsets, counts) + torch.arange(int(counts.sum()), device=users.device)
        sums = F.embedding_bag(self.indices[flat], self.items.weight, offsets, mode="sum")[inverse]
        sizes = counts[inverse].to(sums.dtype)
        if holdout is not None:
            drop = holdout >= 0
            sums = sums - drop[..., None] * F.embedding(holdout.clamp(min=0), self.items.weight)
            sizes = sizes - drop.to(sums.dtype)
        return sums * sizes.clamp(min=1).rsqrt()[..., None]

    def pool(self, items: torch.Tensor) -> torch.Tensor:
        """(dim,) pooled vector of one list of item indices (a user's items as they are now, not
        an attached row), by the same rule as `forward`; the list must not be empty."""
        return self.items.weight[items].sum(0) * len(items) ** -0.5
