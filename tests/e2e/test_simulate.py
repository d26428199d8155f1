"""`streamrec simulate` through the real path (broker, trainer, parameter server, a serving worker
with an experiments file): serving's own per-arm counters match the queries, the arms split the
users as configured, and two runs give the same figures to the last hit (the barrier and the
one-batch-per-chunk trainer take timing out of the result). On planted groups, where the next
item is predictable from the user's group, the online model's arm beats the popularity arm."""

from __future__ import annotations

import pytest

from streamrec.app.simulate import (
    SimulateOptions,
    compare_impression_negatives,
    experiments_file,
    simulate,
)
from streamrec.stream.synthetic import synthetic_log

pytestmark = pytest.mark.slow


def test_two_runs_agree_and_serving_counted_every_query(settings) -> None:
    log = synthetic_log(events=4000, users=150, items=60, clusters=4, affinity=0.95, seed=3)
    options = SimulateOptions(chunk_events=400)
    first = simulate(settings, log, options)
    second = simulate(settings, log, options)
    for arm in ("online-bpr", "popularity"):
        assert first["arms"][arm]["requests"] == first["served_counts"][arm] > 0
        assert {key: first["arms"][arm][key] for key in ("users", "requests", "hits")} == \
            {key: second["arms"][arm][key] for key in ("users", "requests", "hits")}
    assert first["queries"] == sum(first["served_counts"].values())
    assert first["srm"]["warning"] is False
    lift = first["lift"]["online-bpr vs popularity"]
    assert first["arms"]["online-bpr"]["hit@10"] > first["arms"]["popularity"]["hit@10"] and lift["ci95"][0] > 0


def test_unknown_or_single_arms_are_refused() -> None:
    with pytest.raises(ValueError, match="two or more distinct arms"):
        experiments_file(("online-bpr",))
    with pytest.raises(ValueError, match="two or more distinct arms"):
        experiments_file(("online-bpr", "random"))
    assert "source: popularity" in experiments_file(("online-bpr", "popularity"))


def test_impression_negatives_replay_deterministically_and_are_compared_pairwise(settings) -> None:
    """With online-bpr learning from what serving showed, the barrier also waits until serving's
    impressions are acknowledged and the trainer has read them: two runs still agree to the hit.
    The comparison replays with and without, over the same users and queries."""
    log = synthetic_log(events=3000, users=120, items=60, clusters=4, affinity=0.95, seed=5)
    options = SimulateOptions(chunk_events=300, impression_negatives=5)
    first, second = simulate(settings, log, options), simulate(settings, log, options)
    assert first["impression_negatives"] == 5
    for arm in ("online-bpr", "popularity"):
        assert {key: first["arms"][arm][key] for key in ("users", "requests", "hits")} == \
            {key: second["arms"][arm][key] for key in ("users", "requests", "hits")}
    compared = compare_impression_negatives(settings, log, options)
    bpr = compared["online-bpr"]
    assert compared["runs"]["impressions"]["arms"]["online-bpr"]["hits"] == first["arms"]["online-bpr"]["hits"]
    assert bpr["requests"] == first["arms"]["online-bpr"]["requests"]
    assert bpr["hit@10 impressions"] == first["arms"]["online-bpr"]["hit@10"]
    assert bpr["ci95"][0] <= bpr["relative"] <= bpr["ci95"][1]
    with pytest.raises(ValueError, match="impression negatives > 0"):
        compare_impression_negatives(settings, log, SimulateOptions(chunk_events=300))
