"""Bayesian Personalised Ranking (Rendle et al. 2009) with matrix factorisation, batch training.

Loss per sampled triple (u, i, j): -ln sigma(x_ui - x_uj) + reg |theta|^2, x_ui = p_u . q_i + b_i.
Each epoch draws as many triples as there are interactions: (u, i) uniformly from the observed
pairs (on logs of short histories, a user with fewer than 20 pairs has them repeated up to that
count: `min_user_samples`, see `user_repeats`), j by the chosen negative sampler (resampled while
it is one of u's items):
  uniform     - any item;
  popularity  - items drawn in proportion to their interaction count ("harder" negatives; what
                `implicit` does by drawing the item of a random interaction; the default);
  in-batch    - the positives of other triples in the same mini-batch.
Updates are the per-sample SGD steps of the paper, summed over a mini-batch: each step's gradients
come from the parameters as the step found them. The steps run compiled (`bpr_epoch`); the
sampling stays in torch, so a seed draws the same triples as before.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from numba import njit
from pydantic import Field

from streamrec.core.params import Choice, FloatRange, IntRange, space
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities, Recommender
from streamrec.trainer.models.export import Export
from streamrec.trainer.models.popularity_blend import RankingParams
from streamrec.trainer.models.seen_pairs import SeenPairs
from streamrec.trainer.models.sgd import generator, single_threaded

MAX_RESAMPLES = 10


def sample_negatives(
    users: torch.Tensor, positives: torch.Tensor, seen: SeenPairs, n_items: int,
    sampler: str, item_weights: torch.Tensor, batch_size: int, gen: torch.Generator,
) -> torch.Tensor:
    """One negative per (user, positive) of a whole epoch in training order; items the user has
    (`seen`) are redrawn (a few rounds). In-batch draws among the positives of the same
    mini-batch."""
    position = torch.arange(len(users))
    batch_start = position - position % batch_size
    batch_len = torch.clamp(len(users) - batch_start, max=batch_size)

    def draw(where: torch.Tensor) -> torch.Tensor:
        count = len(where)
        if sampler == "popularity":
            return torch.multinomial(item_weights, count, replacement=True, generator=gen)
        if sampler == "in-batch":
            offset = (torch.rand(count, generator=gen) * batch_len[where]).long()
            return positives[batch_start[where] + offset]
        return torch.randint(n_items, (count,), generator=gen)

    negatives = draw(position)
    suspects = position
    for _ in range(MAX_RESAMPLES):  # only the redrawn ones are checked again
        suspects = suspects[torch.from_numpy(seen.contains(users[suspects].numpy(), negatives[suspects].numpy()))]
        if not len(suspects):
            break
        negatives[suspects] = draw(suspects)
    return negatives


@njit(cache=True, nogil=True, fastmath=True)
def bpr_epoch(users, positives, negatives, P, Q, b, lr, reg, batch_size):
    """The mini-batch steps of one epoch over the triples in order, in place. A step first reads
    every triple's rows as the step found them, then adds each triple's update; the torch loop it
    replaces gathered, then `index_add_`ed, and spent 14 of a fit's 19 s in per-batch tensor calls
    on a 6,000-session log."""
    k = P.shape[1]
    pu, qi, qj = np.empty((batch_size, k), P.dtype), np.empty((batch_size, k), Q.dtype), np.empty((batch_size, k), Q.dtype)
    z, bi, bj = np.empty(batch_size, b.dtype), np.empty(batch_size, b.dtype), np.empty(batch_size, b.dtype)
    for start in range(0, len(users), batch_size):
        stop = min(start + batch_size, len(users))
        for t in range(stop - start):
            u, i, j = users[start + t], positives[start + t], negatives[start + t]
            x = b[i] - b[j]
            for f in range(k):
                pu[t, f], qi[t, f], qj[t, f] = P[u, f], Q[i, f], Q[j, f]
                x += P[u, f] * (Q[i, f] - Q[j, f])
            z[t], bi[t], bj[t] = 1.0 / (1.0 + np.exp(x)), b[i], b[j]  # d(-ln sigma(x))/dx = -z
        for t in range(stop - start):
            u, i, j, g = users[start + t], positives[start + t], negatives[start + t], z[t]
            for f in range(k):
                P[u, f] += lr * (g * (qi[t, f] - qj[t, f]) - reg * pu[t, f])
                Q[i, f] += lr * (g * pu[t, f] - reg * qi[t, f])
                Q[j, f] += lr * (-g * pu[t, f] - reg * qj[t, f])
            b[i] += lr * (g - reg * bi[t])
            b[j] += lr * (-g - reg * bj[t])


SHORT_HISTORIES = 4  # median pairs per user below which `min_user_samples=auto` turns the floor on
SAMPLE_FLOOR = 20  # the floor it turns on


def user_repeats(rows: np.ndarray, n_users: int, floor: int | Literal["auto"]) -> np.ndarray:
    """How often each pair (one per entry of `rows`, its user) is drawn per epoch: once, or
    ceil(floor / n_u) times for a user with n_u < `floor` pairs.

    Drawing pairs uniformly gives a user steps in proportion to their history: a user of three
    clicks (a session) moves their vector three SGD steps per epoch while the items move thousands,
    so after 100 epochs the vector is still near its tiny initialisation and the ranking is the item
    bias, which popularity-sampled negatives flatten: BPR sat exactly at popularity on short
    sessions and histories. The floor fixes that but costs logs of longer histories (repeating a
    short user's few pairs overfits them: planted groups with 13 pairs per user lost 0.10 hr@10),
    so `auto` uses it only where the median user has fewer than `SHORT_HISTORIES` pairs."""
    counts = np.bincount(rows, minlength=n_users)
    if floor == "auto":
        active = counts[counts > 0]
        floor = SAMPLE_FLOOR if len(active) and np.median(active) < SHORT_HISTORIES else 0
    return np.maximum(1, -(-floor // np.maximum(counts, 1)))[rows] if floor else np.ones(len(rows), np.int64)


class BPRParams(RankingParams):
    """`implicit`'s defaults: 64 factors including the item bias, lr 0.01, reg 0.01."""

    factors: int = 64
    lr: float = 0.01
    reg: float = 0.01
    epochs: int = 100
    batch_size: int = 1024
    negatives: Literal["uniform", "popularity", "in-batch"] = "popularity"
    min_user_samples: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"
    seed: int = 0


class BPR(Recommender):
    """BPR-MF with an item bias (see the module doc)."""

    name = "bpr"
    capabilities = Capabilities(implicit=True, weights=True)
    Params = BPRParams
    search_space = space(factors=IntRange(8, 128, log=True), lr=FloatRange(1e-3, 0.1, log=True),
                    reg=FloatRange(1e-4, 0.1, log=True), epochs=IntRange(10, 150, log=True),
                    negatives=Choice(("uniform", "popularity", "in-batch")))

    @single_threaded()
    def _fit(self, interactions: Interactions) -> None:
        p = self.params
        gen = generator(p["seed"])
        weighted = interactions.weighting != "binary"  # positives drawn by weight (play counts)
        binary = (interactions.strength() if weighted else interactions.binary()).tocoo()
        repeats = user_repeats(binary.row, interactions.n_users, p["min_user_samples"])
        users = torch.from_numpy(np.repeat(binary.row.astype(np.int64), repeats))
        items = torch.from_numpy(np.repeat(binary.col.astype(np.int64), repeats))
        draw_weights = torch.from_numpy(np.repeat(binary.data.astype(np.float64), repeats)) if weighted else None
        n_items, k = interactions.n_items, p["factors"] - 1  # one factor is the item bias
        seen = SeenPairs(binary.tocsr())
        item_weights = torch.from_numpy(np.maximum(self.popularity, 1e-12).astype(np.float64))
        P = ((torch.rand(interactions.n_users, k, generator=gen) - 0.5) / k).numpy()
        Q = ((torch.rand(n_items, k, generator=gen) - 0.5) / k).numpy()
        b = np.zeros(n_items, np.float32)
        lr, reg = p["lr"], p["reg"]
        for _ in range(p["epochs"]):
            order = (torch.randperm(len(users), generator=gen) if draw_weights is None
                     else torch.multinomial(draw_weights, len(users), replacement=True, generator=gen))
            epoch_users, epoch_items = users[order], items[order]
            epoch_negatives = sample_negatives(
                epoch_users, epoch_items, seen, n_items, p["negatives"], item_weights, p["batch_size"], gen
            )
            bpr_epoch(epoch_users.numpy(), epoch_items.numpy(), epoch_negatives.numpy(), P, Q, b,
                      np.float32(lr), np.float32(reg), p["batch_size"])
        self.P, self.Q, self.b = P, Q, b

    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        return self.P[users] @ self.Q.T + self.b[None, :]

    def item_vectors(self) -> np.ndarray:
        """Item factors with the bias as a last column (matching `user_vectors`' constant 1)."""
        return np.hstack([self.Q, self.b[:, None]])

    def user_vectors(self) -> np.ndarray:
        return np.hstack([self.P, np.ones((len(self.P), 1), dtype=self.P.dtype)])

    def _export(self) -> Export:
        """Factors as vectors and the item bias as each item row's scalar (not a coordinate)."""
        self._require_fitted()
        return Export(item_vectors=self.Q, user_vectors=self.P, item_biases=self.b)

    def _state(self) -> dict[str, np.ndarray]:
        return {"P": self.P, "Q": self.Q, "b": self.b}

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.P, self.Q, self.b = arrays["P"], arrays["Q"], arrays["b"]
