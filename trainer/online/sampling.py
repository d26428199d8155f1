"""Negative sampling for BPR: uniform over known items, by popularity (count^0.75), or in-batch.

The sampler keeps the items seen so far and their counts (vectorised over each batch). Per
micro-batch it draws one shared pool of candidate negatives; each positive takes its negatives from
that pool, which bounds the rows a batch must pull from the parameter server.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

SamplingMode = Literal["uniform", "popularity", "in-batch"]


class NegativeSampler:
    def __init__(self, mode: SamplingMode = "uniform", pool_size: int = 512, seed: int = 0) -> None:
        if mode not in ("uniform", "popularity", "in-batch"):
            raise ValueError(f"unknown negative sampling {mode!r}; uniform, popularity or in-batch")
        self.mode, self.pool_size = mode, pool_size
        self.rng = np.random.default_rng(seed)
        self._index = pd.Index([], dtype=object)
        self._counts = np.zeros(0, np.float64)

    def __len__(self) -> int:
        return len(self._index)

    def observe(self, item_ids: np.ndarray) -> None:
        """Count the items of a batch (new ones join the catalogue)."""
        codes, uniques = pd.factorize(np.asarray(item_ids, dtype=object))
        per_unique = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
        position = self._index.get_indexer(uniques)
        new = position < 0
        if new.any():
            self._index = self._index.append(pd.Index(uniques[new], dtype=object))
            self._counts = np.concatenate([self._counts, np.zeros(int(new.sum()))])
            position = self._index.get_indexer(uniques)
        np.add.at(self._counts, position, per_unique)

    def pool(self, batch_items: np.ndarray) -> np.ndarray:
        """Candidate negative item ids for one micro-batch."""
        if self.mode == "in-batch" or not len(self._index):
            return np.unique(np.asarray(batch_items, dtype=object))
        size = min(self.pool_size, len(self._index))
        if self.mode == "uniform":
            picks = self.rng.choice(len(self._index), size=size, replace=False)
        else:
            weights = self._counts ** 0.75
            picks = self.rng.choice(len(self._index), size=size, replace=False, p=weights / weights.sum())
        return self._index.to_numpy()[picks]
