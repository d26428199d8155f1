"""`streamrec study-defaults`: settings compared across logs of different character on validation
splits only; the real log's time splits never bring its test items back; the winner rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner

from streamrec.stream.synthetic import session_log
from streamrec.trainer.defaults_study import (
    STUDY_LOGS,
    Study,
    mean_ranks,
    study_split,
    summarise,
    time_cut,
    validation_split,
)
from streamrec.trainer.evaluation.splits import distinct_pairs, leave_last_out
from streamrec.trainer.interactions import Interactions


def test_mean_ranks_share_ties_and_rank_the_best_first() -> None:
    table = np.array([[0.5, 0.1], [0.5, 0.3], [0.2, 0.2]])
    assert mean_ranks(table).tolist() == [(1.5 + 3) / 2, (1.5 + 1) / 2, (3 + 2) / 2]


def test_the_report_names_the_best_setting_that_is_never_below_popularity() -> None:
    """ncf-mlp's tower study of 2026-12-04, in short: the first by mean rank (k=100 here) is below
    popularity on one log, the runner-up beats the defaults and is above it everywhere; a setting
    that never falls below popularity but does not beat the defaults is not named."""
    names = ["strong", "short", "sessions"]
    popularity = np.array([0.2, 0.14, 0.26])
    table = np.array([[0.56, 0.14, 0.26],    # the defaults (k=20)
                      [0.59, 0.13, 0.27],    # k=100: first by rank, below popularity on `short`
                      [0.54, 0.17, 0.26],    # k=200: beats the defaults, never below popularity
                      [0.50, 0.14, 0.25]])   # k=400: below on `sessions`, last
    report = summarise(Study(model="amazon-i2i", grid={"k": [100, 200, 400]}, fixed={}), names, popularity,
                       table.ravel())
    assert report["winner"] == {"k": 100} and report["below_popularity"] == ["short"]
    assert report["best_never_below_popularity"] == {"k": 200}
    worse = table.copy()
    worse[2] = [0.30, 0.14, 0.26]  # at popularity everywhere, but no longer better than the defaults
    report = summarise(Study(model="amazon-i2i", grid={"k": [100, 200, 400]}, fixed={}), names, popularity,
                       worse.ravel())
    assert report["best_never_below_popularity"] is None


def test_validation_targets_are_never_the_test_items() -> None:
    log = session_log(sessions=800, seed=3)
    data = Interactions.from_log(distinct_pairs(log), implicit=True)
    _, test = leave_last_out(data)
    test_pairs = set(zip(data.log.user_id[test], data.log.item_id[test]))
    split = validation_split(log)
    fit = split["fit"]
    fitted_pairs = set(zip(fit.log.user_id, fit.log.item_id))
    targets = set(zip(fit.users.ids[split["users"]], fit.items.ids[split["items"]]))
    assert targets and not targets & test_pairs and not fitted_pairs & test_pairs and not targets & fitted_pairs


def test_a_time_cut_of_a_real_log_keeps_its_test_items_out(tmp_path: Path) -> None:
    log = session_log(sessions=800, seed=4)
    path = tmp_path / "log.csv"
    pd.DataFrame({"user_id": log.user_id, "item_id": log.item_id, "timestamp": log.timestamp}).to_csv(path, index=False)
    data = Interactions.from_log(distinct_pairs(log), implicit=True)
    _, test = leave_last_out(data)
    test_pairs = set(zip(data.log.user_id[test], data.log.item_id[test]))
    assert len(time_cut(log, 0.5)) < len(log) and len(time_cut(log, 1.0)) == len(log)
    for cut in ("60%", "100%"):
        split = study_split(f"log.csv@{cut}", str(path), "csv")
        seen = set(zip(split["fit"].log.user_id, split["fit"].log.item_id))
        assert seen and not seen & test_pairs
    assert len(study_split("log.csv@60%", str(path), "csv")["fit"]) < len(study_split("log.csv@100%", str(path), "csv")["fit"])


def test_the_cli_scores_the_defaults_and_scaled_settings_on_every_log(tmp_path: Path) -> None:
    """amazon-i2i's k: the defaults (20) are always a candidate and *F scales them; each synthetic
    log gets a popularity figure, and the winner is the candidate with the best mean rank."""
    from streamrec.app.cli import cli

    out = tmp_path / "reports.jsonl"
    result = CliRunner().invoke(cli, ["study-defaults", "--model", "amazon-i2i", "--grid", "k=*5,400",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["splits"] == list(STUDY_LOGS) and set(report["popularity"]) == set(STUDY_LOGS)
    candidates = report["candidates"]
    assert sorted(str(c["params"]) for c in candidates) == sorted(["{}", "{'k': 100}", "{'k': 400}"])
    best = candidates[0]
    assert all(best["mean_rank"] <= c["mean_rank"] for c in candidates)
    assert report["winner"] == {"k": 20, **best["params"]}
    assert report["beats_defaults"] == (best["params"] != {} and best["mean_rank"] < next(
        c["mean_rank"] for c in candidates if c["params"] == {}))
    assert all(0 <= v <= 1 for c in candidates for v in c["scores"].values())
    assert json.loads(out.read_text().splitlines()[0])["model"] == "amazon-i2i"


def test_a_grid_entry_without_values_is_a_usage_error() -> None:
    from streamrec.app.cli import cli

    result = CliRunner().invoke(cli, ["study-defaults", "--model", "amazon-i2i", "--grid", "k"])
    assert result.exit_code == 2 and "expected key=v1,v2" in result.output
