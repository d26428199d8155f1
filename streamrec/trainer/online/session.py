"""`SessionTracker`: each user's CURRENT session, the last few items they consumed in it.

A factor model's user row moves slowly (a few SGD steps per event) and a brand-new user has none,
yet in session-based streams the next item is best told by the items of the last few minutes.
The tracker keeps, per user, the ids of the last `max_items` positive items of their current
session; the model turns them into item vectors when it scores (so they are always the newest
vectors, and an item evicted meanwhile simply drops out).

A session ends after `gap_seconds` of event time without an event of the user, or when an event's
context carries a `session_id` other than the session's (events without one continue it). The
clock is event time, the newest timestamp observed (never past the wall clock): a session idle for
longer than the gap is no longer current when scoring either, whatever the wall clock says.

Memory is bounded: at most `max_users` sessions, the least recently active forgotten first (like
the prequential scorer's histories). The tracker is a cache of recent events and is not written
into the parameter server's meta record (20 ids for each of 100k users would ride along with every
push); after a restart sessions start empty and refill within one session's events.
"""

from __future__ import annotations

import time as wall_time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SESSION_KEY = "session_id"  # the event context key that names a session
SESSION_WEIGHT = 4.0  # chosen on validation (the first half of MovieLens and of a session log): docs/models.md
SESSION_FADE = 2.0  # chosen on validation with SESSION_WEIGHT: docs/models.md
SESSION_ITEMS = 20  # the newest items of a session that count (the model's and serving's)
SESSION_GAP = 1800.0  # seconds of event time without an event that end a session (the model's and the feature store's)


@dataclass
class Session:
    last_time: float
    session_id: str | None
    items: deque[str] = field(default_factory=deque)
    events: int = 0  # the user's events while remembered, this session and earlier ones


class SessionTracker:
    def __init__(self, max_items: int = SESSION_ITEMS, gap_seconds: float = SESSION_GAP,
                 max_users: int = 100_000) -> None:
        self.max_items, self.gap_seconds, self.max_users = max_items, gap_seconds, max_users
        self.clock = -np.inf  # newest event time observed
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def observe(self, users: np.ndarray, items: np.ndarray, times: np.ndarray,
                session_ids: Sequence[str | None]) -> None:
        """Events (in stream order) join their users' current sessions, or start new ones. One
        dict update per event: the model calls this per learned step (about ten events), where
        grouping by user would cost more than it saves."""
        if not len(users):
            return
        gap, sessions = self.gap_seconds, self._sessions
        for user, item, time, session_id in zip(users.tolist(), items.tolist(), times.tolist(), session_ids):
            current = sessions.get(user)
            if (current is None or time - current.last_time > gap
                    or (session_id is not None and session_id != current.session_id)):
                earlier = 0 if current is None else current.events
                current = sessions[user] = Session(time, session_id, deque(maxlen=self.max_items), earlier)
                if len(sessions) > self.max_users:
                    sessions.popitem(last=False)
            else:
                sessions.move_to_end(user)
                if session_id is not None:
                    current.session_id = session_id
            current.last_time = time
            current.events += 1
            current.items.append(item)
        # never ahead of the wall clock: one event dated up to a day ahead (the schema's allowance
        # for skewed clients) ended every user's session until real time caught up
        self.clock = max(self.clock, min(float(times.max()), wall_time.time()))

    def events_of(self, user: str) -> int:
        """The user's events the tracker has seen (0 for a user it does not remember)."""
        current = self._sessions.get(user)
        return 0 if current is None else current.events

    def items_of(self, user: str) -> list[str]:
        """The user's current session (oldest first); empty if none or it has run out by the gap."""
        current = self._sessions.get(user)
        if current is None or self.clock - current.last_time > self.gap_seconds:
            return []
        return list(current.items)


def faded_weight(weight: float, fade: float, events: np.ndarray | float) -> np.ndarray | float:
    """The session term's weight, faded by how much the user's own row has learned (`events`): a
    new user or an anonymous session leans on its session, a user with a long history on their
    row; `fade` 0: no fade. The online model scores with it and serving adds the same term."""
    if not fade:
        return weight * np.ones_like(events)
    return weight * fade / (fade + events)


def session_ids(context: np.ndarray) -> list[str | None]:
    """Each event's context `session_id` (None without one). Only events that carry a context are
    looked at: a stream without contexts costs one vectorised comparison."""
    found: list[str | None] = [None] * len(context)
    for n in np.flatnonzero(np.not_equal(context, None)).tolist():
        value = context[n].get(SESSION_KEY)
        found[n] = None if value is None else str(value)
    return found
