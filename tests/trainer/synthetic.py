"""Small synthetic logs with planted structure and opaque string ids."""

from __future__ import annotations

import numpy as np

from streamrec.stream.loaders import InteractionLog, time_order

GROUPS = 3


def planted_log(n_users: int = 60, n_items: int = 45, per_user: int = 12, seed: int = 0) -> InteractionLog:
    """Users and items fall in 3 groups; users mostly pick items of their group and rate them
    5 (4 on the odd other-group item: 1). Ids are non-numeric strings."""
    rng = np.random.default_rng(seed)
    user_group = np.arange(n_users) % GROUPS
    item_group = np.arange(n_items) % GROUPS
    rows = []
    for u in range(n_users):
        own = np.flatnonzero(item_group == user_group[u])
        other = np.flatnonzero(item_group != user_group[u])
        picks = np.r_[rng.choice(own, per_user - 2, replace=False), rng.choice(other, 2, replace=False)]
        for n, i in enumerate(picks):
            rating = 5.0 if item_group[i] == user_group[u] else 1.0
            rows.append((f"user-{u:03d}", f"item-{i:03d}x", rating, 1_000_000.0 + 86400.0 * (u % 7) + 3600.0 * n + u))
    users, items, ratings, stamps = (np.array(c) for c in zip(*rows))
    log = InteractionLog(users.astype(object), items.astype(object), ratings.astype(float), stamps.astype(float))
    return log.take(time_order(log))


def group_of(ids: np.ndarray) -> np.ndarray:
    """Planted group of 'user-007' / 'item-007x' style ids."""
    return np.array([int(str(v).split("-")[1].rstrip("x")) % GROUPS for v in np.ravel(ids)]).reshape(np.shape(ids))


def ring_sessions(n_items: int = 300, sessions: int = 600, seed: int = 0) -> InteractionLog:
    """Browsing sessions of 4-8 clicks walking a ring of items (next = current + 1..3): short
    histories where only a session's LAST items tell what comes next. Ids carry `:` and `/`."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(sessions):
        item = int(rng.integers(n_items))
        for n in range(int(rng.integers(4, 9))):
            rows.append((f"s:{s}", f"item/{item}", 1000.0 * s + n))
            item = (item + int(rng.integers(1, 4))) % n_items
    users, items, stamps = (np.array(c) for c in zip(*rows))
    return InteractionLog(users.astype(object), items.astype(object), np.full(len(rows), np.nan), stamps.astype(float))
