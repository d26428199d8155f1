"""The chaos suite's own logic: the seeded fault schedule and the independent count comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamrec.app.chaos_audit import (
    StoreSnapshot,
    TopicIndex,
    compare_counts,
    consistent,
    item_counts,
)
from streamrec.app.chaos_plan import DEFAULT_FAULTS, FIRST, LAST, FaultKind, plan_faults


def test_the_schedule_is_seeded_complete_and_spread_over_the_replay():
    plan = plan_faults(np.random.default_rng(7), 20_000, DEFAULT_FAULTS)
    assert plan == plan_faults(np.random.default_rng(7), 20_000, DEFAULT_FAULTS)
    assert plan != plan_faults(np.random.default_rng(8), 20_000, DEFAULT_FAULTS)
    assert {kind: sum(f.kind is kind for f in plan) for kind in FaultKind} == DEFAULT_FAULTS
    moments = [f.at_event for f in plan]
    assert moments == sorted(moments) and len(set(moments)) == len(moments)
    assert FIRST * 20_000 <= moments[0] and moments[-1] <= LAST * 20_000
    slot = (LAST - FIRST) * 20_000 / len(plan)
    assert min(np.diff(moments)) >= 0.4 * slot - 1  # never two faults at once


def test_lost_and_duplicated_are_shortfalls_and_excesses_per_item():
    expected = item_counts(np.array(["a", "a", "a", "b", "c"], dtype=object))
    diff = compare_counts(expected, {"a": 2, "b": 3, "d": 1})  # a short 1, b over 2, c short 1, d over 1
    assert (diff.lost, diff.duplicated, diff.items_short, diff.items_over) == (2, 3, 2, 2)
    assert compare_counts(expected, {"a": 3, "b": 1, "c": 1}).to_json() == {
        "lost_events": 0, "duplicated_events": 0, "items_short": 0, "items_over": 0}


def test_expected_counts_below_watermarks_come_from_the_topic_positions():
    index = TopicIndex(np.array(["t/0", "t/0", "t/0", "t/1", "t/1"], dtype=object),
                       np.array([0, 1, 2, 0, 1], dtype=np.int64), np.array(["a", "b", "a", "a", "c"], dtype=object))
    assert index.below({"t/0": 2, "t/1": 1}).to_dict() == {"a": 2, "b": 1}
    assert index.below({}).empty
    pd.testing.assert_series_equal(index.below({"t/0": 3, "t/1": 2}), item_counts(index.items))


def test_a_snapshot_is_kept_only_when_no_write_landed_between_its_reads():
    marks = iter([{"t/0": 1}, {"t/0": 2}, {"t/0": 2}, {"t/0": 2}])
    assert consistent(lambda: next(marks), lambda: {"a": 1}) == StoreSnapshot({"t/0": 2}, {"a": 1})
    moving = iter(range(100))
    assert consistent(lambda: {"t/0": next(moving)}, dict, attempts=3) is None
