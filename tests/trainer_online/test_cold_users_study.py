"""`streamrec study-cold-users`: the fold-in of a new user's first items against popularity, on
logs where the answer is known, and the rule that picks the default weight."""

from __future__ import annotations

from streamrec.stream.synthetic import session_log
from streamrec.trainer.online.cold_users_study import WEIGHTS, _choose, study_cold_users


def test_on_themed_sessions_the_fold_in_beats_popularity_on_test():
    report = study_cold_users({"tight": session_log(sessions=3000, affinity=0.9, seed=4)}, show_progress=False)
    test = report["test_chosen"]["tight"]
    assert test["fold_in"] > 1.5 * test["popularity"]  # a session's theme predicts its next click
    assert report["logs"]["tight"]["test"]["new_users"] > 1000  # every session is a new user
    assert report["chosen_weight"] in WEIGHTS


def _report(popularity: float, bias: float, fold_in: dict[float, float]) -> dict[str, object]:
    return {"popularity": {"mean_hit@10": popularity}, "bias": {"mean_hit@10": bias},
            **{f"fold_in@{w:g}": {"mean_hit@10": fold_in.get(w, 0.0)} for w in WEIGHTS}}


def test_the_default_weight_never_falls_below_the_fallbacks_on_any_log():
    # 4 is the best on two logs of three, but below the biases on the first: never the default
    validation = {"real": _report(0.10, 0.20, {0.25: 0.21, 0.5: 0.22, 1.0: 0.30, 2.0: 0.25, 4.0: 0.15}),
                  "a": _report(0.10, 0.10, {0.25: 0.11, 0.5: 0.12, 1.0: 0.13, 2.0: 0.14, 4.0: 0.20}),
                  "b": _report(0.10, 0.10, {0.25: 0.11, 0.5: 0.12, 1.0: 0.13, 2.0: 0.14, 4.0: 0.20})}
    chosen, ranks, eligible = _choose(validation)
    assert 4.0 not in eligible and ranks["4"] == ranks["1"] and chosen == 2.0  # 2 ranks second everywhere
    # a tie in rank goes to the weight whose worst loss against a log's best is smaller
    tied = {"x": _report(0.1, 0.1, {0.25: 0.11, 0.5: 0.12, 1.0: 0.30, 2.0: 0.29, 4.0: 0.13}),
            "y": _report(0.1, 0.1, {0.25: 0.11, 0.5: 0.12, 1.0: 0.15, 2.0: 0.29, 4.0: 0.30})}
    chosen, ranks, _ = _choose(tied)
    assert ranks["1"] == ranks["2"] == ranks["4"] and chosen == 2.0
