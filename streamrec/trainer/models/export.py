"""What a refit publishes for serving, as each model describes it (`Recommender.export`).

A model states its serving artefacts here instead of the refit guessing them from attributes or
names: retrieval vectors (with an optional item bias, serving's per-row scalar), item neighbour
lists, and a ranking-stage network. `streamrec.trainer.refit.publish` writes exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class NeighbourLists:
    """(n_items, k) neighbour item indices (-1 = none) and their similarities, best first."""

    indices: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        if self.indices.shape != self.scores.shape:
            raise ValueError(f"neighbour indices {self.indices.shape} and scores {self.scores.shape} differ in shape")


@dataclass(frozen=True)
class RankerBlob:
    """A ranking-stage network as serving rebuilds it: a JSON-able header plus numpy arrays."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class Export:
    """Everything a refit publishes besides the manifest; None = the model has no such part.

    Score of a (user, item) pair = user_vectors[u] . item_vectors[i] (+ item_biases[i] when given:
    the bias travels as the item row's scalar, not as a vector coordinate).
    """

    item_vectors: np.ndarray | None = None  # (n_items, d)
    user_vectors: np.ndarray | None = None  # (n_users, d), only alongside item vectors
    item_biases: np.ndarray | None = None  # (n_items,), only alongside item vectors
    neighbours: NeighbourLists | None = None
    ranker: RankerBlob | None = None

    def __post_init__(self) -> None:
        if self.item_vectors is None and (self.user_vectors is not None or self.item_biases is not None):
            raise ValueError("user vectors and item biases are published only alongside item vectors")
        if self.user_vectors is not None and self.user_vectors.shape[1] != self.item_vectors.shape[1]:
            raise ValueError(
                f"user vectors have {self.user_vectors.shape[1]} dimensions, item vectors {self.item_vectors.shape[1]}"
            )
        if self.item_biases is not None and self.item_biases.shape != (len(self.item_vectors),):
            raise ValueError(f"item biases {self.item_biases.shape} do not match {len(self.item_vectors)} items")
