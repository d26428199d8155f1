"""Frequency-filter admission (Monolith): an id gets a row only after `min_count` sightings.

Counting every id ever seen exactly would cost a hash-map entry per one-off id, which is exactly
the population the filter exists to keep out, so counts live in a count-min sketch of fixed size
(depth x width uint32 counters) with conservative update.

Error: the estimate never undercounts, so an id is never admitted late. It can overcount: with
probability at least 1 - exp(-depth), estimate <= true + (e / width) * N, where N is the number
of sightings counted so far (sightings of ids already admitted are not counted). With the defaults
(width 2**20, depth 4) that is estimate <= true + 2.6e-6 * N with probability >= 98.2%; e.g. after
1,000,000 sightings an id is admitted at most ~3 sightings early. Conservative update makes the
real error much smaller than this bound for skewed streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrec.param_server.keys import mix64

DEFAULT_WIDTH = 1 << 20
DEFAULT_DEPTH = 4
_DEPTH_SALT = np.uint64(0xD6E8FEB86659FD93)
_MAX_COUNT = np.uint64(np.iinfo(np.uint32).max)


@dataclass(frozen=True)
class Sightings:
    """A planned count: the counters' columns, their new values, and each key's new estimate."""

    columns: np.ndarray
    updated: np.ndarray
    estimates: np.ndarray


class CountMinSketch:
    def __init__(self, width: int = DEFAULT_WIDTH, depth: int = DEFAULT_DEPTH, counts: np.ndarray | None = None):
        if width & (width - 1):
            raise ValueError("sketch width must be a power of two")
        self.width = width
        self.depth = depth
        self.counts = np.zeros((depth, width), np.uint32) if counts is None else counts

    def _columns(self, keys: np.ndarray) -> np.ndarray:
        salts = (np.arange(1, self.depth + 1, dtype=np.uint64) * _DEPTH_SALT)[:, None]
        return (mix64(keys[None, :] ^ salts) & np.uint64(self.width - 1)).astype(np.int64)

    def plan(self, keys: np.ndarray) -> Sightings:
        """What counting one sighting per element of keys would do, without doing it: a push checks
        admission (and so the rows it needs) before it changes anything."""
        distinct, inverse, times = np.unique(keys, return_inverse=True, return_counts=True)
        cols = self._columns(distinct)
        rows = np.arange(self.depth)[:, None]
        estimate = self.counts[rows, cols].min(axis=0).astype(np.uint64)
        updated = np.minimum(estimate + times.astype(np.uint64), _MAX_COUNT).astype(np.uint32)
        return Sightings(cols, updated, updated[inverse.ravel()])

    def commit(self, sightings: Sightings) -> None:
        for depth in range(self.depth):  # conservative update: raise each counter only to the new estimate
            np.maximum.at(self.counts[depth], sightings.columns[depth], sightings.updated)

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Count one sighting per element of keys; return each element's estimated total count."""
        sightings = self.plan(keys)
        self.commit(sightings)
        return sightings.estimates
