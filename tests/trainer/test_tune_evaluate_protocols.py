"""`streamrec tune` and `streamrec evaluate` keep EVALUATION.md's protocols honest: the tuned test
figures exclude what the search saw, both commands apply the same checks to a model and its
`--weights`, and odd logs or settings give a clear error (exit 2) instead of a traceback, a
misleading figure or a silently reshaped JSON object. Small logs, real fits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from streamrec.trainer.evaluation.harness import evaluate
from streamrec.trainer.evaluation.metrics import mae, rmse
from streamrec.trainer.tuning import tune


def _plain(path: Path, scale: float = 1.0) -> Path:
    """30 users x 10 events over 20 items, ratings 1-5 times `scale`, epoch-second times."""
    rows = [(u, 100 + (u * 7 + k) % 20, (1 + (u + k) % 5) * scale, 1_600_000_000 + 100 * u + k)
            for u in range(30) for k in range(10)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(path, index=False)
    return path


def _cli(*args: str) -> tuple[int, str]:
    from streamrec.app.cli import cli

    run = CliRunner().invoke(cli, list(args))
    return run.exit_code, run.output


def test_tuned_rating_figures_come_from_the_fold_the_search_never_saw(tmp_path: Path) -> None:
    """F1: the search fits and validates on fold 1's training part, which holds folds 2-5's test
    ratings; their mean was reported as the tuned test figure. Both figures are fold 1's now, the
    same number `evaluate` reports for that fold."""
    path = _plain(tmp_path / "plain.csv")
    result = tune("rating", "mf-sgd", ["epochs=3"], path, "csv", trials=2, seed=0)
    for which in ("tuned", "default"):
        test = result["test"][which]
        assert test["test_folds"] == [1] and len(test["metrics"]["rmse_per_fold"]) == 1, which
    folds = evaluate("rating", "mf-sgd", ["epochs=3"], path, "csv", seed=0)["metrics"]["rmse_per_fold"]
    assert result["test"]["default"]["metrics"]["rmse"] == pytest.approx(folds[0])


def test_a_sessions_log_of_one_item_sessions_is_a_clear_error(tmp_path: Path) -> None:
    """F3: every session dropped left an empty log, and leave-last-out raised an IndexError."""
    path = tmp_path / "sessions.csv"
    path.write_text("session_id,item_id,timestamp\n" + "".join(f"s{n},{n % 7},{n}\n" for n in range(50)))
    for run in (lambda: evaluate("topn", "popularity", [], path, "sessions"),
                lambda: tune("topn", "item-knn", [], path, "sessions", trials=1)):
        with pytest.raises(ValueError, match="none of the 50 sessions has two distinct items"):
            run()


@pytest.mark.parametrize(("protocol", "model", "error"), [
    ("prequential", "als", "als is not an online model"),
    ("topn", "online-mf", "online-mf is an online model; the topn protocol needs a batch model"),
    ("rating", "als", r"als does not support explicit feedback \(protocol rating\)"),
])
def test_tune_refuses_a_model_the_protocol_cannot_run_as_evaluate_does(tmp_path: Path, protocol: str, model: str,
                                                                       error: str) -> None:
    """F4: tune skipped evaluate's checks: an AttributeError after loading the log, or (rating,
    als) a search and test figures for a model evaluate refuses."""
    path = _plain(tmp_path / "plain.csv")
    for run in (lambda: tune(protocol, model, [], path, "csv", trials=1),
                lambda: evaluate(protocol, model, [], path, "csv")):
        with pytest.raises(ValueError, match=error):
            run()


def test_a_search_whose_every_trial_fails_says_why_and_exits_2(tmp_path: Path) -> None:
    """F5: a RuntimeError blaming the budget escaped as a traceback."""
    path = _plain(tmp_path / "plain.csv")
    code, output = _cli("tune", "--protocol", "prequential", "--model", "online-bpr", "--param",
                        "impression_negatives=10", "--trials", "1", "--seed", "1", "--data", str(path), "--format",
                        "csv", "--json")
    assert code == 2, output
    assert "none of the 1 trials of online-bpr completed: 1 failed, the first with" in output
    assert "impression_negatives" in output and "budget" not in output


def test_prequential_tuning_neither_searches_nor_reports_the_whole_stream_means(tmp_path: Path) -> None:
    """F6: `hr@10_all` covers the first half of the stream, the events the winner was chosen on."""
    path = _plain(tmp_path / "plain.csv")
    with pytest.raises(ValueError, match="not 'hr@10_all'"):
        tune("prequential", "online-mf", [], path, "csv", trials=1, metric="hr@10_all")
    result = tune("prequential", "online-mf", [], path, "csv", trials=1, seed=0)
    for which in ("tuned", "default"):
        metrics = result["test"][which]["metrics"]
        assert "hr@10_second_half" in metrics and not any(name.endswith("_all") for name in metrics), metrics


def test_a_fixed_seed_with_several_seeds_is_refused(tmp_path: Path) -> None:
    """F7: `--param seed=7 --seeds 3` reported three identical fits as seeds 0, 1 and 2."""
    path = _plain(tmp_path / "plain.csv")
    with pytest.raises(ValueError, match="--param seed fixes the seed of every fit: --seeds 3"):
        evaluate("topn", "als", ["seed=7"], path, "csv", seeds=3)


def test_tuned_true_refuses_seeds_and_reports_the_fields_of_a_plain_evaluation(tmp_path: Path) -> None:
    """F8: `--seeds` was ignored under `--param tuned=true`, whose JSON lacked `engine`,
    `weights_used`, `recommend_ms_per_user` and `test_users`."""
    path = _plain(tmp_path / "plain.csv")
    with pytest.raises(ValueError, match="--seeds 3 with --param tuned=true"):
        evaluate("topn", "amazon-i2i", ["tuned=true"], path, "csv", seeds=3)
    plain = evaluate("topn", "amazon-i2i", [], path, "csv")
    tuned = evaluate("topn", "amazon-i2i", ["tuned=true"], path, "csv")
    assert set(plain) - set(tuned) == set() and set(plain["metrics"]) == set(tuned["metrics"])
    assert tuned["engine"] == "local" and tuned["weights"] == "binary" and tuned["weights_used"] is True
    assert tuned["metrics"]["test_users"] == plain["metrics"]["test_users"] == 30


def test_several_seeds_keep_null_metrics_lists_and_counts(tmp_path: Path) -> None:
    """F9: a metric null in every run disappeared from `metrics`, `rmse_per_fold` was dropped and
    counts became floats."""
    stream = tmp_path / "one_user.csv"
    stream.write_text("user_id,item_id,timestamp\n" + "".join(f"1,{n % 20},{1_600_000_000 + n}\n" for n in range(200)))
    result = evaluate("prequential", "online-popularity", [], stream, "csv", seeds=2)
    assert set(result["metrics"]) == set(result["per_seed"][0]["metrics"])
    assert result["metrics"]["hr@10_second_half"] is None and result["metrics_stderr"]["hr@10_second_half"] is None
    assert type(result["metrics"]["evaluated_events"]) is int and "evaluated_events" not in result["metrics_stderr"]
    rated = evaluate("rating", "mf-sgd", ["epochs=2"], _plain(tmp_path / "plain.csv"), "csv", seeds=2)
    per_fold = np.mean([run["metrics"]["rmse_per_fold"] for run in rated["per_seed"]], axis=0)
    assert rated["metrics"]["rmse_per_fold"] == pytest.approx(per_fold.tolist())
    assert rated["metrics"]["rmse"] == pytest.approx(np.mean([run["metrics"]["rmse"] for run in rated["per_seed"]]))
    topn = evaluate("topn", "amazon-i2i", [], tmp_path / "plain.csv", "csv", seeds=2)
    assert type(topn["metrics"]["test_users"]) is int


def test_errors_of_huge_ratings_do_not_overflow(tmp_path: Path) -> None:
    """F10: squared errors of ratings near 1e200 overflowed; RMSE printed as null under exit 0."""
    assert rmse(np.array([3e200, 1e200]), np.array([1e200, 1e200])) == pytest.approx(np.sqrt(2) * 1e200)
    assert mae(np.array([3e200]), np.array([1e200])) == pytest.approx(2e200)
    assert rmse(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(np.sqrt(2.5))
    huge = evaluate("rating", "item-knn", [], _plain(tmp_path / "huge.csv", scale=1e200), "csv")["metrics"]
    assert huge["rmse"] is not None and 1e199 < huge["mae"] <= huge["rmse"] < 1e201
    assert all(value is not None and np.isfinite(value) for value in huge["rmse_per_fold"])


def test_tune_applies_evaluates_weights_rule_and_records_it(tmp_path: Path) -> None:
    """F11: tune took `--weights raw` under the rating protocol, and its JSON did not say which
    weights were used."""
    path = _plain(tmp_path / "plain.csv")
    with pytest.raises(ValueError, match="--weights raw applies to the topn protocol only"):
        tune("rating", "mf-sgd", [], path, "csv", trials=1, weights="raw")
    used = tune("topn", "als", ["iterations=2"], path, "csv", trials=1, weights="raw")
    assert (used["weights"], used["weights_used"]) == ("raw", True)
    unused = tune("topn", "amazon-i2i", [], path, "csv", trials=1, weights="raw")
    assert (unused["weights"], unused["weights_used"]) == ("raw", False)
    assert evaluate("topn", "amazon-i2i", [], path, "csv", weights="raw")["weights_used"] is False


def test_an_arithmetic_failure_of_a_fit_names_the_model_and_its_parameters(tmp_path: Path) -> None:
    """F12: `--param lr=1e30` raised a ZeroDivisionError in BPR's numba kernel, a traceback."""
    path = _plain(tmp_path / "plain.csv")
    code, output = _cli("evaluate", "--protocol", "topn", "--model", "bpr", "--param", "lr=1e30", "--data", str(path),
                        "--format", "csv", "--json")
    assert code == 2, output
    assert "bpr failed with --param lr=1e30: ZeroDivisionError" in output
    assert json.loads(_cli("evaluate", "--protocol", "topn", "--model", "bpr", "--param", "epochs=1", "--data",
                           str(path), "--format", "csv", "--json")[1].splitlines()[-1])["model"] == "bpr"
