"""Biased matrix factorisation trained by SGD: r_ui = mu + b_u + b_i + p_u . q_i (survey, Part II)."""

from __future__ import annotations

import numpy as np
import torch

from streamrec.core.params import FloatRange, IntRange, ModelParams, space
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities, Recommender
from streamrec.trainer.models.sgd import (
    gather_or_zero,
    generator,
    shuffled_batches,
    single_threaded,
)


class BiasedMFParams(ModelParams):
    """Surprise SVD's defaults (100 factors, lr 0.005, reg 0.02, 20 epochs)."""

    factors: int = 100
    epochs: int = 20
    lr: float = 0.005
    reg: float = 0.02
    init_std: float = 0.1
    batch_size: int = 128
    seed: int = 0


class BiasedMF(Recommender):
    """Funk/Koren biased MF. Per-sample SGD rules of the survey, applied over mini-batches:

    b_u += lr (e - reg b_u); b_i += lr (e - reg b_i); p_u += lr (e q_i - reg p_u); q_i += lr (e p_u - reg q_i)
    """

    name = "mf-sgd"
    capabilities = Capabilities(explicit=True)  # on implicit data (all 1s) it has nothing to fit
    Params = BiasedMFParams
    search_space = space(factors=IntRange(10, 200, log=True), epochs=IntRange(10, 60),
                    lr=FloatRange(1e-3, 0.05, log=True), reg=FloatRange(1e-3, 0.2, log=True))

    @single_threaded()
    def _fit(self, interactions: Interactions) -> None:
        p = self.params
        gen = generator(p["seed"])
        users, items, ratings, _ = interactions.pair_view()
        u, i = torch.from_numpy(users), torch.from_numpy(items)
        r = torch.from_numpy(ratings.astype(np.float32))
        n_users, n_items, k = interactions.n_users, interactions.n_items, p["factors"]
        P = torch.randn(n_users, k, generator=gen) * p["init_std"]
        Q = torch.randn(n_items, k, generator=gen) * p["init_std"]
        bu, bi = torch.zeros(n_users), torch.zeros(n_items)
        mu, lr, reg = float(self.global_mean), p["lr"], p["reg"]
        for _ in range(p["epochs"]):
            for batch in shuffled_batches(len(r), p["batch_size"], gen):
                ub, ib = u[batch], i[batch]
                pu, qi, bub, bib = P[ub], Q[ib], bu[ub], bi[ib]
                err = r[batch] - (mu + bub + bib + (pu * qi).sum(1))
                bu.index_add_(0, ub, lr * (err - reg * bub))
                bi.index_add_(0, ib, lr * (err - reg * bib))
                P.index_add_(0, ub, lr * (err[:, None] * qi - reg * pu))
                Q.index_add_(0, ib, lr * (err[:, None] * pu - reg * qi))
        self.P, self.Q, self.bu, self.bi = P.numpy(), Q.numpy(), bu.numpy(), bi.numpy()

    def pair_scores(self, users, items, timestamps=None) -> np.ndarray:
        users, items = np.asarray(users), np.asarray(items)
        dot = (gather_or_zero(self.P, users) * gather_or_zero(self.Q, items)).sum(1)
        return self.global_mean + gather_or_zero(self.bu, users) + gather_or_zero(self.bi, items) + dot

    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        return (self.global_mean + self.bu[users, None] + self.bi[None, :]) + self.P[users] @ self.Q.T

    def item_vectors(self) -> np.ndarray:
        return self.Q

    def user_vectors(self) -> np.ndarray:
        return self.P

    def _state(self) -> dict[str, np.ndarray]:
        return {"P": self.P, "Q": self.Q, "bu": self.bu, "bi": self.bi}

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.P, self.Q, self.bu, self.bi = arrays["P"], arrays["Q"], arrays["bu"], arrays["bi"]
