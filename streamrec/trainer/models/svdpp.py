"""SVD++ (Koren, KDD 2008) and timeSVD++ (Koren, KDD 2009), trained by Koren's SGD rules.

Prediction (SVD++):  r_ui = mu + b_u + b_i + q_i . (p_u + |I_u|^-1/2 sum_{j in I_u} y_j)
timeSVD++ adds       b_u(t) = b_u + alpha_u dev_u(t) + b_{u,Bin(t)},  b_i(t) = b_i + b_{i,Bin(t)},
                     p_u(t) = p_u + alpha^p_u dev_u(t),  dev_u(t) = sign(t - t_u) |t - t_u|^beta (days).

Training minimises, per rating, 1/2 e^2 + lambda1/2 (biases^2) + lambda2/2 (|p_u|^2 + |q_i|^2 +
sum_j |y_j|^2) with the survey's per-sample updates, in Koren's loop over users (compiled in
`sgd_kernels.user_epoch`; `schedule=ratings`: mini-batches of ratings in random order,
`sgd_kernels.factor_epoch`); learning rates decay x0.9 per epoch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from streamrec.core.params import FloatRange, IntRange, ModelParams, space
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities, Recommender
from streamrec.trainer.models.sgd import factor_tables, gather_or_zero, generator
from streamrec.trainer.models.sgd_kernels import (
    RatingRows,
    implicit_rows,
    run_epoch,
    run_user_epoch,
    user_grouped_order,
)

DAY = 86400.0


class SVDppParams(ModelParams):
    """Chosen by `streamrec tune --model svdpp --protocol rating --data ml-100k --trials 30` on
    validation folds carved from the first fold's training part only (test folds never seen):
    validation RMSE 0.9223 against 0.9367 for Koren's survey values (factors 20, lr 0.007 / 0.005,
    reg 0.015 / 0.005), rounded to two significant digits. Learning rates decay x0.9 per epoch.

    `schedule`: `users` is Koren's loop (`sgd_kernels.user_epoch`: a user's ratings in a row, z_u
    summed once, y moved once per user), linear in the log; `ratings` is mini-batch SGD over the
    ratings in random order (`factor_epoch`), whose steps re-sum the implicit lists of every user
    they hold, a cost of about sum_u min(|R_u|, steps) |I_u| per epoch. Their validation RMSEs
    tie (MovieLens 100K 0.9226 against 0.9223, a 950k-rating log 0.9203 against 0.9197; timeSVD++
    0.9186 / 0.9183; neighborhood-factor 0.9180 / 0.9183 and 0.8715 / 0.8712) and `users` fits 2-3x
    faster on MovieLens 100K, 5-7x on the larger log: it is the default. A 30-trial search with
    `--param schedule=users` found nothing better than these values (best trial 0.9232).
    `batch_size` applies to `ratings` only."""

    factors: int = 14
    epochs: int = 19
    lr: float = 0.01
    lr_bias: float = 0.003
    reg: float = 0.0044
    reg_bias: float = 0.022
    lr_decay: float = 0.9
    init_std: float = 0.1
    batch_size: int = Field(1024, ge=1)
    schedule: Literal["users", "ratings"] = "users"
    seed: int = 0


class SVDpp(Recommender):
    """SVD++ with Koren's hyperparameters (survey table); see the module doc."""

    name = "svdpp"
    fits_in_stars = True
    capabilities = Capabilities(explicit=True)
    Params = SVDppParams
    search_space = space(factors=IntRange(5, 100, log=True), epochs=IntRange(10, 40),
                    lr=FloatRange(1e-3, 0.02, log=True), lr_bias=FloatRange(1e-3, 0.02, log=True),
                    reg=FloatRange(1e-3, 0.1, log=True), reg_bias=FloatRange(1e-3, 0.1, log=True))

    def _init_theta(self, data: Interactions, gen: torch.Generator) -> dict[str, np.ndarray]:
        k, std = self.params["factors"], self.params["init_std"]
        tables = factor_tables(data.n_users, data.n_items, k, std, gen)
        return tables | {"Y": (torch.randn(data.n_items, k, generator=gen) * std).numpy()}

    def _rates_and_regs(self) -> tuple[list[float], list[float]]:
        """Learning rates and regularisation of the bias, factor, drift, time-bin and
        neighbour-weight tables (`sgd_kernels.factor_epoch`'s order)."""
        p = self.params
        return [p["lr_bias"], p["lr"], 0.0, 0.0, 0.0], [p["reg_bias"], p["reg"], 0.0, 0.0, 0.0]

    def _rating_rows(self, data: Interactions) -> RatingRows:
        return RatingRows.of(data)

    def _fit(self, data: Interactions) -> None:
        p = self.params
        gen = generator(p["seed"])
        theta = self._init_theta(data, gen)
        binary = data.binary()
        implicit = implicit_rows(binary)
        rows = self._rating_rows(data)
        rates, regs = (np.asarray(v, np.float64) for v in self._rates_and_regs())
        for _ in range(p["epochs"]):
            if p["schedule"] == "users":
                order = user_grouped_order(rows.users, data.n_users, gen)
                run_user_epoch(order, rows, self.global_mean, theta, implicit, rates, regs)
            else:
                order = torch.randperm(len(rows), generator=gen).numpy()
                run_epoch(order, p["batch_size"], rows, self.global_mean, theta, implicit, rates, regs)
            rates = rates * p["lr_decay"]
        self.theta = theta
        # implicit part of each user's vector: |I_u|^-1/2 sum of y_j over the user's items
        self.z = ((binary.multiply(implicit[2][:, None])).tocsr() @ theta["Y"]).astype(np.float32)

    def _time_terms(self, users: np.ndarray, items: np.ndarray, timestamps) -> tuple[np.ndarray, np.ndarray]:
        """Extra bias and user-factor offset at time t (none for SVD++)."""
        return np.zeros(len(users)), np.zeros((len(users), self.theta["P"].shape[1]))

    def _pair_scores(self, users, items, timestamps=None) -> np.ndarray:
        users, items = np.asarray(users), np.asarray(items)
        th = self.theta
        bias, offset = self._time_terms(users, items, timestamps)
        user = gather_or_zero(th["P"], users) + gather_or_zero(self.z, users) + offset
        return (
            self.global_mean + gather_or_zero(th["bu"], users) + gather_or_zero(th["bi"], items) + bias
            + (gather_or_zero(th["Q"], items) * user).sum(1)
        )

    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        th = self.theta
        user = th["P"][users] + self.z[users]
        return self.global_mean + th["bu"][users, None] + th["bi"][None, :] + user @ th["Q"].T

    def item_vectors(self) -> np.ndarray:
        return self.theta["Q"]

    def user_vectors(self) -> np.ndarray:
        return self.theta["P"] + self.z

    def _state(self) -> dict[str, np.ndarray]:
        return {**self.theta, "z": self.z}

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.z = arrays.pop("z")
        self.theta = arrays


class TimeSVDppParams(SVDppParams):
    """SVD++'s plus the time terms: drift exponent beta, time bins, and the drift slopes' tiny
    learning rate with strong regularisation (Koren 2009)."""

    beta: float = 0.4
    bins: int = 30
    lr_bin: float = 0.005
    reg_bin: float = 0.1
    lr_alpha: float = 1e-5
    reg_alpha: float = 50.0


class TimeSVDpp(SVDpp):
    """timeSVD++: SVD++ plus drifting user biases/factors and per-time-bin biases (beta = 0.4).

    Time is in days; bins split the training period evenly; dev_u uses the user's mean rating day.
    The drift slopes get Koren's tiny learning rate and strong regularisation (1e-5, 50).
    """

    name = "timesvdpp"
    capabilities = Capabilities(explicit=True, time_aware=True)
    Params = TimeSVDppParams

    def _fit(self, data: Interactions) -> None:
        days = data.timestamps / DAY
        self.t_start, self.t_end = float(days.min()), float(days.max())
        sums = np.bincount(data.user_idx, weights=days, minlength=data.n_users)
        counts = np.bincount(data.user_idx, minlength=data.n_users)
        self.user_mean_day = sums / np.maximum(counts, 1)
        super()._fit(data)

    def _dev_and_bin(self, users: np.ndarray, timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        days = np.asarray(timestamps, dtype=np.float64) / DAY
        diff = days - gather_or_zero(self.user_mean_day, users)
        dev = np.where(users >= 0, np.sign(diff) * np.abs(diff) ** self.params["beta"], 0.0)
        span = max(self.t_end - self.t_start, 1e-9)
        bins = np.clip(((days - self.t_start) / span * self.params["bins"]).astype(np.int64), 0, self.params["bins"] - 1)
        return dev, bins

    def _init_theta(self, data: Interactions, gen: torch.Generator) -> dict[str, np.ndarray]:
        theta = super()._init_theta(data, gen)
        k, bins = self.params["factors"], self.params["bins"]
        return theta | {
            "au": np.zeros(data.n_users, np.float32), "Ap": np.zeros((data.n_users, k), np.float32),
            "but": np.zeros((data.n_users, bins), np.float32), "bit": np.zeros((data.n_items, bins), np.float32),
        }

    def _rates_and_regs(self) -> tuple[list[float], list[float]]:
        p = self.params
        rates, regs = super()._rates_and_regs()
        rates[2:4], regs[2:4] = [p["lr_alpha"], p["lr_bin"]], [p["reg_alpha"], p["reg_bin"]]
        return rates, regs

    def _rating_rows(self, data: Interactions) -> RatingRows:
        users, _, _, stamps = data.pair_view()
        dev, bins = self._dev_and_bin(users, stamps)
        return replace(super()._rating_rows(data), dev=dev.astype(np.float32), bins=bins.astype(np.int64))

    def _time_terms(self, users, items, timestamps) -> tuple[np.ndarray, np.ndarray]:
        if timestamps is None:  # no time given: the static part of the model
            return super()._time_terms(users, items, timestamps)
        th = self.theta
        dev, bins = self._dev_and_bin(users, timestamps)
        known_u, known_i = users >= 0, items >= 0
        but = np.where(known_u, th["but"][np.maximum(users, 0), bins], 0.0)
        bit = np.where(known_i, th["bit"][np.maximum(items, 0), bins], 0.0)
        bias = gather_or_zero(th["au"], users) * dev + but + bit
        return bias, gather_or_zero(th["Ap"], users) * dev[:, None]

    def _state(self) -> dict[str, np.ndarray]:
        return super()._state() | {
            "user_mean_day": self.user_mean_day, "t_range": np.array([self.t_start, self.t_end]),
        }

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.user_mean_day = arrays.pop("user_mean_day")
        self.t_start, self.t_end = (float(v) for v in arrays.pop("t_range"))
        super()._load_state(arrays)
