"""Events applied per item, counted by the shard independently of the offsets bookkeeping.

Why a second count: the dedup watermarks decide what is applied, so they cannot also prove that
nothing was lost or applied twice. A chaos run compares these counts with a direct count of the
log instead. Every shard counts every item of the pushes it applies, so each shard's counts can be
checked on their own. Updates run in C-level iteration (map/zip/dict.update), not a Python loop; no pandas, which the
shard process does not otherwise load (with pyarrow installed pandas brings it along: ~50 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import count, repeat

import numpy as np

from streamrec.param_server.defaults import MAX_EVENTS_PER_PUSH


def checked_counts(item_ids: Sequence[str], counts: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Distinct ids with their counts summed, or a ValueError for malformed input."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size != len(item_ids) or counts.dtype.kind not in "iu":
        raise ValueError(f"item counts must be {len(item_ids)} integers, one per item id, got {counts.dtype} {counts.shape}")
    if counts.size and (counts.min() < 0 or counts.max() > MAX_EVENTS_PER_PUSH):
        raise ValueError(f"item counts must be in [0, {MAX_EVENTS_PER_PUSH}]")
    ids = list(item_ids)
    if not all(map(isinstance, ids, repeat(str))):
        raise ValueError("item ids must be strings")
    position = dict(zip(dict.fromkeys(ids), count()))  # distinct ids in order of first appearance
    codes = np.fromiter(map(position.__getitem__, ids), np.int64, len(ids))
    sums = np.zeros(len(position), np.int64)
    np.add.at(sums, codes, counts.astype(np.int64))
    if sums.size and sums.max() > MAX_EVENTS_PER_PUSH:  # an id repeated with large counts adds up past the cap
        raise ValueError(f"an item's counts in one push must add up to at most {MAX_EVENTS_PER_PUSH}")
    return list(position), sums


class ItemEventCounts:
    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: dict[str, int] = dict(counts or {})

    def add(self, item_ids: list[str], counts: np.ndarray) -> None:
        """Add counts of distinct ids (as `checked_counts` returns them)."""
        old = np.fromiter(map(self.counts.get, item_ids, repeat(0)), np.int64, len(item_ids))
        self.counts.update(zip(item_ids, (old + counts).tolist()))
