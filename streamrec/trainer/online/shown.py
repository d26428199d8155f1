"""Shown but not picked: the items serving last showed each user, as negatives for online BPR.

Sampled negatives are items the user may never have seen; an item serving showed and the user
passed over is a truer negative (issue 17, "impressions as negatives"). `ShownItems` keeps, per
user, the items of the newest impression read from the impressions topic (`ImpressionFollower`
fills it from a thread). When the model learns a batch it draws negatives for each positive from
its user's shown items, leaving out every item the user picked in the batch, and then forgets the
user's answer: an impression is one decision, answered by the user's next positives. An item
passed over once is not passed over again at every later event (it was not shown again), and
pushing it down at each would bury items the user simply had not come to yet.

Memory is bounded: `per_user` items per user (serving shows k), and the `users` most recently
shown users; an older user is forgotten first. A user without shown items keeps the sampled
negatives. After a restart the follower re-reads the topic's recent records, so the memory holds
what serving showed lately, not exactly what it held before the crash: impression negatives are a
sharper signal, not state that exactly-once covers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from itertools import repeat

import numpy as np
import pandas as pd

from streamrec.stream.impressions import shown_items
from streamrec.trainer.online.metrics import IMPRESSION_NEGATIVES, IMPRESSIONS_READ

NO_ITEMS = np.empty(0, object)


class ShownItems:
    def __init__(self, per_user: int = 100, users: int = 200_000) -> None:
        self.per_user, self.users = per_user, users
        self._shown: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the follower's thread adds while the trainer takes
        self._kept, self._invalid = IMPRESSIONS_READ.labels("kept"), IMPRESSIONS_READ.labels("invalid")

    def __len__(self) -> int:
        return len(self._shown)

    def shown_to(self, user_id: str) -> list[str]:
        with self._lock:
            return self._shown.get(user_id, NO_ITEMS).tolist()

    def add(self, impressions: Iterable[object]) -> int:
        """Remember each impression's items as its user's newest shown items; returns how many
        were kept. Anything that is not an impression (no string `user_id`, `items` not a list of
        strings) is counted as invalid and skipped: the topic is serving's, but a reader trusts no
        record's shape."""
        kept = invalid = 0
        with self._lock:
            for parsed in map(shown_items, impressions):
                if parsed is None:
                    invalid += 1
                    continue
                user, items = parsed
                self._shown[user] = np.array(items[:self.per_user], object)
                self._shown.move_to_end(user)
                kept += 1
            while len(self._shown) > self.users:
                self._shown.popitem(last=False)
        self._kept.inc(kept)
        self._invalid.inc(invalid)
        return kept

    def take_negatives(self, user_ids: np.ndarray, item_ids: np.ndarray, count: int,
                       rng: np.random.Generator) -> np.ndarray:
        """(len(user_ids), count) object array: for each positive (user, item), items drawn with
        replacement from the user's shown items, none of which the user picked in this batch; None
        where the user has none. The users' shown items are then forgotten (answered)."""
        out = np.full((len(user_ids), count), None, object)
        codes, left, candidates = self._answer(user_ids, item_ids)
        if not count or not len(candidates):
            return out
        have = left[codes]
        found = np.flatnonzero(have)
        starts = (np.cumsum(left) - left)[codes[found]]
        draw = (rng.random((len(found), count)) * have[found, None]).astype(np.int64)
        out[found] = candidates[starts[:, None] + draw]
        IMPRESSION_NEGATIVES.inc(len(found) * count)
        return out

    def forget(self, user_ids: np.ndarray) -> None:
        """Forget what the users were shown: they answered it (events learned before a restart)."""
        self._answer(user_ids, None)

    def _answer(self, user_ids: np.ndarray, item_ids: np.ndarray | None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Take the shown items of the batch's distinct users out of the memory, less each user's
        picked items (`item_ids`, one per positive). Returns each event's user code, the items
        left per code and those items, grouped by code in code order."""
        codes, users = pd.factorize(np.asarray(user_ids, object))
        if not len(users):
            return codes, np.zeros(0, np.int64), NO_ITEMS
        with self._lock:
            pop = self._shown.pop
            lists = list(map(pop, np.asarray(users, object).tolist(), repeat(NO_ITEMS)))
        lengths = np.fromiter(map(len, lists), np.int64, len(lists))
        if not lengths.any():
            return codes, lengths, NO_ITEMS
        owner = np.repeat(np.arange(len(users)), lengths)
        candidates = np.concatenate(lists)
        if item_ids is None:
            return codes, lengths, candidates
        keep = ~_picked(owner, candidates, codes, np.asarray(item_ids, object))
        return codes, np.bincount(owner[keep], minlength=len(users)), candidates[keep]


def _picked(owner: np.ndarray, candidates: np.ndarray, codes: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """Whether each (owner, candidate item) pair is among the batch's (user code, item) pairs."""
    item_codes, _ = pd.factorize(np.concatenate([candidates, item_ids]))
    width = int(item_codes.max()) + 1
    shown_keys = owner * width + item_codes[:len(candidates)]
    picked_keys = codes * width + item_codes[len(candidates):]
    return np.isin(shown_keys, picked_keys)
