"""Netflix-Prize blending: members are fitted on a training part, a combiner learns how to mix
their predictions on a held-out part, then the members are refitted on everything.

The members' fits run concurrently on `workers` threads (0: one per core), both fits of every
member at once, and the combiners learn while the last refits finish. Threads, not processes:
the fits spend their time in compiled code that releases the GIL (the numba SGD epoch, sparse
products, numpy), they share the training data without copying it, and nothing is pickled.
Every member draws from its own seeded generator, so the result does not depend on scheduling.

Combiners: `ridge` (linear, with intercept) and `gbt` (gradient-boosted trees, which may also use
the user's and item's support as features). Both are always fitted; `combiner` picks the one
used for predictions (`auto`: the one with the lower RMSE when each learns on a random half of
the held-out part and is scored on the other half), `member_scores` exposes every member and
both blends for reporting. Why `auto`: which combiner wins depends on how much the held-out part
holds. On validation (the inner folds of `streamrec tune`) ridge beat the trees on MovieLens
100K (0.9096 against 0.9138; 16,000 held-out ratings) and lost on a 950,000-rating log (0.8520
against 0.8399; 152,000), as trees with support features won the Netflix Prize's blends.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
from pydantic import Field

from streamrec.core.params import ModelParams
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities, Recommender
from streamrec.trainer.models.combiners import BoostedTrees, RidgeCombiner

DEFAULT_MEMBERS = "mf-sgd,svdpp,item-knn,user-knn,neighborhood-factor"
COMBINERS = ("ridge", "gbt")  # the fitted combiners, by their index in a saved model


class BlendParams(ModelParams):
    """Members (comma-separated model names, each at its defaults and the blend's seed), the
    combiner used for predictions (`auto`: chosen on the held-out part, see the module doc), the
    held-out share the combiners learn on, their settings,
    and the threads the members' fits share (0: one per core)."""

    members: str = DEFAULT_MEMBERS
    combiner: Literal["auto", "ridge", "gbt"] = "auto"
    holdout: float = 0.2
    ridge_alpha: float = 1.0
    gbt_iterations: int = 200
    seed: int = 0
    workers: int = Field(0, ge=0)


class Blend(Recommender):
    """Members and both combiners; saved as one model (combiners' arrays, then each member's
    learned arrays under `member<n>.`; members share the blend's id maps and seen items, since
    they are refitted on the blend's own training data)."""

    name = "blend"
    capabilities = Capabilities(explicit=True)
    Params = BlendParams

    def _member_names(self) -> list[str]:
        return [name.strip() for name in self.params["members"].split(",") if name.strip()]

    def _new_members(self) -> list[Recommender]:
        from streamrec.trainer.models import model_class

        members = []
        for name in self._member_names():
            cls = model_class(name)
            members.append(cls(seed=self.params["seed"]) if "seed" in cls.Params.model_fields else cls())
        return members

    def _features(self, predictions: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """GBT inputs: member predictions plus log support of the user and the item."""
        user_support = np.log1p(np.asarray(self.seen.sum(axis=1)).ravel())
        support_u = np.where(users >= 0, user_support[np.maximum(users, 0)], 0.0)
        support_i = np.where(items >= 0, np.log1p(self.popularity[np.maximum(items, 0)]), 0.0)
        return np.column_stack([predictions, support_u, support_i])

    def _fit(self, data: Interactions) -> None:
        p = self.params
        held = np.random.default_rng(p["seed"]).random(len(data)) < p["holdout"]
        train, probe = data.subset(~held), data.subset(held)
        workers = p["workers"] or os.cpu_count() or 1
        with ThreadPoolExecutor(workers, thread_name_prefix="blend-member") as pool:
            try:
                # each member's two fits side by side, so that the slowest member's pair is split
                # across threads instead of finishing alone at the end
                final = self._new_members()
                jobs: list[tuple[Future[Recommender], Future[float]]] = [
                    (pool.submit(for_probe.fit, train), pool.submit(self._timed_fit, for_all, data))
                    for for_probe, for_all in zip(self._new_members(), final)
                ]
                members = [probe_fit.result() for probe_fit, _ in jobs]
                X = np.column_stack([m.pair_scores(probe.user_idx, probe.item_idx, probe.timestamps) for m in members])
                low, high = data.rating_scale
                X = np.clip(X, low, high)
                features = self._features(X, probe.user_idx, probe.item_idx)
                self.ridge = RidgeCombiner.fit(X, probe.ratings, p["ridge_alpha"])
                self.gbt = BoostedTrees.fit(features, probe.ratings, p["gbt_iterations"], p["seed"])
                self.combiner = (self._choose_combiner(X, features, probe.ratings) if p["combiner"] == "auto"
                                 else p["combiner"])
                seconds = [full_fit.result() for _, full_fit in jobs]
            except BaseException:  # a failed fit or an interrupt: queued fits need not start
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        self.members = final
        self.member_fit_seconds = dict(zip(self._member_names(), seconds))

    def _choose_combiner(self, X: np.ndarray, features: np.ndarray, ratings: np.ndarray) -> str:
        """`ridge` or `gbt`: each learns on a random half of the held-out rows and predicts the
        other half; the lower RMSE wins (ties go to ridge, the cheaper)."""
        p = self.params
        half = np.random.default_rng(p["seed"] + 1).random(len(ratings)) < 0.5
        if half.all() or not half.any():
            return "ridge"
        ridge = RidgeCombiner.fit(X[half], ratings[half], p["ridge_alpha"]).predict(X[~half])
        trees = BoostedTrees.fit(features[half], ratings[half], p["gbt_iterations"], p["seed"]).predict(features[~half])
        errors = {name: float(np.mean((pred - ratings[~half]) ** 2)) for name, pred in (("ridge", ridge), ("gbt", trees))}
        return "gbt" if errors["gbt"] < errors["ridge"] else "ridge"

    def _timed_fit(self, member: Recommender, data: Interactions) -> float:
        """Fit a final member on all of the blend's data; its wall seconds (with other fits
        running beside it: the blend's cost is its members')."""
        start = time.perf_counter()
        member.fit(data)
        return time.perf_counter() - start

    def member_scores(self, users, items, timestamps=None) -> dict[str, np.ndarray]:
        """Every member's prediction and both blends, for per-member reports."""
        users, items = np.asarray(users), np.asarray(items)
        low, high = self.rating_scale
        X = np.clip(
            np.column_stack([m.pair_scores(users, items, timestamps) for m in self.members]), low, high
        )
        scores = {name: X[:, n] for n, name in enumerate(self._member_names())}
        scores["blend-ridge"] = self.ridge.predict(X)
        scores["blend-gbt"] = self.gbt.predict(self._features(X, users, items))
        return scores

    def _pair_scores(self, users, items, timestamps=None) -> np.ndarray:
        return self.member_scores(users, items, timestamps)[f"blend-{self.combiner}"]

    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        grid_u = np.repeat(users, self.n_items)
        grid_i = np.tile(np.arange(self.n_items), len(users))
        return self._pair_scores(grid_u, grid_i).reshape(len(users), self.n_items)

    def _state(self) -> dict[str, np.ndarray]:
        state = {"combiner": np.array(COMBINERS.index(self.combiner))}
        state.update({f"ridge.{k}": v for k, v in self.ridge.state().items()})
        state.update({f"gbt.{k}": v for k, v in self.gbt.state().items()})
        for n, member in enumerate(self.members):
            state.update({f"member{n}.{k}": v for k, v in member._state().items()})
            state[f"scale{n}"] = np.array([member.global_mean, member.rating_unit])  # a member may fit in stars
        return state

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        # a blend saved before `auto` existed used the combiner its params named
        self.combiner = COMBINERS[int(arrays["combiner"])] if "combiner" in arrays else self.params["combiner"]
        self.ridge = RidgeCombiner.from_state(part("ridge."))
        self.gbt = BoostedTrees.from_state(part("gbt."))
        self.members = self._new_members()
        for n, member in enumerate(self.members):
            member.users, member.items, member.seen = self.users, self.items, self.seen
            member.popularity, member.global_mean, member.rating_scale = (
                self.popularity, self.global_mean, self.rating_scale,
            )
            if f"scale{n}" in arrays:
                member.global_mean, member.rating_unit = (float(v) for v in arrays[f"scale{n}"])
            member._load_state(part(f"member{n}."))
