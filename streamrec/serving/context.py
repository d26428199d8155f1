"""Context slices for new users (issue 17, cold start): a user without a row gets the items popular
in the context of their request (the daypart, the device) instead of the global trending list,
where such slices have proven to predict better (`streamrec.trainer.online.context_slices`).

A request names its context with `device=` and `hour=` (0-23, the client's local hour); without
`hour`, the daypart is the UTC hour of the newest event time counted, which is the wall clock in
live traffic and the replay's clock in a replay. A kind of slice is used only while its merit,
counted by the trainer on every positive event, shows it beats the global list
(`SliceTops.useful_kinds`), so on a log where context says nothing new users keep the trending list.

The score of an item is the mean, over the request's slices, of its share of the slice's decayed
popularity shrunk towards its share of all: lambda * p_slice + (1 - lambda) * p_all, with
lambda = n / (n + `context_prior`) for a slice of n events, so a small slice (a rare device) moves
the list little. A worker re-reads the slices every `context_refresh_s` on a thread of its own; a
request never waits for Redis here, and while Redis is down the last read stays in use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from streamrec.serving.config import ServingConfig
from streamrec.serving.refresher import Refresher
from streamrec.trainer.online.context_slices import ALL, SliceTops, daypart, device_slice
from streamrec.trainer.online.exploration import ExplorationStore


@dataclass(frozen=True)
class RequestContext:
    device: str | None = None
    hour: int | None = None  # 0-23, the client's local hour


NO_CONTEXT = RequestContext()


class ContextPopularity(Refresher):
    """The context slices as of the last read, and the cold lists they give."""

    def __init__(self, config: ServingConfig) -> None:
        super().__init__("context slices", config.context_refresh_s)
        self.config = config
        self.store = ExplorationStore.from_url(config.redis_url, config.feature_prefix, config.redis_cluster,
                                               timeout_s=max(config.redis_timeout_s, 1.0))
        self.tops = SliceTops.empty()

    def _read(self) -> None:
        self.tops = self.store.slice_tops(self.config.context_pool)

    def rank(self, context: RequestContext, n: int) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
        return rank(self.tops, context, n, self.config.context_prior)


def slices_for(tops: SliceTops, context: RequestContext) -> list[str]:
    """The request's slices of the kinds that have proven useful, that exist."""
    useful = tops.useful_kinds()
    hour = context.hour
    if hour is None and np.isfinite(tops.clock):
        hour = int(tops.clock // 3600 % 24)
    wanted = []
    if "daypart" in useful and hour is not None:
        wanted.append(daypart(hour))
    if "device" in useful and context.device is not None:
        wanted.append(device_slice(context.device))
    return [name for name in wanted if name in tops.lists]


def rank(tops: SliceTops, context: RequestContext, n: int, prior: float,
         ) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """(item ids, scores, slices used) of the n best items for `context`; None when no useful
    slice applies (the caller keeps the trending list)."""
    names = slices_for(tops, context)
    if not names or ALL not in tops.lists:
        return None
    reference = pd.Series(tops.lists[ALL][1] / max(tops.mass.get(ALL, 0.0), 1e-300), index=tops.lists[ALL][0])
    candidates = pd.Index(np.concatenate([tops.lists[name][0] for name in [ALL, *names]])).unique()
    p_all = reference.reindex(candidates, fill_value=0.0).to_numpy()
    score = np.zeros(len(candidates))
    for name in names:
        ids, weights = tops.lists[name]
        share = pd.Series(weights / max(tops.mass.get(name, 0.0), 1e-300), index=ids)
        events = tops.events.get(name, 0)
        weight = events / (events + prior) if events + prior > 0 else 0.0
        score += weight * share.reindex(candidates, fill_value=0.0).to_numpy() + (1.0 - weight) * p_all
    score /= len(names)
    order = np.argsort(-score, kind="stable")[:n]
    return candidates.to_numpy(object)[order], score[order], names
