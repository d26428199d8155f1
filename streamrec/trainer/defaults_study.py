"""`streamrec study-defaults`: choose a ranking model's defaults by how they do ACROSS data sets, on
validation data only (issue 15: defaults that transfer, never chosen on a test split).

Each candidate setting is fitted on the validation split of every study log and scored by hr@10:

- the synthetic logs of `STUDY_LOGS`, each with a different character (strong or weak planted
  groups, short histories, anonymous sessions, a long tail of items, repeat consumption);
- with `--data`, a real log at several time splits: its training part (the topn protocol's test
  items removed), cut at 60 %, 80 % and 100 % of its time span.

Every split is the topn protocol one level down: distinct pairs, each user's last item removed
(that is the test item, never looked at), then each user's last remaining item is the validation
target. A setting's score is its mean rank across the logs (1 = best on that log; ties share the
mean rank) and, to break ties, its mean hr@10 relative to popularity. The current defaults are
always a candidate; the report names the winner and whether it beats them, the splits where the
winner is below popularity, and the best setting that beats the defaults without falling below
popularity on any split (`best_never_below_popularity`, the rule every default must meet).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import cache
from multiprocessing import get_context
from typing import TypedDict

import numpy as np

from streamrec.stream.loaders import InteractionLog, load_log
from streamrec.stream.synthetic import session_log, synthetic_log
from streamrec.trainer import registry
from streamrec.trainer.evaluation.splits import distinct_pairs, leave_last_out
from streamrec.trainer.evaluation.topn import ranking_metrics
from streamrec.trainer.interactions import Interactions

STUDY_LOGS: dict[str, Callable[[], InteractionLog]] = {
    "groups-strong": lambda: synthetic_log(events=20_000, users=1_500, items=300, affinity=0.85, seed=11),
    "groups-weak": lambda: synthetic_log(events=20_000, users=1_500, items=300, affinity=0.3, seed=12),
    "short-histories": lambda: synthetic_log(events=9_000, users=2_000, items=500, affinity=0.6, seed=13),
    "long-tail": lambda: synthetic_log(events=30_000, users=1_500, items=4_000, clusters=20, affinity=0.7, seed=14),
    "sessions": lambda: session_log(sessions=6_000, items=2_000, seed=15),
}
TIME_CUTS = (0.6, 0.8, 1.0)
METRIC = "hr@10"
Params = dict[str, object]


class Split(TypedDict):
    """One validation split: the part to fit on and the (user, item) targets to score."""

    fit: Interactions
    users: np.ndarray
    items: np.ndarray


class Candidate(TypedDict):
    params: Params
    scores: dict[str, float]
    mean_rank: float
    mean_lift: float


def validation_split(log: InteractionLog, cut: float = 1.0) -> Split:
    """The topn protocol one level down: drop each user's test item, keep the training part up to
    `cut` of its time span, and validate on each user's last remaining item. The test items go
    first, so that a time cut never brings one of them back into training."""
    data = Interactions.from_log(distinct_pairs(log), implicit=True)
    train_mask, _ = leave_last_out(data)
    train = Interactions.from_log(time_cut(data.subset(train_mask).log, cut), implicit=True)
    inner_mask, valid = leave_last_out(train)
    return Split(fit=train.subset(inner_mask), users=train.user_idx[valid], items=train.item_idx[valid])


def time_cut(log: InteractionLog, share: float) -> InteractionLog:
    """The log's events up to `share` of its time span (the whole log at 1)."""
    if share >= 1.0:
        return log
    low, high = float(np.nanmin(log.timestamp)), float(np.nanmax(log.timestamp))
    return log.take(np.flatnonzero(log.timestamp <= low + share * (high - low)))


@cache
def study_split(name: str, data: str, fmt: str) -> Split:
    """The validation split called `name` (cached per process: workers build each once)."""
    if name in STUDY_LOGS:
        return validation_split(STUDY_LOGS[name]())
    return validation_split(load_log(data, fmt), float(name.rsplit("@", 1)[1].rstrip("%")) / 100.0)


def split_names(data: str | None) -> list[str]:
    names = list(STUDY_LOGS)
    if data:
        names += [f"{os.path.basename(os.path.normpath(data))}@{round(cut * 100)}%" for cut in TIME_CUTS]
    return names


def score(model: str, params: Params, split: str, data: str, fmt: str) -> float:
    """Validation hr@10 of `model` with `params` on one split (runs in a worker process)."""
    part = study_split(split, data, fmt)
    fitted = registry.model_class(model)(**params).fit(part["fit"])
    return float(ranking_metrics(fitted, part["users"], part["items"])[METRIC])


def grid_points(grid: dict[str, Sequence[object]]) -> list[Params]:
    """The cartesian product of the grid (the defaults come first, as the empty setting)."""
    names = sorted(grid)
    return [{}] + [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def mean_ranks(table: np.ndarray) -> np.ndarray:
    """(candidates,) mean over columns of each candidate's rank in its column (1 = best; ties share)."""
    ranks = np.empty_like(table)
    for column in range(table.shape[1]):
        values = table[:, column]
        ranks[:, column] = [(values > v).sum() + ((values == v).sum() + 1) / 2 for v in values]
    return ranks.mean(axis=1)


class Study(TypedDict):
    """One model's comparison: the settings to score and where its figures go."""

    model: str
    grid: dict[str, list[object]]
    fixed: Params


def resolve_grid(model: str, grid: dict[str, Sequence[object | str]]) -> dict[str, list[object]]:
    """Grid values as given, except "*F" strings: F times the model's default (e.g. lr=*0.3,*3)."""
    defaults = registry.model_class(model).Params().model_dump()
    resolved: dict[str, list[object]] = {}
    for name, values in grid.items():
        resolved[name] = [type(defaults[name])(float(v[1:]) * defaults[name])
                          if isinstance(v, str) and v.startswith("*") else v for v in values]
    return resolved


def run_studies(studies: Sequence[Study], data: str | None = None, fmt: str = "ml-100k", jobs: int = 1,
                on_done: Callable[[dict[str, object]], None] | None = None) -> list[dict[str, object]]:
    """Score every study's grid points (and defaults) on every split, all fits in one pool of `jobs`
    processes; `on_done` gets each study's report as soon as its last fit is in."""
    names = split_names(data)
    tasks: list[tuple[int, str, Params, str]] = [(-1, "popularity", {}, name) for name in names]
    for number, entry in enumerate(studies):
        tasks += [(number, entry["model"], {**entry["fixed"], **params}, name)
                  for params in grid_points(entry["grid"]) for name in names]
    values: dict[int, float] = {}
    reports: list[dict[str, object] | None] = [None] * len(studies)
    remaining = {number: sum(1 for t in tasks if t[0] == number) for number in range(-1, len(studies))}

    def finished(index: int, value: float) -> None:
        values[index] = value
        number = tasks[index][0]
        remaining[number] -= 1
        print(f"study-defaults: {len(values)}/{len(tasks)} fits", file=sys.stderr, flush=True)
        for n in range(len(studies)):
            if reports[n] is None and remaining[n] == 0 and remaining[-1] == 0:
                rows = [i for i, t in enumerate(tasks) if t[0] == n]
                popularity = np.array([values[i] for i in range(len(names))])
                reports[n] = summarise(studies[n], names, popularity, np.array([values[i] for i in rows]))
                if on_done:
                    on_done(reports[n])

    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(score, m, p, s, data or "", fmt): i for i, (_, m, p, s) in enumerate(tasks)}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    else:
        for index, (_, m, p, s) in enumerate(tasks):
            finished(index, score(m, p, s, data or "", fmt))
    return [report for report in reports if report is not None]


def summarise(entry: Study, names: list[str], popularity: np.ndarray, flat: np.ndarray) -> dict[str, object]:
    """One study's report from its fits' validation figures (grid points x splits, in task order)."""
    model, grid = entry["model"], entry["grid"]
    candidates = grid_points(grid)
    table = flat.reshape(len(candidates), len(names))
    ranks = mean_ranks(table)
    lifts = (table / np.maximum(popularity, 1e-12)).mean(axis=1)
    rows = [Candidate(params=params, scores=dict(zip(names, map(float, row))), mean_rank=float(rank),
                      mean_lift=float(lift)) for params, row, rank, lift in zip(candidates, table, ranks, lifts)]
    order = sorted(range(len(rows)), key=lambda n: (rows[n]["mean_rank"], -rows[n]["mean_lift"]))
    best = order[0]
    # a default must never be below popularity (issue 15): the best setting that beats the defaults
    # and is at or above popularity on every split, where the first by mean rank is not
    safe = [n for n in order if n != 0 and rows[n]["mean_rank"] < rows[0]["mean_rank"]
            and bool((table[n] >= popularity).all())]
    defaults = registry.model_class(model).Params().model_dump()
    return {
        "model": model, "metric": METRIC, "splits": names, "fixed_params": entry["fixed"],
        "popularity": dict(zip(names, map(float, popularity))),
        "defaults": {name: defaults[name] for name in grid},
        "candidates": sorted(rows, key=lambda r: (r["mean_rank"], -r["mean_lift"])),
        "winner": {**{name: defaults[name] for name in grid}, **rows[best]["params"]},
        "beats_defaults": best != 0 and rows[best]["mean_rank"] < rows[0]["mean_rank"],
        "below_popularity": [name for name, value, pop in zip(names, table[best], popularity) if value < pop],
        "best_never_below_popularity": {**{name: defaults[name] for name in grid}, **rows[safe[0]]["params"]}
        if safe else None,
    }
