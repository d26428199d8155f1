"""Restricted Boltzmann machine for collaborative filtering (Salakhutdinov, Mnih, Hinton 2007).

One RBM per user sharing weights: each rated item is a softmax visible unit over the K rating
values, F binary hidden units. Trained by contrastive divergence (CD-1) on mini-batches of users
with momentum and weight decay; only the user's rated items take part in both phases. A rating
is predicted as the expectation of p(v_i = k | p_hat), p_hat = p(h | the user's observed ratings).
"""

from __future__ import annotations

import numpy as np
import torch

from streamrec.core.params import FloatRange, IntRange, ModelParams, space
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities, Recommender
from streamrec.trainer.models.sgd import generator, single_threaded

USER_CHUNK = 256


class RBMParams(ModelParams):
    """F hidden units and CD-1 training with momentum and weight decay (the paper's setup)."""

    hidden: int = 100
    epochs: int = 40
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.001
    batch_size: int = 64
    init_std: float = 0.01
    seed: int = 0


class RBM(Recommender):
    name = "rbm"
    capabilities = Capabilities(explicit=True)
    Params = RBMParams
    search_space = space(hidden=IntRange(20, 400, log=True), epochs=IntRange(10, 80), lr=FloatRange(1e-3, 0.1, log=True),
                         weight_decay=FloatRange(1e-5, 1e-2, log=True))

    def _one_hot(self, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, m, K) one-hot ratings and (B, m) mask of rated items."""
        rows = self.ratings[users]
        dense = torch.from_numpy(rows.toarray())
        mask = dense > 0
        levels = torch.from_numpy(np.searchsorted(self.levels, rows.toarray()).clip(0, len(self.levels) - 1))
        one_hot = torch.nn.functional.one_hot(levels, len(self.levels)).float() * mask[..., None]
        return one_hot, mask

    def _hidden_probs(self, visible: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bh + visible.flatten(1) @ self.W.flatten(0, 1))

    def _visible_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.bv[None] + torch.einsum("bf,mkf->bmk", hidden, self.W)
        return torch.softmax(logits, dim=-1)

    @single_threaded()
    def _fit(self, data: Interactions) -> None:
        p = self.params
        gen = generator(p["seed"])
        self.ratings = data.matrix()
        self.levels = np.unique(self.ratings.data)
        m, K, F = data.n_items, len(self.levels), p["hidden"]
        self.W = torch.randn(m, K, F, generator=gen) * p["init_std"]
        self.bh = torch.zeros(F)
        # visible biases: log of each item's rating-value frequencies (the paper's initialisation)
        all_hot, _ = self._one_hot(np.arange(data.n_users))
        freq = all_hot.sum(0) + 1.0
        self.bv = torch.log(freq / freq.sum(-1, keepdim=True))
        del all_hot
        velocity = [torch.zeros_like(t) for t in (self.W, self.bv, self.bh)]
        active = np.flatnonzero(np.diff(self.ratings.indptr) > 0)
        for _ in range(p["epochs"]):
            order = active[torch.randperm(len(active), generator=gen).numpy()]
            for start in range(0, len(order), p["batch_size"]):
                v0, mask = self._one_hot(order[start : start + p["batch_size"]])
                h0 = self._hidden_probs(v0)
                h_sample = (torch.rand(h0.shape, generator=gen) < h0).float()
                v1 = self._visible_probs(h_sample) * mask[..., None]
                h1 = self._hidden_probs(v1)
                n = len(v0)
                grads = (
                    (torch.einsum("bmk,bf->mkf", v0, h0) - torch.einsum("bmk,bf->mkf", v1, h1)) / n
                    - p["weight_decay"] * self.W,
                    (v0 - v1).sum(0) / n,
                    (h0 - h1).sum(0) / n,
                )
                for param, vel, grad in zip((self.W, self.bv, self.bh), velocity, grads):
                    vel.mul_(p["momentum"]).add_(grad, alpha=p["lr"])
                    param.add_(vel)

    def _expected_ratings(self, users: np.ndarray) -> np.ndarray:
        """(len(users), m) expected rating of every item."""
        values = torch.from_numpy(self.levels.astype(np.float32))
        out = []
        for start in range(0, len(users), USER_CHUNK):
            v0, _ = self._one_hot(users[start : start + USER_CHUNK])
            out.append((self._visible_probs(self._hidden_probs(v0)) * values).sum(-1).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, self.n_items))

    def pair_scores(self, users, items, timestamps=None) -> np.ndarray:
        users, items = np.asarray(users), np.asarray(items)
        out = np.full(len(users), self.global_mean)
        known = np.flatnonzero((users >= 0) & (items >= 0))
        unique, inverse = np.unique(users[known], return_inverse=True)
        if len(unique):
            out[known] = self._expected_ratings(unique)[inverse, items[known]]
        return out

    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        return self._expected_ratings(users)

    def _state(self) -> dict[str, np.ndarray]:
        return {
            "W": self.W.numpy(), "bv": self.bv.numpy(), "bh": self.bh.numpy(), "levels": self.levels,
            "r_data": self.ratings.data, "r_indices": self.ratings.indices, "r_indptr": self.ratings.indptr,
        }

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        import scipy.sparse as sp

        self.W, self.bv, self.bh = (torch.from_numpy(arrays[k]) for k in ("W", "bv", "bh"))
        self.levels = arrays["levels"]
        self.ratings = sp.csr_matrix(
            (arrays["r_data"], arrays["r_indices"], arrays["r_indptr"]), shape=(len(self.users), len(self.items))
        )
