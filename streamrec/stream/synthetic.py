"""A built-in interaction log with planted structure, for a clone that has no data beside it.

Users and items fall into `clusters` groups; a user picks an item of their own group with
probability `affinity`, else any item, and within a group items are Zipf-popular (a long tail).
Users come back in sessions of a few events, a tenth of picks repeat an earlier item of the user,
and events carry ratings (4-5 for the own group, 1-3 otherwise) and increasing timestamps. So the
online models have something to learn (the groups), popularity is a real but weaker baseline, and
re-consumption, sessions and long tails all occur, with the same event schema as any log.
"""

from __future__ import annotations

import numpy as np

from streamrec.stream.loaders import InteractionLog, time_order

START = 1_700_000_000.0  # event time of the first session (Nov 2023), any fixed point would do


def synthetic_log(events: int = 20_000, users: int = 1_000, items: int = 500, clusters: int = 8,
                  affinity: float = 0.85, seed: int = 0) -> InteractionLog:
    """`events` interactions of `users` x `items` with planted groups (see the module docstring)."""
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, clusters, users)
    item_group = np.arange(items) % clusters
    # Zipf-like weights within each group: rank r of the group has weight 1 / (r + 1)
    rank = np.arange(items) // clusters
    weight = 1.0 / (rank + 1.0)
    members = [np.flatnonzero(item_group == g) for g in range(clusters)]
    member_p = [weight[m] / weight[m].sum() for m in members]
    user = rng.integers(0, users, events)
    own = rng.random(events) < affinity
    item = rng.integers(0, items, events)
    for g in range(clusters):  # one vectorised draw per group
        mask = own & (user_group[user] == g)
        item[mask] = rng.choice(members[g], mask.sum(), p=member_p[g])
    repeat = rng.random(events) < 0.1  # re-consumption: the user's previous pick again
    order = np.lexsort((np.arange(events), user))
    previous = np.full(events, -1)
    same_user = np.r_[False, user[order][1:] == user[order][:-1]]
    previous[order[same_user]] = item[order][np.flatnonzero(same_user) - 1]
    item = np.where(repeat & (previous >= 0), previous, item)
    rating = np.where(item_group[item] == user_group[user], rng.integers(4, 6, events), rng.integers(1, 4, events))
    session = rng.integers(0, events // 5 + 1, events)  # events of one session share its start
    stamp = START + session * 600.0 + rng.uniform(0, 300.0, events)
    log = InteractionLog(np.char.add("u", user.astype(str)).astype(object),
                         np.char.add("i", item.astype(str)).astype(object), rating.astype(float), stamp)
    return log.take(time_order(log))


def session_log(sessions: int = 5_000, items: int = 2_000, themes: int = 50, mean_length: float = 4.0,
                affinity: float = 0.6, seed: int = 0) -> InteractionLog:
    """Short anonymous browsing sessions, each its own user (the session protocol's shape): a
    session has a theme and 2 + Poisson(`mean_length` - 2) clicks; a click is an item of the theme
    with probability `affinity` (Zipf within the theme), else an item of the global Zipf head. So
    histories are a few clicks long, most items are rarely seen, and popularity is a fair baseline."""
    rng = np.random.default_rng(seed)
    lengths = 2 + rng.poisson(max(mean_length - 2.0, 0.0), sessions)
    session = np.repeat(np.arange(sessions), lengths)
    theme = rng.integers(0, themes, sessions)[session]
    per_theme = items // themes
    within = np.minimum(rng.zipf(1.3, len(session)) - 1, per_theme - 1)  # rank inside the theme
    themed = theme * per_theme + within
    head = np.minimum(rng.zipf(1.2, len(session)) - 1, items - 1)
    global_rank = rng.permutation(items)[head]  # the global head spreads over all themes
    item = np.where(rng.random(len(session)) < affinity, themed, global_rank)
    position = np.arange(len(session)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    stamp = START + session * 120.0 + position * 20.0
    log = InteractionLog(np.char.add("s", session.astype(str)).astype(object),
                         np.char.add("i", item.astype(str)).astype(object), np.full(len(session), np.nan), stamp)
    return log.take(time_order(log))
