"""The faults of a chaos run and when they strike: a seeded schedule over the replay.

The moments are replay positions (events produced), not wall-clock times, so the same seed puts
the same fault at the same point of the log whatever the machine's speed. The replay is cut into
one slot per fault between 5% and 85% of the events (early enough that every fault is followed
by traffic that shows the recovery); each fault strikes at a random point of the middle of its
slot, and the kinds are dealt to the slots in a random order. Faults therefore never overlap in
the schedule, which lets the audit attribute what happened between two of them to one fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class FaultKind(StrEnum):
    TRAINER_KILL = "trainer_kill"  # SIGKILL one trainer; start a new one in its place
    PARAM_SERVER_KILL = "param_server_kill"  # SIGKILL a shard; restart it from its checkpoints
    PARAM_SERVER_WIPE = "param_server_wipe"  # SIGKILL a shard, delete its checkpoints, restart it empty
    REDIS_RESTART = "redis_restart"  # stop Redis, start it again on its port with nothing in it
    SERVING_WORKER_KILL = "serving_worker_kill"  # SIGKILL one serving worker


DEFAULT_FAULTS: dict[FaultKind, int] = {
    FaultKind.TRAINER_KILL: 5,
    FaultKind.PARAM_SERVER_KILL: 3,
    FaultKind.PARAM_SERVER_WIPE: 1,
    FaultKind.REDIS_RESTART: 2,
    FaultKind.SERVING_WORKER_KILL: 3,
}
FIRST, LAST = 0.05, 0.85  # the part of the replay faults are spread over


@dataclass(frozen=True)
class PlannedFault:
    kind: FaultKind
    at_event: int  # strike once this many events have been produced
    target: int  # which trainer / shard / worker (an index drawn now; taken modulo what exists)


def plan_faults(rng: np.random.Generator, events: int, counts: dict[FaultKind, int]) -> list[PlannedFault]:
    """The schedule, in replay order."""
    kinds = [kind for kind, count in counts.items() for _ in range(count)]
    if not kinds:
        return []
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    width = (LAST - FIRST) * events / len(kinds)
    offsets = rng.uniform(0.2, 0.8, len(kinds))  # within the middle of each slot
    targets = rng.integers(0, 1 << 16, len(kinds))
    return [PlannedFault(kind, int(FIRST * events + (slot + offsets[slot]) * width), int(targets[slot]))
            for slot, kind in enumerate(kinds)]
