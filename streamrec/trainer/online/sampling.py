"""Negative sampling for BPR: uniform over known items, by popularity (count^0.75), or in-batch.

The sampler keeps the items seen so far and their counts (vectorised over each batch) and draws
the negatives of a whole batch at once. (A shared pool of a few hundred candidates per batch was
tried: with 2,000-event batches it cost 0.02 of prequential hr@10 on MovieLens.)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from streamrec.core.lookup import appended, positions

SamplingMode = Literal["uniform", "popularity", "in-batch"]


class NegativeSampler:
    def __init__(self, mode: SamplingMode = "uniform", seed: int = 0) -> None:
        if mode not in ("uniform", "popularity", "in-batch"):
            raise ValueError(f"unknown negative sampling {mode!r}; uniform, popularity or in-batch")
        self.mode = mode
        self.rng = np.random.default_rng(seed)
        self._index = pd.Index([], dtype=object)
        self._counts = np.zeros(0, np.float64)

    def __len__(self) -> int:
        return len(self._index)

    def count_items(self, item_ids: np.ndarray) -> None:
        """Count the items of a batch (new ones join the catalogue)."""
        codes, uniques = pd.factorize(np.asarray(item_ids, dtype=object))
        per_unique = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
        position = positions(self._index, uniques)
        new = position < 0
        if new.any():
            self._index = appended(self._index, uniques[new])
            self._counts = np.concatenate([self._counts, np.zeros(int(new.sum()))])
            position = positions(self._index, uniques)
        np.add.at(self._counts, position, per_unique)

    def sample(self, batch_items: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Negative item ids of the given shape for the positives `batch_items` of one batch."""
        if self.mode == "in-batch" or not len(self._index):
            candidates = np.asarray(batch_items, dtype=object)
            return candidates[self.rng.integers(0, len(candidates), shape)] if len(candidates) else np.empty(shape, object)
        if self.mode == "uniform":
            picks = self.rng.integers(0, len(self._index), shape)
        else:
            weights = self._counts ** 0.75
            picks = self.rng.choice(len(self._index), size=shape, p=weights / weights.sum())
        return self._index.to_numpy()[picks]
