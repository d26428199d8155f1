"""Context slices (issue 17, cold start for new users): popularity per request context, for users
that have no row yet.

A user's first request comes before any event of theirs, so no model can tell them apart, but the
request still says something: the device it comes from and the time of day. The exploration
counter (`ExplorationFollower`) counts every positive event into the slices its context names, with
the same forward-decayed weight as the feature store's popularity (half-life 7 days), and serving
ranks a cold user's list by the slices of their request (`streamrec.serving.context`).

Slices, named `<kind>=<value>`:
- `daypart=0..3`: the event's hour of day // 6 (night, morning, afternoon, evening). The hour is the
  context's `hour` (0-23, the client's local time) when the event carries one, else the UTC hour of
  the event time;
- `device=<value>`: the context's `device`, when it is a short plain token (letters, digits, `_`,
  `.`, `-`, at most 32); any other device value counts as `device=other`;
- `all`: every positive event, the reference the slices are shrunk towards.

A slice is only worth using when it predicts better than the reference, and on many logs it does
not: in MovieLens the time of a rating says when someone sat down to rate, not what they like, and
the daypart lists follow a few heavy raters (over its 100,000 ratings the daypart's top 10 held the
next item 3.56% of the time, the global top 10 4.03%). So the counter also keeps a prequential
merit per kind: for each positive event, whether its item is in the top 10 of its slice
and whether it is in the top 10 of `all`, both as they were before the event was counted. Serving
uses a kind only while its slices' hits beat the reference's by two standard errors (`useful_kinds`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from streamrec.stream.events import EventBatch

DAYPARTS = 4
ALL = "all"
MERIT_TOP = 10  # the list length of the prequential merit
_DEVICE = re.compile(r"[A-Za-z0-9_.\-]{1,32}\Z")


@dataclass(frozen=True)
class SliceConfig:
    half_life_s: float = 7 * 86_400.0  # decay of the slice popularity, in event time
    max_slices: int = 64  # distinct slice names kept (`all` among them); later ones count as `<kind>=other`
    slice_items: int = 1000  # items kept per slice, the most popular


def daypart(hour: int) -> str:
    return f"daypart={hour * DAYPARTS // 24}"


_DAYPART_OF_HOUR = np.array([daypart(hour) for hour in range(24)], object)


def device_slice(device: object) -> str:
    """The slice of a device value: itself when a plain short token, else `device=other`."""
    return f"device={device}" if isinstance(device, str) and _DEVICE.match(device) else "device=other"


def context_hour(context: object) -> int | None:
    """The context's `hour` (0-23), None when absent or not an integer in range."""
    hour = context.get("hour") if isinstance(context, dict) else None
    return hour if type(hour) is int and 0 <= hour < 24 else None


def kind_of(names: pd.Series) -> pd.Series:
    return names.str.split("=", n=1).str[0]


def event_slices(batch: EventBatch, counted: np.ndarray) -> pd.DataFrame:
    """One row per (counted event, slice it belongs to): columns `event` (position in the batch),
    `slice`, `item`, `t`. Every counted event is in `all` and in its daypart; one with a `device`
    in its context is in that device's slice too."""
    events = np.flatnonzero(counted)
    hours = (np.floor(batch.timestamp[events] / 3600.0) % 24).astype(np.int64)
    contexts = batch.context[events]
    carrying = np.flatnonzero([isinstance(c, dict) for c in contexts.tolist()])  # positions in `events`
    device_rows: list[int] = []
    device_names: list[str] = []
    for row, context in zip(carrying.tolist(), contexts[carrying].tolist()):  # only the events that carry one
        hour = context_hour(context)
        if hour is not None:
            hours[row] = hour
        if "device" in context:
            device_rows.append(row)
            device_names.append(device_slice(context["device"]))
    base = pd.DataFrame({"event": events, "item": batch.item_id[events], "t": batch.timestamp[events]})
    parts = [base.assign(slice=ALL), base.assign(slice=_DAYPART_OF_HOUR[hours])]
    if device_rows:
        parts.append(base.iloc[device_rows].assign(slice=np.array(device_names, object)))
    return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True)
class SliceCounts:
    """What one count adds to the slices: per (slice, item) the events and their decayed weight
    relative to `hint` (an event time; the store converts to its landmark), and per kind the
    prequential merit (events, hits of the kind's slices, hits of `all`)."""

    names: np.ndarray  # object
    items: np.ndarray  # object
    events: np.ndarray  # int64
    weights: np.ndarray  # float64: sum of 2^((t - hint) / half_life)
    hint: float
    merit_kinds: np.ndarray  # object
    merit_events: np.ndarray  # int64
    merit_hits: np.ndarray  # int64
    merit_reference_hits: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.names)


def slice_counts(rows: pd.DataFrame, half_life_s: float, tops: dict[str, np.ndarray]) -> SliceCounts:
    """Aggregate `event_slices` rows. `tops`: each slice's top `MERIT_TOP` items before this count
    (missing: an empty list), for the merit."""
    if not len(rows):
        empty = np.empty(0, object)
        return SliceCounts(empty, empty, np.zeros(0, np.int64), np.zeros(0), 0.0, empty, np.zeros(0, np.int64),
                           np.zeros(0, np.int64), np.zeros(0, np.int64))
    hint = float(rows["t"].max())  # every weight at most 1: 2^x overflows from x = 1,024
    weighted = rows.assign(w=np.exp2((rows["t"].to_numpy(np.float64) - hint) / half_life_s))
    per = weighted.groupby(["slice", "item"], sort=False).agg(events=("w", "size"), weights=("w", "sum"))
    names = per.index.get_level_values(0).to_numpy(object)
    items = per.index.get_level_values(1).to_numpy(object)
    top_pairs = pd.MultiIndex.from_tuples([(name, item) for name, top in tops.items() for item in top.tolist()],
                                          names=["slice", "item"]) if tops else None
    sliced = rows[rows["slice"] != ALL]
    if top_pairs is None or not len(sliced):
        hits = reference = np.zeros(len(sliced), bool)
    else:
        hits = pd.MultiIndex.from_arrays([sliced["slice"], sliced["item"]]).isin(top_pairs)
        reference = pd.MultiIndex.from_arrays([np.full(len(sliced), ALL, object), sliced["item"]]).isin(top_pairs)
    merit = pd.DataFrame({"kind": kind_of(sliced["slice"]).to_numpy(object), "hit": hits, "ref": reference})
    merit = merit.groupby("kind", sort=False).agg(events=("hit", "size"), hits=("hit", "sum"), ref=("ref", "sum"))
    return SliceCounts(names, items, per["events"].to_numpy(np.int64), per["weights"].to_numpy(np.float64), hint,
                       merit.index.to_numpy(object), merit["events"].to_numpy(np.int64),
                       merit["hits"].to_numpy(np.int64), merit["ref"].to_numpy(np.int64))


@dataclass(frozen=True)
class Merit:
    events: int
    hits: int  # the kind's slice top-10 contained the event's item
    reference_hits: int  # the `all` top-10 did

    def useful(self, z: float = 2.0) -> bool:
        """The slices beat the reference by `z` standard errors of the difference in hits (a
        conservative bound: the two hit counts' sum bounds the variance of their difference)."""
        difference = self.hits - self.reference_hits
        return difference > 0 and difference > z * np.sqrt(self.hits + self.reference_hits)


@dataclass(frozen=True)
class SliceTops:
    """Each slice's most popular items as last read, with the totals that normalise them."""

    lists: dict[str, tuple[np.ndarray, np.ndarray]]  # slice -> (item ids object, decayed scores)
    events: dict[str, int]  # slice -> events counted
    mass: dict[str, float]  # slice -> sum of decayed weights
    merit: dict[str, Merit]  # kind -> prequential merit
    clock: float  # the newest event time counted

    @classmethod
    def empty(cls) -> SliceTops:
        return cls({}, {}, {}, {}, float("-inf"))

    def useful_kinds(self, z: float = 2.0) -> frozenset[str]:
        return frozenset(kind for kind, merit in self.merit.items() if merit.useful(z))
