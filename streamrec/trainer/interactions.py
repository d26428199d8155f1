"""The training view of an event log: dense integer indices, sparse user x item matrices.

Every batch model trains on an `Interactions`; ids stay opaque strings outside it. A fixed item (or
user) universe can be passed in, so that a protocol can rank items that appear only in its test
split, and so that train and test splits of one log share one index space.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import numpy as np
import scipy.sparse as sp

from streamrec.stream.loaders import InteractionLog, id_codes, id_sort_key

Weighting = Literal["binary", "log1p", "raw"]
WEIGHTINGS: tuple[str, ...] = ("binary", "log1p", "raw")


@dataclass(frozen=True)
class IdIndex:
    """Opaque string ids <-> dense indices 0..n-1 (order: `id_sort_key`, so it is deterministic)."""

    ids: np.ndarray  # object array of str, position = index
    _lookup: dict[str, int] = field(repr=False, compare=False)

    @classmethod
    def from_ids(cls, ids: np.ndarray) -> IdIndex:
        _, text = id_codes(ids)
        return cls.from_ordered(text[np.argsort(id_sort_key(text), kind="stable")])

    @classmethod
    def from_ordered(cls, ids: np.ndarray) -> IdIndex:
        """An index whose order is given (e.g. read back from a saved model)."""
        ordered = np.empty(len(ids), dtype=object)
        ordered[:] = list(map(str, ids))
        return cls(ordered, {v: i for i, v in enumerate(ordered)})

    def to_arrays(self, name: str) -> dict[str, np.ndarray]:
        """The ids as `<name>_bytes` (UTF-8, lone surrogates kept) and `<name>_offsets`, for a saved
        model or a published blob. A numpy string array was as wide as the longest id in every row
        (one 256-character id made a million users' array 1 GB) and lost trailing NUL characters."""
        encoded = [text.encode("utf-8", "surrogatepass") for text in self.ids]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        return {f"{name}_bytes": np.frombuffer(b"".join(encoded), np.uint8), f"{name}_offsets": offsets}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], name: str) -> IdIndex:
        """The index `to_arrays` wrote (or, from files written before it, the string array `<name>`);
        ValueError when the arrays do not describe distinct ids."""
        if f"{name}_bytes" not in arrays:
            if name not in arrays:
                raise ValueError(f"no {name} ids")
            ids = np.asarray(arrays[name])
            if ids.ndim != 1 or ids.dtype.kind not in "USO":
                raise ValueError(f"{name} ids are not a 1-d string array")
            return cls._distinct(cls.from_ordered(ids), name)
        data, offsets = arrays[f"{name}_bytes"], arrays.get(f"{name}_offsets")
        if (offsets is None or data.dtype != np.uint8 or data.ndim != 1 or offsets.ndim != 1
                or not np.issubdtype(offsets.dtype, np.integer) or not len(offsets) or offsets[0] != 0
                or offsets[-1] != len(data) or (np.diff(offsets) < 0).any()):
            raise ValueError(f"{name}_offsets do not split {name}_bytes into ids")
        raw, bounds = data.tobytes(), offsets.tolist()
        try:
            ids = [raw[start:end].decode("utf-8", "surrogatepass") for start, end in zip(bounds[:-1], bounds[1:])]
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} ids are not UTF-8 ({exc.reason})") from None
        return cls._distinct(cls.from_ordered(np.array(ids, dtype=object) if ids else np.empty(0, object)), name)

    @staticmethod
    def _distinct(index: IdIndex, name: str) -> IdIndex:
        if len(index._lookup) != len(index.ids):
            raise ValueError(f"an id appears twice among the {name}")
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, ids: np.ndarray | list[str]) -> np.ndarray:
        """Indices of `ids`; -1 for ids this index has never seen."""
        get = self._lookup.get
        return np.fromiter((get(str(v), -1) for v in ids), dtype=np.int64, count=len(ids))


def weight_values(rating: np.ndarray, weighting: Weighting) -> np.ndarray:
    """The events' values as implicit confidence (`--weights raw|log1p`): an event without a value
    counts 1; a negative or infinite value is refused. Check a log's events before its repeated
    pairs are summed (`distinct_pairs`): 5 then -3 summed to 2 and slipped through."""
    values = np.where(np.isnan(rating), 1.0, rating.astype(np.float64, copy=False))
    if weighting != "binary" and ((values < 0).any() or np.isinf(values).any()):
        raise ValueError(f"--weights {weighting} needs finite non-negative values; this log has others")
    return values


@dataclass(frozen=True)
class Interactions:
    """The indexed training view of one `InteractionLog`: the log's events plus their dense indices.

    The events stay in the log (the one column type of a training log); this view adds what models
    need on top: the id maps, each event's user/item index, and the sparse user x item matrices.
    `implicit` views read every event as one interaction (`ratings` is NaN throughout), whatever
    values the log carries. `matrix()` holds the latest explicit rating per (user, item) (1.0
    where implicit); `counts()` how often the pair occurred (implicit strength).
    """

    log: InteractionLog  # only events inside the index universe, in the log's order
    users: IdIndex
    items: IdIndex
    user_idx: np.ndarray  # int64 per event of `log`
    item_idx: np.ndarray  # int64 per event of `log`
    implicit: bool = False
    weighting: Weighting = "binary"  # what `strength()` gives models as implicit confidence
    # user x item, 1.0 where serving showed the item to the user and the user never picked it in
    # the log (`with_shown`, from the impressions topic): negatives truer than sampled ones
    shown: sp.csr_matrix | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_log(
        cls,
        log: InteractionLog,
        users: IdIndex | None = None,
        items: IdIndex | None = None,
        implicit: bool = False,
        weighting: Weighting = "binary",
    ) -> Interactions:
        """Index a log. Events whose user/item is outside a given universe are dropped.

        `implicit=True` discards rating values as ratings (every event is one interaction);
        `weighting` says whether `strength()` still reads them as confidence (play counts).
        """
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
        users = users or IdIndex.from_ids(log.user_id)
        items = items or IdIndex.from_ids(log.item_id)
        u, i = users.index(log.user_id), items.index(log.item_id)
        keep = (u >= 0) & (i >= 0)
        if keep.all():
            return cls(log, users, items, u, i, implicit, weighting)
        return cls(log.take(keep), users, items, u[keep], i[keep], implicit, weighting)

    def subset(self, mask: np.ndarray) -> Interactions:
        """The same index space restricted to some events (train/test splits)."""
        return Interactions(self.log.take(mask), self.users, self.items, self.user_idx[mask], self.item_idx[mask],
                            self.implicit, self.weighting, self.shown)

    def with_shown(self, user_ids: np.ndarray, item_ids: np.ndarray) -> Interactions:
        """This view with `shown`: the pairs (user_ids[n], item_ids[n]) that serving showed, less
        every pair the user picked in this log. Pairs outside the index (users or items the log
        does not hold) are dropped: nothing can be learned about them."""
        u, i = self.users.index(user_ids), self.items.index(item_ids)
        keep = (u >= 0) & (i >= 0)
        shown = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (u[keep], i[keep])),
                              shape=(self.n_users, self.n_items))
        shown.data[:] = 1.0  # a pair shown twice is one pair
        shown = (shown - shown.multiply(self.binary())).tocsr()
        shown.eliminate_zeros()
        return replace(self, shown=shown)

    def with_ratings_divided(self, unit: float) -> Interactions:
        """The same events with every rating divided by `unit` (a fit on another rating scale)."""
        return replace(self, log=replace(self.log, rating=self.log.rating / unit))

    def as_implicit(self) -> Interactions:
        """The same events read as implicit feedback (rating values ignored)."""
        return replace(self, implicit=True)

    @cached_property
    def ratings(self) -> np.ndarray:
        """float64 per event, NaN = implicit."""
        if self.implicit:
            return np.full(len(self), np.nan)
        return self.log.rating.astype(np.float64, copy=False)

    @property
    def timestamps(self) -> np.ndarray:
        """float64 epoch seconds per event."""
        return self.log.timestamp.astype(np.float64, copy=False)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return len(self.user_idx)

    @property
    def is_explicit(self) -> bool:
        return bool(len(self.ratings)) and bool(np.isfinite(self.ratings).all())

    @cached_property
    def global_mean(self) -> float:
        finite = self.ratings[np.isfinite(self.ratings)]
        return float(finite.mean()) if len(finite) else 0.0

    def _coo(self, data: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix(
            (data, (self.user_idx, self.item_idx)), shape=(self.n_users, self.n_items)
        )

    @cached_property
    def _last_event(self) -> np.ndarray:
        """Index of the last event of every distinct (user, item) pair, sorted by (user, item)."""
        key = self.user_idx * self.n_items + self.item_idx
        order = np.lexsort((np.arange(len(key)), key))
        last = np.r_[key[order][1:] != key[order][:-1], True]
        return order[last]

    def matrix(self) -> sp.csr_matrix:
        """User x item, latest rating per pair (1.0 for implicit events); canonical CSR."""
        last = self._last_event
        values = np.where(np.isfinite(self.ratings[last]), self.ratings[last], 1.0)
        return sp.csr_matrix(
            (values, (self.user_idx[last], self.item_idx[last])), shape=(self.n_users, self.n_items)
        )

    def counts(self) -> sp.csr_matrix:
        """User x item, number of events per pair (implicit feedback strength); canonical CSR."""
        m = self._coo(np.ones(len(self), dtype=np.float64))
        m.sum_duplicates()
        return m

    def strength(self) -> sp.csr_matrix:
        """User x item implicit confidence, what `weighting` asks for (EVALUATION.md `--weights`):
        `binary` the number of events per pair (1 once a protocol collapsed repeated pairs),
        `raw` the sum of the pair's values (an event without a value counts 1), `log1p` log(1 + that
        sum), which tames heavy play counts. Models with `Capabilities.weights` train on this."""
        if self.weighting == "binary":
            return self.counts()
        m = self._coo(weight_values(self.log.rating, self.weighting))
        m.sum_duplicates()
        if self.weighting == "log1p":
            m.data = np.log1p(m.data)
        if (m.data > np.finfo(np.float32).max).any():  # models train in float32
            raise ValueError(f"--weights {self.weighting}: a pair's value is beyond float32's range; "
                             "use --weights log1p")
        pairs = m.nnz
        m.eliminate_zeros()  # a zero confidence is no observation (implicit's convention)
        if not m.nnz:
            raise ValueError(f"--weights {self.weighting}: every pair's value is 0, so no pair carries weight; "
                             "use --weights binary")
        if m.nnz < pairs:
            warnings.warn(f"--weights {self.weighting}: {pairs - m.nnz} of {pairs} (user, item) pairs have value 0 "
                          "and are left out of training as unobserved", stacklevel=2)
        return m

    def binary(self) -> sp.csr_matrix:
        """User x item, 1.0 where the user interacted with the item."""
        m = self.counts()
        m.data[:] = 1.0
        return m

    def pair_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, rating, timestamp) with one row per distinct pair (the latest event)."""
        last = self._last_event
        values = np.where(np.isfinite(self.ratings[last]), self.ratings[last], 1.0)
        return self.user_idx[last], self.item_idx[last], values, self.timestamps[last]

    @cached_property
    def rating_scale(self) -> tuple[float, float]:
        finite = self.ratings[np.isfinite(self.ratings)]
        return (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
