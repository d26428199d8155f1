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

    def _rated(self, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The users' ratings as pairs: (row in `users`, item, rating level), each a (P,) tensor.
        Only rated items take part in either phase, so every product runs over these pairs (a
        user rates ~5 % of MovieLens's items) instead of a dense (users, items, levels) block."""
        rows = self.ratings[users]
        owner = np.repeat(np.arange(len(users)), np.diff(rows.indptr))
        levels = np.searchsorted(self.levels, rows.data).clip(0, len(self.levels) - 1)
        return torch.from_numpy(owner), torch.from_numpy(rows.indices.astype(np.int64)), torch.from_numpy(levels)

    def _hidden_probs(self, n: int, owner: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """p(h | visible) for `n` users; `visible` (P, K) are the rated pairs' unit activations and
        `weights` (P, K, F) their items' rows of W."""
        drive = torch.zeros(n, self.bh.shape[0]).index_add_(0, owner, torch.bmm(visible[:, None, :], weights)[:, 0])
        return torch.sigmoid(self.bh + drive)

    def _visible_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, m, K) p(v | h) of every item: predictions."""
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
        _, items, levels = self._rated(np.arange(data.n_users))
        freq = torch.from_numpy(np.bincount((items * K + levels).numpy(), minlength=m * K).reshape(m, K)).float() + 1.0
        self.bv = torch.log(freq / freq.sum(-1, keepdim=True))
        velocity = [torch.zeros_like(t) for t in (self.W, self.bv, self.bh)]
        lr, momentum, decay = p["lr"], p["momentum"], p["weight_decay"]
        active = np.flatnonzero(np.diff(self.ratings.indptr) > 0)
        for _ in range(p["epochs"]):
            order = active[torch.randperm(len(active), generator=gen).numpy()]
            for start in range(0, len(order), p["batch_size"]):
                n = len(order[start : start + p["batch_size"]])
                owner, items, levels = self._rated(order[start : start + p["batch_size"]])
                weights, cells = self.W[items], items * K + levels  # (P, K, F); each rating's row of W.view(m * K, F)
                # positive phase: the observed ratings are one-hot, so each pair drives (and is driven
                # by) one row of W
                h0 = torch.sigmoid(self.bh + torch.zeros(n, F).index_add_(0, owner, self.W.view(m * K, F)[cells]))
                h_sample = (torch.rand(h0.shape, generator=gen) < h0).float()
                v1 = torch.softmax(self.bv[items] + torch.bmm(weights, h_sample[owner, :, None])[..., 0], dim=-1)
                h1 = self._hidden_probs(n, owner, weights, v1)
                # momentum SGD, the gradient added straight into the velocities (no dense gradient
                # tensor): v = momentum v + lr (<v0 h0> - <v1 h1> - decay W), then W += v
                vel_w, vel_bv, vel_bh = velocity
                vel_w.mul_(momentum).add_(self.W, alpha=-lr * decay)
                vel_w.index_add_(0, items, v1[:, :, None] * h1[owner, None, :], alpha=-lr / n)
                vel_w.view(m * K, F).index_add_(0, cells, h0[owner], alpha=lr / n)
                vel_bv.mul_(momentum).index_add_(0, items, torch.nn.functional.one_hot(levels, K).float() - v1,
                                                 alpha=lr / n)
                vel_bh.mul_(momentum).add_((h0 - h1).sum(0), alpha=lr / n)
                for param, vel in zip((self.W, self.bv, self.bh), velocity):
                    param.add_(vel)

    def _expected_ratings(self, users: np.ndarray) -> np.ndarray:
        """(len(users), m) expected rating of every item."""
        values = torch.from_numpy(self.levels.astype(np.float32))
        out = []
        for start in range(0, len(users), USER_CHUNK):
            chunk = users[start : start + USER_CHUNK]
            owner, items, levels = self._rated(chunk)
            hidden = self._hidden_probs(len(chunk), owner, self.W[items],
                                        torch.nn.functional.one_hot(levels, len(self.levels)).float())
            out.append((self._visible_probs(hidden) * values).sum(-1).numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, self.n_items))

    def _pair_scores(self, users, items, timestamps=None) -> np.ndarray:
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
