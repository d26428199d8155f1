"""Session-aware online scoring: OnlineBPR adds the current session's mean item vector to the user's."""

from __future__ import annotations

import uuid

import numpy as np

from streamrec.param_server.client import ParamClient
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.base import OnlineRecommender, learn_together
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from streamrec.trainer.online.models import OnlineBPR
from streamrec.trainer.online.session import SESSION_GAP, SessionTracker, session_ids

THEMES, PER_THEME, POPULAR = 8, 6, 3
START = 1_700_000_000.0


def theme_sessions(sessions: int = 400, seed: int = 0) -> list[dict]:
    """Sessions of one user each: 4-6 clicks within one theme of items, 1 s apart, sessions an
    hour apart. Every third session is instead a burst of the popular items, which thus lead
    every item count but never share a session with a theme item."""
    rng = np.random.default_rng(seed)
    events = []
    for s in range(sessions):
        if s % 3 == 2:
            items = [f"pop{p}" for p in rng.permutation(POPULAR)] * 2
        else:
            theme = int(rng.integers(THEMES))
            items = [f"t{theme}-{i}" for i in rng.choice(PER_THEME, int(rng.integers(4, 7)), replace=False)]
        events += [{"event_id": f"s{s}e{n}", "user_id": f"s{s}", "item_id": item, "event_type": "click", "timestamp": START + 3600.0 * s + n}
                   for n, item in enumerate(items)]
    return events


def click(user: str, item: str, timestamp: float, **context: str) -> dict:
    return {"event_id": f"{user}@{timestamp}", "user_id": user, "item_id": item, "event_type": "click", "timestamp": timestamp,
            "context": context or None}


def test_a_new_session_ranks_its_theme_above_popular_unrelated_items(start_server):
    """Through a real parameter-server process (one per model: both use the `bpr_*` tables):
    after two items of theme 0, a brand-new user's ranking puts the theme's other items above the
    popular items, which lead it without sessions."""
    log = EventBatch.from_events(theme_sessions())
    end = START + 3600.0 * 400
    ranks = {}
    for weight in (0.0, 1.0):
        with ParamClient([start_server("--no-checkpoints").address]) as client:
            model = OnlineBPR(store=client, session_weight=weight, session_fade=0.0)
            model.learn_many(log)
            model.learn_many(EventBatch.from_events([click("new", "t0-0", end), click("new", "t0-1", end + 1)]))
            scores = model.score_users(np.array(["new"], object))
        order = scores.item_ids[np.argsort(-scores.scores[0])].tolist()
        ranks[weight] = {item: order.index(item) for item in order}
    theme = [f"t0-{i}" for i in range(2, PER_THEME)]
    popular = [f"pop{p}" for p in range(POPULAR)]
    assert max(ranks[1.0][i] for i in theme) < min(ranks[1.0][p] for p in popular)
    assert min(ranks[0.0][p] for p in popular) < max(ranks[0.0][i] for i in theme)  # sessions made the difference


def test_the_session_term_fades_as_the_user_row_learns():
    """weight * fade / (fade + events): a user's first events lean on the session, a long history on
    the row; the count survives a new session of the same user."""
    model = OnlineBPR(session_weight=4.0, session_fade=2.0)
    history = [click("old", f"h{n}", START + n) for n in range(18)] + [click("old", "a", START + 7200)]
    model.learn_many(EventBatch.from_events(history + [click("new", "a", START + 7201)]))
    weights = model._session_weights(np.array(["new", "old", "never"], object))
    np.testing.assert_allclose(weights, [4.0 * 2 / 3, 4.0 * 2 / 21, 4.0])
    assert model.sessions.items_of("old") == ["a"]  # the gap started a new session, the count went on


def test_the_next_step_of_a_batch_scores_with_the_session_so_far():
    """The prequential scorer runs before each step: it sees the items of the steps learned before."""
    model = OnlineBPR(session_weight=1.0, step_events=2)
    batch = EventBatch.from_events([click("new", "a", START), click("new", "b", START + 1),
                                    click("new", "c", START + 2), click("x", "d", START + 3)])
    seen: list[list[str]] = []
    learn_together([model], batch, before_step=lambda step: seen.append(model.sessions.items_of("new")))
    assert seen == [[], ["a", "b"]] and model.sessions.items_of("new") == ["a", "b", "c"]


def test_a_gap_or_a_new_session_id_starts_a_new_session():
    tracker = SessionTracker(max_items=20, gap_seconds=1800.0)
    batch = EventBatch.from_events([
        click("u", "a", START), click("u", "b", START + 600), click("v", "x", START + 600, session_id="1"),
        click("v", "y", START + 1200, session_id="1"), click("v", "z", START + 1300, session_id="2"),
        click("v", "z2", START + 1400),  # no session id: continues the current one
        click("u", "c", START + 2401),  # 1801 s after "b": over the 30 minutes, a new session
    ])
    tracker.observe(batch.user_id, batch.item_id, batch.timestamp, session_ids(batch.context))
    assert tracker.items_of("u") == ["c"]
    assert tracker.items_of("v") == ["z", "z2"]  # session "2" replaced session "1"
    later = EventBatch.from_events([click("w", "q", START + 2401 + 1801)])
    tracker.observe(later.user_id, later.item_id, later.timestamp, session_ids(later.context))
    assert tracker.items_of("u") == [] and tracker.items_of("v") == []  # idle past the gap: no current session
    assert tracker.items_of("w") == ["q"]


def test_memory_is_bounded_in_users_and_items():
    tracker = SessionTracker(max_items=5, gap_seconds=1800.0, max_users=10)
    users = np.array([f"u{n % 10}" for n in range(400)], object)
    items = np.array([f"i{n}" for n in range(400)], object)
    tracker.observe(users, items, START + np.arange(400.0), [None] * 400)
    assert tracker.items_of("u9") == ["i359", "i369", "i379", "i389", "i399"]  # the last 5, oldest first
    newcomers = np.array([f"w{n}" for n in range(5)], object)
    tracker.observe(newcomers, newcomers, START + 400 + np.arange(5.0), [None] * 5)
    assert len(tracker) == 10
    assert [tracker.items_of(f"u{n}") for n in range(5)] == [[]] * 5  # the least recently active: forgotten
    assert tracker.items_of("u5") == ["i355", "i365", "i375", "i385", "i395"]


def test_weight_zero_scores_exactly_as_without_sessions():
    """Weight 0 tracks nothing and scores p_u . q_j + b_j; a positive weight learns the very
    same tables (sessions only change scoring) and differs only for users with a session."""
    log = EventBatch.from_events(theme_sessions(120))
    plain, with_sessions = OnlineBPR(session_weight=0.0), OnlineBPR(session_weight=0.5)
    assert plain.sessions is None
    plain.learn_many(log)
    with_sessions.learn_many(log)
    users = np.array(["s0", "s119", "nobody"], object)
    expected = plain.user_rows(users)[:, :32] @ plain.items.values[:, :32].T.astype(np.float64) + plain.items.values[:, 32]
    np.testing.assert_allclose(plain.score_users(users).scores, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain.items.values, with_sessions.items.values, rtol=1e-5, atol=1e-6)
    without, with_ = plain.score_users(users).scores, with_sessions.score_users(users).scores
    np.testing.assert_allclose(without[[0, 2]], with_[[0, 2]], rtol=1e-5, atol=1e-6)  # s0's session ended hours ago
    assert np.abs(without[1] - with_[1]).max() > 0.05  # s119's session is current


def test_the_compiled_rank_of_one_user_counts_as_the_scores_do():
    """`OnlineBPR.rank_one` (the live scorer's fused pass, with the one-user vector and its
    session) against the generic rank over `score_users`, between batches and within one (the
    step hook), for users with and without sessions, a hidden new item and an unknown user."""
    model = OnlineBPR(session_fade=2.0)
    log = EventBatch.from_events(theme_sessions(120, seed=3))
    model.learn_many(log.take(slice(0, len(log) // 2)))
    rng = np.random.default_rng(0)
    index = model.scoring_index()

    def agree(current: list[str]) -> int:
        checked = 0
        for user in [*current, "s1", "nobody", *rng.choice(log.user_id, 10).tolist()]:
            excluded = rng.choice(len(index), int(rng.integers(0, 10)), replace=False).astype(np.int64)
            for target in [-1, *rng.integers(0, len(index), 5).tolist()]:
                generic = OnlineRecommender.rank_one(model, user, target, excluded)
                assert model.rank_one(user, target, excluded) == generic, (user, target)
                checked += 1
        return checked

    assert agree([log.user_id[len(log) // 2 - 1]]) > 50
    late = log.take(slice(len(log) // 2, len(log)))
    seen: list[int] = []
    model.learn_pulled(late, model.store.pull_many(model.needs(late)),
                       before_step=lambda step: seen.append(agree(late.user_id[step].tolist())))
    assert len(seen) >= 10  # within the batch: the working copy and the sessions moving


def test_the_feature_store_holds_the_session_the_model_tracks(redis_url):
    """Serving adds the session term from the feature store (the newest `session_events` of the
    user's recent items, their event count, ended by the same gap against the store's clock):
    written in several batches through real Redis, it names the same items and counts as the
    model's own `SessionTracker` fed the same stream, gaps and all."""
    rng = np.random.default_rng(5)
    n = 900
    users = np.array([f"u:{i}" for i in rng.integers(0, 15, n)], object)  # ':' in ids: keys stay apart
    items = np.array([f"i{i}" for i in rng.integers(0, 60, n)], object)
    # mostly seconds apart, now and then a pause beyond the gap, so users have several sessions
    times = START + np.cumsum(np.where(rng.random(n) < 0.03, SESSION_GAP * 1.5, rng.integers(1, 60, n)).astype(float))
    store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=f"test-session-{uuid.uuid4().hex[:10]}"))
    tracker = SessionTracker(max_items=20, gap_seconds=SESSION_GAP)
    try:
        for chunk in np.array_split(np.arange(n), 9):
            store.write(EventBatch.from_columns(users[chunk], items[chunk], np.full(len(chunk), "click", object),
                                                times[chunk]))
            tracker.observe(users[chunk], items[chunk], times[chunk], [None] * len(chunk))
        clock = store.clock()
        assert clock == times.max()
        current = 0
        for user in sorted(set(users.tolist())):
            history = store.user_history(user, 20, False, session=True)
            assert history.session is not None and history.session.events == tracker.events_of(user)
            assert history.session_items(clock, SESSION_GAP, 20) == tracker.items_of(user)[::-1], user
            current += bool(tracker.items_of(user))
        assert 0 < current < 15  # some sessions current, some ended by the gap
        assert store.user_history("nobody", 20, False, session=True).session is None
    finally:
        store.clear()
