"""`streamrec tune`: the search never sees the test split, finds a planted best region, and keeps
the defaults when nothing beats them on validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from streamrec.core.params import FloatRange, space
from streamrec.stream.synthetic import synthetic_log
from streamrec.trainer.tuning import tune
from tests.trainer.synthetic import ring_sessions


def _ring_sessions(path: Path, sessions: int = 600) -> Path:
    """`ring_sessions` as a CSV: V-SKNN's position decay is the planted best region."""
    log = ring_sessions(sessions=sessions)
    pd.DataFrame({"user_id": log.user_id, "item_id": log.item_id, "timestamp": log.timestamp}).to_csv(path, index=False)
    return path


def test_the_tuner_finds_the_planted_region_and_reports_defaults_and_winner(tmp_path: Path) -> None:
    data = _ring_sessions(tmp_path / "ring.csv")
    result = tune("topn", "sknn", [], data, "csv", trials=12, seed=0)
    assert result["best_params"]["decay"] in ("linear", "div")
    assert result["improved_on_defaults"] and result["validation"]["best"] > result["validation"]["default"]
    tuned, default = result["test"]["tuned"]["metrics"], result["test"]["default"]["metrics"]
    assert tuned["hr@10"] >= default["hr@10"]
    assert result["trials"]["completed"] >= 1 and result["metric"] == "hr@10"


@pytest.mark.slow  # twenty seconds of trials
def test_a_numeric_region_is_found_and_fixed_params_are_not_searched(tmp_path: Path) -> None:
    """online BPR on a stream: a learning rate near zero learns nothing and a huge one diverges
    (with max_norm fixed far out of reach: the default bound keeps every row finite); the winner
    lands between, and a fixed parameter is never searched."""
    log = synthetic_log(events=12_000, users=300, items=200)
    data = tmp_path / "planted.csv"
    pd.DataFrame({"user_id": log.user_id, "item_id": log.item_id, "timestamp": log.timestamp}).to_csv(data, index=False)
    result = tune("prequential", "online-bpr", ["dim=16", "max_norm=1e30"], data, "csv", trials=16, seed=1,
                  space=space(lr=FloatRange(1e-6, 100.0, log=True), dim=FloatRange(1, 2)))
    assert result["fixed_params"]["dim"] == 16 and "dim" not in result["search_space"]
    assert 5e-3 <= result["best_trial_params"]["lr"] <= 0.5, result["best_trial_params"]
    assert result["trials"]["failed"] >= 1, "a diverging learning rate fails its trial, the search goes on"
    assert result["metric"] == "hr@10_second_half"


def test_rating_protocol_prunes_on_inner_folds_and_keeps_defaults_when_they_win(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 80, 3000), rng.integers(0, 60, 3000)
    ratings = np.clip(np.round(3 + (users % 3 == items % 3) * 1.5 + rng.normal(0, 0.5, 3000)), 1, 5)
    path = tmp_path / "ratings.csv"
    pd.DataFrame({"user_id": users, "item_id": items, "rating": ratings, "timestamp": np.arange(3000.0)}).to_csv(
        path, index=False)
    result = tune("rating", "mf-sgd", ["epochs=5"], path, "csv", trials=6, seed=0)
    assert result["metric"] == "rmse" and result["direction"] == "minimize"
    if not result["improved_on_defaults"]:
        assert result["best_params"] == result["fixed_params"]
    assert result["validation"]["best"] <= result["validation"]["default"]
    assert set(result["test"]["tuned"]["metrics"]) >= {"rmse", "mae"}


def test_evaluate_with_tuned_true_searches_inside_the_fit(tmp_path: Path) -> None:
    from streamrec.trainer.evaluation.harness import evaluate

    data = _ring_sessions(tmp_path / "ring.csv")
    result = evaluate("topn", "sknn", ["tuned=true", "k=50"], data, "csv")
    assert result["params"]["k"] == 50 and result["params"]["decay"] in ("linear", "div")
    assert result["tuned"]["trials"]["completed"] >= 1 and result["tuned"]["improved_on_defaults"]
    default = evaluate("topn", "sknn", ["k=50"], data, "csv")
    assert result["metrics"]["hr@10"] >= default["metrics"]["hr@10"]


@pytest.mark.slow  # twenty seconds of neural trials
def test_a_neural_search_stops_on_its_budget_and_reports_validation_and_test(tmp_path: Path) -> None:
    """`--budget-seconds 20` with far more trials asked than fit in it: the search ends because
    of the budget (fewer trials than asked, not before the budget), overruns it by no more than
    the defaults' evaluation and the longest trial (one started before the budget ran out; trials
    differ in size, e.g. `hidden` 32-256), which the JSON times, and both validation and test
    figures come back."""
    from streamrec.app.cli import cli
    from streamrec.trainer.models.neural import sequential  # noqa: F401  (torch's import is no trial's time)

    data = _ring_sessions(tmp_path / "ring.csv", sessions=300)
    budget, asked = 20.0, 1000
    run = CliRunner().invoke(cli, ["tune", "--model", "gru4rec", "--protocol", "topn", "--data", str(data),
                                   "--format", "csv", "--param", "epochs=2", "--trials", str(asked),
                                   "--budget-seconds", str(budget), "--json"])
    assert run.exit_code == 0, run.output[-2000:]
    result = json.loads(run.stdout)
    assert result["budget_seconds"] == budget
    assert 1 <= result["trials"]["completed"] and result["trials"]["total"] < asked
    overrun = result["defaults_seconds"] + result["trials"]["longest_seconds"]
    assert result["trials"]["longest_seconds"] > 0
    assert budget <= result["search_seconds"] <= budget + overrun + 0.1 * budget, (result["search_seconds"], overrun)
    assert np.isfinite([result["validation"]["best"], result["validation"]["default"]]).all()
    for which in ("tuned", "default"):
        assert 0.0 <= result["test"][which]["metrics"]["hr@10"] <= 1.0


def test_a_metric_the_protocol_does_not_measure_is_refused_before_any_fit(tmp_path: Path) -> None:
    """`--metric hr@10` under the rating protocol optimised RMSE in the direction of hr@10 (it kept
    the worst trial and called it an improvement); `--metric mae` reported RMSE under that name;
    a misspelt metric (or prequential's hr@10) failed with a KeyError traceback after a fit."""
    path = tmp_path / "ratings.csv"
    pd.DataFrame({"user_id": np.arange(400) % 40, "item_id": np.arange(400) % 37, "rating": 1.0 + np.arange(400) % 5,
                  "timestamp": np.arange(400.0)}).to_csv(path, index=False)
    for protocol, model, metric in (("rating", "mf-sgd", "hr@10"), ("topn", "als", "ndcg10"),
                                    ("prequential", "online-bpr", "hr@10")):
        with pytest.raises(ValueError, match=f"the {protocol} protocol measures .*not '{metric}'"):
            tune(protocol, model, [], path, "csv", trials=1, metric=metric)
    result = tune("rating", "mf-sgd", ["epochs=2"], path, "csv", trials=2, seed=0, metric="mae")
    assert result["metric"] == "mae" and result["direction"] == "minimize"
    assert result["validation"]["default"] < 1.5  # an MAE: below this log's RMSE of the mean (~1.41) and of mf


def test_a_log_with_no_validation_item_gets_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "two.csv"  # every user has two items: a test item, but nothing left to validate on
    pd.DataFrame({"user_id": np.repeat(np.arange(50), 2), "item_id": np.arange(100) % 30,
                  "timestamp": np.arange(100.0)}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="none has a validation item"):
        tune("topn", "als", [], path, "csv", trials=1)
