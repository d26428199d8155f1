"""`streamrec simulate` through the real path (broker, trainer, parameter server, a serving worker
with an experiments file): serving's own per-arm counters match the queries, the arms split the
users as configured, and two runs give the same figures to the last hit (the barrier and the
one-batch-per-chunk trainer take timing out of the result). On planted groups, where the next
item is predictable from the user's group, the online model's arm beats the popularity arm."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from streamrec.app.simulate import (
    SimulateOptions,
    compare_cold_start,
    compare_impression_negatives,
    experiments_file,
    replay_seeds,
    simulate,
    withhold_items,
)
from streamrec.stream.catalogue import read_catalogue
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


def test_trainer_seeds_pool_replays_of_differently_seeded_learners(settings) -> None:
    """`trainer_seeds=2`: the log replayed twice, the online learner seeded 0 then 1. Seed 0's
    replay is the single-seed one; seed 1's learner takes another trajectory (other lists); the
    report pools both replays' queries per user."""
    log = synthetic_log(events=2000, users=100, items=60, clusters=4, affinity=0.9, seed=7)
    options = SimulateOptions(chunk_events=400)
    single = simulate(settings, log, options)
    frames, served, _ = replay_seeds(settings, log, replace(options, trainer_seeds=2))
    assert [set(f["trainer_seed"]) for f in frames] == [{0}, {1}]
    assert served == {arm: 2 * count for arm, count in single["served_counts"].items()}
    assert int(frames[0].loc[frames[0]["arm"] == "online-bpr", "hit"].sum()) == single["arms"]["online-bpr"]["hits"]
    assert frames[0]["user_id"].tolist() == frames[1]["user_id"].tolist()  # the same queries, paired
    bpr, popular = ([f[f["arm"] == arm]["items"].tolist() for f in frames] for arm in ("online-bpr", "popularity"))
    assert bpr[0] != bpr[1]  # the seed reached the learner
    assert popular[0] == popular[1]  # the trending list has no seed
    with pytest.raises(ValueError, match="trainer seeds"):
        SimulateOptions(trainer_seeds=0)


def test_an_arm_nobody_was_asked_in_is_counted_at_zero_on_both_sides(settings) -> None:
    """With one user every query goes to one arm; serving's series of the other exists at 0 and the
    simulator's counts left it out, so the run crashed at the end comparing the two."""
    log = synthetic_log(events=60, users=1, items=10, clusters=1, seed=1)
    result = simulate(settings, log, SimulateOptions(chunk_events=20))
    served = result["served_counts"]
    assert set(served) == {"online-bpr", "popularity"} and min(served.values()) == 0
    assert result["queries"] == max(served.values()) > 0


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


def _catalogue(path, items: int, clusters: int):
    """The synthetic log's items with their planted group as a genre: what the content tower reads."""
    path.write_text("item_id,genre\n" + "".join(f"i{n},g{n % clusters}\n" for n in range(items)))
    return path


def test_cold_items_are_withheld_until_the_middle_then_released_with_their_metadata(tmp_path) -> None:
    log = synthetic_log(events=2000, users=100, items=50, clusters=4, seed=1)
    kept, cold = withhold_items(log, 0.2, seed=0)
    items = log.item_id.astype(str)
    assert len(cold.ids) == 10
    first_half = kept.take(slice(0, cold.middle)).item_id.astype(str)
    assert not set(first_half) & cold.ids  # they do not exist before the middle
    second_half = kept.take(slice(cold.middle, None))
    assert len(second_half) == len(log) - len(log) // 2 and set(second_half.item_id.astype(str)) & cold.ids
    assert len(kept) == len(log) - int((np.isin(items, list(cold.ids)) & (np.arange(len(log)) < len(log) // 2)).sum())
    catalogue = read_catalogue(_catalogue(tmp_path / "items.csv", 50, 4))
    before = catalogue.without(cold.ids)
    assert len(before) == 40 and not set(before.ids) & cold.ids
    genre = before.categorical["genre"]
    for value in genre.values:  # every remaining item keeps its own genre
        assert all(int(before.ids[p][1:]) % 4 == int(value[1:]) for p in genre.holding(value))


def test_cold_start_is_compared_pairwise_through_the_real_path(settings, tmp_path) -> None:
    log = synthetic_log(events=3000, users=120, items=60, clusters=4, affinity=0.95, seed=5)
    options = SimulateOptions(chunk_events=200, cold_items=0.2, explore=0.2,
                              catalogue=_catalogue(tmp_path / "items.csv", 60, 4))
    result = compare_cold_start(settings, log, options)
    runs = result["runs"]
    for name in ("without", "with"):
        assert runs[name]["arms"]["online-bpr"]["requests"] == runs["without"]["arms"]["online-bpr"]["requests"] > 0
    new, overall = result["online-bpr"]["new items hit@10"], result["online-bpr"]["overall hit@10"]
    assert new["requests"] > 0 and overall["requests"] == runs["with"]["arms"]["online-bpr"]["requests"]
    assert result["per_trainer_seed"] == [{"trainer_seed": 0, "new items hit@10": new["relative"],
                                           "overall hit@10": overall["relative"]}]  # one seed: the pooled lifts
    assert 1.5 < result["explored_slots_per_answer"] <= 2.0  # 20% of 10 slots, fewer when nothing fresh is eligible
    assert result["new_items_shown_per_answer_after_release"] > 0  # seeded rows and exploration show new items
    assert result["new_items"] == 12 and 0 < result["released_at_event"] < result["events"]
    tower = result["content_tower"]  # the fit at the release, with what it was judged by
    assert tower["seeded"] >= 12 and tower["validation_mse"] > 0 and tower["baseline_mse"] > 0
