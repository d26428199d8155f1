"""`streamrec simulate --k 3` through the real path: the per-arm hit rate is named after the k the
users were asked for (it was `hit@10` whatever k was), with `k` beside it, and the answers hold k
items."""

from __future__ import annotations

import pytest

from streamrec.app.simulate import SimulateOptions, simulate
from streamrec.stream.synthetic import synthetic_log

pytestmark = pytest.mark.slow


def test_the_hit_rate_is_named_after_the_k_asked_for(settings) -> None:
    log = synthetic_log(events=120, users=6, items=12, clusters=2, seed=1)
    result = simulate(settings, log, SimulateOptions(chunk_events=30, k=3))
    assert result["k"] == 3 and result["queries"] > 0
    for arm, figures in result["arms"].items():
        assert "hit@10" not in figures and figures["hit@3"] == figures["hits"] / figures["requests"], arm
    for lift in result["lift"].values():
        assert set(lift) == {"relative", "ci95", "replicates_without_base"}
