"""Exploration slots (issue 17, cold start): a share of each answer goes to fresh items, chosen by
Thompson sampling on their click-through rates.

A list ranked by a model learned from interactions shows almost only items that already have
many: a new item gets no impressions, so no clicks, so no signal. Exploration gives it slots in
proportion to the chance that it is good. Each fresh item (first seen less than 48 h of event
time ago, or shown fewer than 100 times; `streamrec.trainer.online.exploration`) has a Beta
posterior over its click-through rate, Beta(a + clicks, b + impressions - clicks); one draw per
item per request, and the best draws take the slots. The prior (a, b) is centred on the pool's
own click-through rate with the strength of `explore_prior` impressions, so an item never shown
is drawn around what fresh items usually do rather than from a uniform prior, which would give
the slots to whatever was shown least.

The slots are the last `share * k` positions of the answer (a fractional part becomes a slot with
that probability), never an item the user has seen, one the filters or rules exclude, or one
already in the list. For a user with a vector, the draws are among the `explore_candidates` (5)
eligible fresh items their vector scores highest: a slot given to whichever fresh item drew best,
for anyone, displaced the answer's tenth item for one this user had little reason to want, and
cost 7.5% of a replay's hits (docs/serving.md, "Cold start: measured in the simulator"). A new
item's row starts where the content tower puts it, so the user's score already says something
about it; the draw then decides among the plausible ones by their clicks.

A worker re-reads the pool's counts every `explore_refresh_s` on a thread of its own, so a request
never waits for Redis here; while Redis is down the last pool read stays in use. Counting
impressions and clicks is the trainer's (`train-online --explore`).
"""

from __future__ import annotations

import logging

import numpy as np

from streamrec.serving.config import ServingConfig
from streamrec.serving.refresher import Refresher
from streamrec.serving.state import ServingState
from streamrec.trainer.online.exploration import ExplorationConfig, ExplorationStore, FreshItems

log = logging.getLogger(__name__)


class ExplorationPool(Refresher):
    """The fresh items and their counts, as of the last read."""

    def __init__(self, config: ServingConfig) -> None:
        super().__init__("exploration pool", config.explore_refresh_s)
        self.config = config
        self.store = ExplorationStore.from_url(
            config.redis_url, config.feature_prefix, config.redis_cluster, timeout_s=max(config.redis_timeout_s, 1.0),
            config=ExplorationConfig(config.explore_max_age_s, config.explore_min_impressions))
        self.fresh = FreshItems.empty()
        self._rows: tuple[ServingState, FreshItems, np.ndarray] | None = None

    def _read(self) -> None:
        self.fresh = self.store.fresh(self.config.explore_pool)

    def rows(self, state: ServingState) -> tuple[FreshItems, np.ndarray]:
        """The pool and its items' rows in `state` (-1: no row yet), looked up once per pool read
        and state."""
        fresh, cached = self.fresh, self._rows
        if cached is None or cached[0] is not state or cached[1] is not fresh:
            rows = state.items.positions(list(fresh.ids)) if len(fresh) else np.zeros(0, np.int64)
            self._rows = cached = (state, fresh, rows)
        return fresh, cached[2]


def slots(share: float, k: int, rng: np.random.Generator) -> int:
    """How many of k slots explore: share * k, its fractional part a slot with that probability."""
    expected = share * k
    whole = int(expected)
    return min(k, whole + int(rng.random() < expected - whole))


def closest(scores: np.ndarray, eligible: np.ndarray, n: int) -> np.ndarray:
    """`eligible` narrowed to its n best-scored items (all of it when n is 0 or it has no more)."""
    candidates = np.flatnonzero(eligible)
    if n <= 0 or len(candidates) <= n:
        return eligible
    narrowed = np.zeros_like(eligible)
    narrowed[candidates[np.argpartition(-scores[candidates], n - 1)[:n]]] = True
    return narrowed


def thompson(fresh: FreshItems, eligible: np.ndarray, n: int, prior: float, rng: np.random.Generator,
             ) -> tuple[np.ndarray, np.ndarray]:
    """(positions in `fresh`, draws) of the n eligible items with the best draws from their Beta
    posteriors, best first; the prior is centred on the pool's click-through rate. Counts that give
    no posterior (a negative one, clicks above impressions) explore nothing rather than fail the
    request."""
    candidates = np.flatnonzero(eligible)
    if not len(candidates) or n <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    shown, clicks = fresh.shown[candidates].astype(np.float64), fresh.clicks[candidates].astype(np.float64)
    rate = (fresh.clicks.sum(dtype=np.float64) + 1.0) / (fresh.shown.sum(dtype=np.float64) + 2.0)
    try:
        draws = rng.beta(prior * rate + clicks, prior * (1.0 - rate) + shown - clicks)
    except ValueError as exc:  # counts no posterior has (the store's reads never give them): not this request's fault
        log.warning("no exploration for this request: the fresh items' counts give no Beta posterior (%s)", exc)
        return np.zeros(0, np.int64), np.zeros(0)
    best = np.argsort(-draws, kind="stable")[:n]
    return candidates[best], draws[best]
