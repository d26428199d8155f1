"""The freshness probe's summary: a trial that is never reflected counts in the percentiles as its
timeout (issue 16), so one lost trial out of twenty decides the p99 instead of vanishing from it."""

from __future__ import annotations

from streamrec.app.probe import Trial, summarise


def trial(seconds: float | None, hits: int = 3, cold_start: bool = False) -> Trial:
    return Trial(seconds, cluster=4, user="probe-x", hits=hits, cold_start=cold_start,
                 model_hits=None if seconds is not None else 2)


def test_a_lost_trial_counts_as_its_timeout():
    results = [trial(1.0 + n / 100) for n in range(19)] + [trial(None, hits=1, cold_start=True)]
    summary = summarise(results, timeout_s=180.0)
    assert summary["trials"] == 20 and summary["reflected"] == 19 and summary["timeouts"] == 1
    assert summary["max_seconds"] == 180.0
    assert summary["p99_seconds"] > 100.0  # the lost trial, not the slowest reflected one
    assert summary["p99_reflected_seconds"] < 1.2
    assert summary["timed_out"] == [{"user": "probe-x", "cluster": 4, "hits": 1, "cold_start": True, "model_hits": 2}]
    assert summary["timeouts_serving_behind_model"] == 1  # the server has the user, serving answered cold


def test_a_timeout_the_model_itself_does_not_reflect_is_not_the_pipelines():
    lost = Trial(None, cluster=2, user="probe-y", hits=0, cold_start=False, model_hits=0)
    summary = summarise([trial(1.0), lost], timeout_s=60.0)
    assert summary["timeouts"] == 1 and summary["timeouts_serving_behind_model"] == 0


def test_every_trial_reflected_keeps_the_plain_percentiles():
    summary = summarise([trial(0.5), trial(1.5)], timeout_s=60.0)
    assert summary["timeouts"] == 0 and summary["timed_out"] == []
    assert summary["p99_seconds"] == summary["p99_reflected_seconds"]


def test_no_reflected_trial_at_all():
    summary = summarise([trial(None), trial(None)], timeout_s=30.0)
    assert summary["p50_seconds"] == summary["p99_seconds"] == 30.0 and summary["p99_reflected_seconds"] is None


def test_the_summary_says_where_a_slow_trials_time_went():
    """A trial reflected by the fold-in (serving has no row yet) counts as such; a slow one lists
    when serving first answered from the user's row and how many cluster items that answer held."""
    by_fold_in = trial(0.3, cold_start=True)
    slow = Trial(3.8, cluster=1, user="probe-z", hits=3, cold_start=False, row_seconds=0.76, row_hits=2)
    summary = summarise([by_fold_in, slow, trial(1.0)], timeout_s=60.0)
    assert summary["reflected_by_fold_in"] == 1
    assert summary["slow"] == [{"seconds": 3.8, "row_seconds": 0.76, "row_hits": 2}]
