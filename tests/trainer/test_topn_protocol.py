"""EVALUATION.md's topn details: pair de-duplication, `--weights`, `--seeds` (real fits, small logs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamrec.stream.loaders import InteractionLog, time_order
from streamrec.trainer.evaluation.harness import evaluate
from streamrec.trainer.evaluation.splits import distinct_pairs, leave_last_out
from streamrec.trainer.interactions import Interactions


def _log(rows: list[tuple[str, str, float, float]]) -> InteractionLog:
    users, items, values, stamps = (np.array(c) for c in zip(*rows))
    log = InteractionLog(users.astype(object), items.astype(object), values.astype(float), stamps.astype(float))
    return log.take(time_order(log))


def test_a_repeated_pair_counts_once_at_its_latest_time_with_summed_values() -> None:
    log = _log([("u", "a", 3.0, 1.0), ("u", "b", 1.0, 2.0), ("u", "a", 2.0, 3.0), ("v", "a", np.nan, 4.0),
                ("v", "a", np.nan, 5.0)])
    pairs = distinct_pairs(log)
    got = sorted(zip(pairs.user_id, pairs.item_id, pairs.rating, pairs.timestamp))
    assert got == [("u", "a", 5.0, 3.0), ("u", "b", 1.0, 2.0), ("v", "a", 2.0, 5.0)]  # no value: 1 per event
    assert list(pairs.timestamp) == sorted(pairs.timestamp)
    # u's test item is "a" (latest), and "a" is no longer also a training item of u
    data = Interactions.from_log(pairs, implicit=True)
    train, test = leave_last_out(data)
    assert data.items.ids[data.item_idx[test]].tolist() == ["a"]
    assert "a" not in set(data.items.ids[data.item_idx[train & (data.users.ids[data.user_idx] == "u")]])


def _play_count_csv(path: Path, seed: int = 0) -> Path:
    """The group signal is in the play counts only: each user has as many other-group items as
    own-group ones, but plays own-group items 30 times and the others once."""
    rng = np.random.default_rng(seed)
    n_items, groups = 60, 3
    rows = []
    for u in range(150):
        own = np.flatnonzero(np.arange(n_items) % groups == u % groups)
        other = np.flatnonzero(np.arange(n_items) % groups != u % groups)
        picks = [(int(i), 30.0) for i in rng.choice(own, 6, replace=False)]
        picks += [(int(i), 1.0) for i in rng.choice(other, 6, replace=False)]
        order = rng.permutation(len(picks))
        picks = [picks[k] for k in order if picks[k][1] == 1.0] + [picks[k] for k in order if picks[k][1] > 1.0]
        for n, (item, plays) in enumerate(picks):  # the last (test) event is an own-group item
            rows.append((f"user {u}", f"track:{item}", plays, 1000.0 * u + n))
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(path, index=False)
    return path


def test_weights_let_confidence_models_use_play_counts(tmp_path: Path) -> None:
    data = _play_count_csv(tmp_path / "plays.csv")
    # (ALS: confidence 1 + alpha * log1p(plays); a small alpha and rank for 60 items and 150 users)
    for model, params, gain in (("item-knn", [], 0.3), ("bpr", [], 0.3), ("als", ["factors=8", "alpha=1", "reg=0.05"], 0.05)):
        binary = evaluate("topn", model, params, data, "csv", weights="binary")
        log1p = evaluate("topn", model, params, data, "csv", weights="log1p")
        assert binary["weights"] == "binary" and log1p["weights"] == "log1p" and log1p["weights_used"]
        assert log1p["metrics"]["hr@10"] > binary["metrics"]["hr@10"] + gain, model


def test_a_model_that_cannot_use_weights_says_so(tmp_path: Path) -> None:
    result = evaluate("topn", "popularity", [], _play_count_csv(tmp_path / "plays.csv"), "csv", weights="raw")
    assert result["weights"] == "raw" and result["weights_used"] is False
    with pytest.raises(ValueError, match="topn"):
        evaluate("prequential", "online-popularity", [], tmp_path / "plays.csv", "csv", weights="log1p")


def test_seeds_report_means_stderr_and_every_run(tmp_path: Path) -> None:
    data = _play_count_csv(tmp_path / "plays.csv")
    result = evaluate("topn", "bpr", ["epochs=3"], data, "csv", seed=0, seeds=3)
    per_seed = [run["metrics"]["hr@10"] for run in result["per_seed"]]
    assert [run["seed"] for run in result["per_seed"]] == [0, 1, 2] == result["seeds"]
    assert result["metrics"]["hr@10"] == pytest.approx(np.mean(per_seed))
    assert result["metrics_stderr"]["hr@10"] == pytest.approx(np.std(per_seed, ddof=1) / np.sqrt(3))
    assert result["seed_0_metrics"]["hr@10"] == per_seed[0]
    assert len(set(per_seed)) > 1, "different seeds must give different fits"


def test_weights_that_carry_nothing_are_said_so(tmp_path: Path) -> None:
    """A zero value is no observation (implicit's convention): all zero is an error, some zero a
    warning that counts them; a value beyond float32 asks for log1p; a log without a test item
    says why."""
    frame = pd.read_csv(_play_count_csv(tmp_path / "plays.csv"))
    frame.assign(rating=0.0).to_csv(tmp_path / "zero.csv", index=False)
    with pytest.raises(ValueError, match="every pair's value is 0"):
        evaluate("topn", "bpr", ["epochs=1"], tmp_path / "zero.csv", "csv", weights="raw")
    half = np.where(np.arange(len(frame)) % 2, 0.0, frame.rating)
    frame.assign(rating=half).to_csv(tmp_path / "half.csv", index=False)
    with pytest.warns(UserWarning, match=r"\d+ of \d+ \(user, item\) pairs have value 0"):
        evaluate("topn", "item-knn", [], tmp_path / "half.csv", "csv", weights="raw")
    frame.assign(rating=1e300).to_csv(tmp_path / "huge.csv", index=False)
    with pytest.raises(ValueError, match="beyond float32's range; use --weights log1p"):
        evaluate("topn", "item-knn", [], tmp_path / "huge.csv", "csv", weights="raw")
    frame.drop_duplicates("user_id").to_csv(tmp_path / "singles.csv", index=False)
    with pytest.raises(ValueError, match="none has a test item"):
        evaluate("topn", "popularity", [], tmp_path / "singles.csv", "csv")


def test_sessions_with_fewer_than_two_distinct_items_are_dropped(tmp_path: Path) -> None:
    """EVALUATION.md's session protocol drops them; they were kept as training data, and 600
    one-item sessions on items no longer session holds took popularity's hr@10 from 0.17 to 0."""
    rng = np.random.default_rng(0)
    rows = [(f"s{s}", f"i{item}", 1e9 + 100 * s + n) for s in range(300) for n, item in
            enumerate(rng.choice(60, 4, replace=False, p=np.arange(60, 0, -1) / np.arange(60, 0, -1).sum()))]
    clean = pd.DataFrame(rows, columns=["session_id", "item_id", "timestamp"])
    junk = pd.DataFrame([(f"j{s}", f"x{s % 12}", 2e9 + s) for s in range(600)] +
                        [("r", "x1", 2e9), ("r", "x1", 2e9 + 1)],  # a repeat is one distinct item
                        columns=["session_id", "item_id", "timestamp"])
    clean.to_csv(tmp_path / "clean.csv", index=False)
    pd.concat([clean, junk]).to_csv(tmp_path / "junk.csv", index=False)
    results = [evaluate("topn", "popularity", [], tmp_path / name, "sessions") for name in ("clean.csv", "junk.csv")]
    assert results[0]["metrics"]["hr@10"] > 0.1
    figures = ("hr@10", "ndcg@10", "mrr", "recall@20", "coverage@10", "test_users")
    assert [results[1]["metrics"][f] for f in figures] == pytest.approx([results[0]["metrics"][f] for f in figures])
    assert results[1]["data"]["users"] == results[0]["data"]["users"] == 300


def test_a_negative_value_is_refused_as_a_weight_even_when_its_pair_sums_positive(tmp_path: Path) -> None:
    """5 then -3 on one pair summed to 2 before the check, and the negative value went through."""
    path = tmp_path / "plays.csv"
    pd.DataFrame({"user_id": ["u1", "u1", "u1", "u2", "u2"], "item_id": ["a", "a", "b", "a", "b"],
                  "rating": [5.0, -3.0, 1.0, 2.0, 1.0], "timestamp": np.arange(5.0)}).to_csv(path, index=False)
    for weights in ("raw", "log1p"):
        with pytest.raises(ValueError, match=f"--weights {weights} needs finite non-negative values"):
            evaluate("topn", "als", [], path, "csv", weights=weights)
    assert evaluate("topn", "popularity", [], path, "csv")["metrics"]["test_users"] == 2  # binary ignores values
