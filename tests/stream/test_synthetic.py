"""The built-in synthetic log: deterministic, planted structure, sessions and repeats."""

from __future__ import annotations

from collections import Counter

import numpy as np

from streamrec.stream.synthetic import session_log, synthetic_log


def test_same_seed_same_log_and_time_order():
    first, again = synthetic_log(5000, seed=3), synthetic_log(5000, seed=3)
    assert list(first.item_id) == list(again.item_id) and list(first.user_id) == list(again.user_id)
    assert np.all(np.diff(first.timestamp) >= 0) and len(first) == 5000


def test_users_mostly_pick_their_groups_items_with_a_long_tail_and_repeats():
    log = synthetic_log(20_000, clusters=8)
    # items of one group are i<g>, i<g+8>, ...: a user's favourite group is the mode of item % 8
    groups = np.array([int(i[1:]) % 8 for i in log.item_id])
    by_user: dict[str, list[int]] = {}
    for user, group in zip(log.user_id, groups):
        by_user.setdefault(user, []).append(group)
    share = np.mean([Counter(g).most_common(1)[0][1] / len(g) for g in by_user.values() if len(g) >= 10])
    assert share > 0.7  # affinity 0.85, diluted by the 1/8 chance of any group
    counts = np.array(sorted(Counter(log.item_id).values(), reverse=True))
    assert counts[0] > 10 * np.median(counts)  # Zipf within groups: a long tail
    repeats = sum(n - 1 for n in Counter(zip(log.user_id, log.item_id)).values())
    assert repeats > 0.05 * len(log)
    assert set(np.unique(log.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_session_log_is_short_themed_sessions_in_time_order():
    """Each session is its own user with at least two clicks, about `mean_length` on average; a
    session's clicks share its theme more often than chance; the log is deterministic and ordered."""
    log, again = session_log(sessions=2000, items=1000, themes=20, seed=5), session_log(sessions=2000, items=1000, themes=20, seed=5)
    assert list(log.item_id) == list(again.item_id) and np.all(np.diff(log.timestamp) >= 0)
    lengths = np.array(list(Counter(log.user_id).values()))
    assert len(lengths) == 2000 and lengths.min() >= 2 and 3.5 < lengths.mean() < 4.5
    theme = np.array([int(i[1:]) // 50 for i in log.item_id])
    users = np.asarray(log.user_id)
    same = [len(set(theme[users == s])) < (users == s).sum() for s in list(dict.fromkeys(users))[:300]]
    assert np.mean(same) > 0.5  # most sessions repeat a theme; uniform picks over 20 themes rarely would
