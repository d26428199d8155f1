"""Which stream offsets a shard has applied, and who may still push them: the exactly-once rule.

A trainer's push says which records of each partition it covers: `ranges` maps a partition key
("topic/partition") to `[a, b)`. The shard keeps `next_offsets[pkey]`, the first offset it has not
applied yet, and classifies each partition of a push:

  new      no watermark yet, or a == next        (empty ranges: only with no watermark)
  dup      b <= next                             (already applied)
  gap      a > next                              (records between next and a were never applied)
  overlap  a < next < b                          (part applied, part not)

Every partition new -> apply the push and set next = b; every partition dup -> skip it (nothing
changes); anything else (a gap, an overlap, new mixed with dup) -> refuse it, change nothing and
tell the pusher the shard's `next` for its partitions, from where it must cut its batches again.

Fencing: `claim(pkeys)` gives each partition a new epoch, larger than any this shard (or an earlier
process of it) handed out: the epoch is at least the wall clock in microseconds, as versions are, so
a claim lost in a crash is never handed out twice. A ranged push carries the pusher's epochs; one
older than the shard's current epoch of any of its partitions comes from a trainer that lost the
partition in a rebalance and is refused. A partition never claimed on the shard accepts any push;
a newer epoch than the shard knows (its claim was lost in a crash) is adopted when applied.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import ClassVar

MAX_OFFSET = 1 << 63  # Kafka offsets and our epochs are signed 64-bit

Ranges = Mapping[str, tuple[int, int]]


class PushRefused(ValueError):
    """A ranged push the shard will not apply; `next_offsets`: the shard's watermarks of the push's
    partitions (missing: none yet). `kind` is the error type the client sees."""

    kind: ClassVar[str]

    def __init__(self, message: str, next_offsets: dict[str, int]):
        super().__init__(message)
        self.next_offsets = next_offsets


class OffsetConflict(PushRefused):
    kind = "offsets"


class StaleEpoch(PushRefused):
    kind = "fenced"


def checked_ranges(ranges: Mapping[str, object]) -> dict[str, tuple[int, int]]:
    """`{pkey: (a, b)}` with 0 <= a <= b integers, or a ValueError naming the bad entry."""
    if not isinstance(ranges, Mapping):
        raise ValueError(f"ranges must map partition keys to [a, b), got {str(ranges)[:100]!r}")
    out = {}
    for pkey, bounds in ranges.items():
        if not isinstance(pkey, str) or not pkey:
            raise ValueError(f"partition key {pkey!r} must be a non-empty string")
        try:
            a, b = bounds  # type: ignore[misc]
        except (TypeError, ValueError):
            raise ValueError(f"range of {pkey!r} must be [a, b), got {bounds!r}") from None
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)) or not 0 <= a <= b < MAX_OFFSET:
            raise ValueError(f"range of {pkey!r} must be integers 0 <= a <= b < 2**63, got {bounds!r}")
        out[pkey] = (a, b)
    return out


def checked_epochs(epochs: Mapping[str, object]) -> dict[str, int]:
    """Epochs as integers in [0, 2**63 - 1): a claim adds one, and the checkpoint's JSON holds 64
    bits. An epoch of 2**64 - 1 was adopted, the next claim made it 2**64, and the checkpoint
    that followed raised and stopped the server."""
    if not isinstance(epochs, Mapping) or not all(
            isinstance(pkey, str) and isinstance(e, int) and not isinstance(e, bool) and 0 <= e < MAX_OFFSET - 1
            for pkey, e in epochs.items()):
        raise ValueError(f"epochs must map partition keys to integers in [0, 2**63 - 1), got {str(epochs)[:100]!r}")
    return dict(epochs)  # type: ignore[arg-type]


class PartitionLedger:
    """Per partition key: the next offset to apply and the current fencing epoch. Not thread-safe:
    the store calls it under its lock, in the same critical section as the push it decides."""

    def __init__(self, next_offsets: Mapping[str, int] | None = None, epochs: Mapping[str, int] | None = None):
        self.next_offsets: dict[str, int] = dict(next_offsets or {})
        self.epochs: dict[str, int] = dict(epochs or {})

    def watermarks(self, pkeys: Iterable[str]) -> dict[str, int]:
        return {pkey: self.next_offsets[pkey] for pkey in pkeys if pkey in self.next_offsets}

    def fence(self, ranges: dict[str, tuple[int, int]], epochs: dict[str, int]) -> None:
        """StaleEpoch if a newer claim owns any of the push's partitions (a missing epoch is 0)."""
        stale = [pkey for pkey in ranges if epochs.get(pkey, 0) < self.epochs.get(pkey, 0)]
        if stale:
            detail = ", ".join(f"{pkey} (pushed {epochs.get(pkey)}, current {self.epochs[pkey]})" for pkey in sorted(stale))
            raise StaleEpoch(f"fenced: a newer claim owns {detail}", self.watermarks(ranges))

    def decide(self, ranges: dict[str, tuple[int, int]]) -> bool:
        """True: apply the push; False: skip it (already applied). OffsetConflict otherwise."""
        states = {pkey: self._state(pkey, a, b) for pkey, (a, b) in ranges.items()}
        kinds = set(states.values())
        if kinds <= {"new"}:
            return True
        if kinds == {"dup"}:
            return False
        raise OffsetConflict(
            "offsets do not continue the shard's watermarks: "
            + ", ".join(f"{pkey} [{ranges[pkey][0]}, {ranges[pkey][1]}) is {state}" for pkey, state in sorted(states.items())),
            self.watermarks(ranges),
        )

    def _state(self, pkey: str, a: int, b: int) -> str:
        next_offset = self.next_offsets.get(pkey)
        if next_offset is None:
            return "new"
        if b <= next_offset:
            return "dup"
        if a == next_offset:
            return "new"
        return "gap" if a > next_offset else "overlap"

    def advance(self, ranges: dict[str, tuple[int, int]], epochs: dict[str, int]) -> None:
        """Record an applied push: its ranges' ends, and epochs newer than the ones known."""
        for pkey, (_, b) in ranges.items():
            self.next_offsets[pkey] = b
            if epochs.get(pkey, 0) > self.epochs.get(pkey, 0):
                self.epochs[pkey] = epochs[pkey]

    def claim(self, pkeys: Iterable[str]) -> dict[str, int]:
        """A new epoch for each partition key, larger than any handed out before (also by an earlier
        process of this shard, thanks to the clock)."""
        now = time.time_ns() // 1000
        claimed = {}
        for pkey in pkeys:
            claimed[pkey] = self.epochs[pkey] = max(self.epochs.get(pkey, 0) + 1, now)
        return claimed
