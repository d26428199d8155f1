"""Biased matrix factorisation trained by SGD: r_ui = mu + b_u + b_i + p_u . q_i (survey, Part II)."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from streamrec.core.params import FloatRange, IntRange, ModelParams, space
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities, Recommender
from streamrec.trainer.models.sgd import factor_tables, gather_or_zero, generator
from streamrec.trainer.models.sgd_kernels import RatingRows, run_epoch


class BiasedMFParams(ModelParams):
    """Surprise SVD's defaults (100 factors, lr 0.005, reg 0.02, 20 epochs)."""

    factors: int = 100
    epochs: int = 20
    lr: float = 0.005
    reg: float = 0.02
    init_std: float = 0.1
    batch_size: int = Field(128, ge=1)
    seed: int = 0


class BiasedMF(Recommender):
    """Funk/Koren biased MF. Per-sample SGD rules of the survey, applied over mini-batches
    (`sgd_kernels.factor_epoch` without the implicit, time and neighbour parts):

    b_u += lr (e - reg b_u); b_i += lr (e - reg b_i); p_u += lr (e q_i - reg p_u); q_i += lr (e p_u - reg q_i)
    """

    name = "mf-sgd"
    fits_in_stars = True
    capabilities = Capabilities(explicit=True)  # on implicit data (all 1s) it has nothing to fit
    Params = BiasedMFParams
    search_space = space(factors=IntRange(10, 200, log=True), epochs=IntRange(10, 60),
                    lr=FloatRange(1e-3, 0.05, log=True), reg=FloatRange(1e-3, 0.2, log=True))

    def _fit(self, interactions: Interactions) -> None:
        p = self.params
        gen = generator(p["seed"])
        rows = RatingRows.of(interactions)
        theta = factor_tables(interactions.n_users, interactions.n_items, p["factors"], p["init_std"], gen)
        rates, regs = [p["lr"], p["lr"], 0.0, 0.0, 0.0], [p["reg"], p["reg"], 0.0, 0.0, 0.0]
        for _ in range(p["epochs"]):
            order = torch.randperm(len(rows), generator=gen).numpy()
            run_epoch(order, p["batch_size"], rows, self.global_mean, theta, None, rates, regs)
        self.P, self.Q, self.bu, self.bi = theta["P"], theta["Q"], theta["bu"], theta["bi"]

    def _pair_scores(self, users, items, timestamps=None) -> np.ndarray:
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
