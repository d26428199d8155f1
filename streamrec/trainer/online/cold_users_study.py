"""`streamrec study-cold-users`: how to serve a user who has events but no row yet, chosen on a
validation split and reported once on the test split.

Serving meets such users between a user's first events and the trainer's (or the next refit's) row
for them. It can rank by popularity, by the items' learned biases (a zero user vector), or by the
**fold-in**: the mean vector of the user's recent items, scaled by a weight, as the user's vector
(`fold_in_weight` in streamrec.serving.pipeline). The weight trades the items' similarity to what
the user did against their popularity, and its scale depends on the model's vectors, so it is
chosen here and not guessed.

Protocol: online BPR (its defaults) learns the log's first part in time order; the users whose
first event comes after it are the new users. Each one with more than m events there is asked once
per m in `KNOWN`: their first m items are known, the (m+1)-th is the target, the known items are
never recommended. Validation learns the first 25% and asks the new users of 25-50%; test learns
the first 50% and asks those of the rest. The default weight must transfer, so it is chosen across
logs of different character (`study_logs`: synthetic sessions, tight sessions, planted groups, and
a real log): the best mean rank of validation hit@10, ties broken by the smallest worst-case loss
against each log's own best weight, among the weights never below the better of popularity and
the biases on any log's validation split (the fallbacks a new user gets otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from streamrec.core.progress import progress_bar
from streamrec.stream.events import EventBatch
from streamrec.stream.loaders import InteractionLog
from streamrec.stream.synthetic import session_log, synthetic_log
from streamrec.trainer.online.models import OnlineBPR

KNOWN = (1, 2, 3)
WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)
SPLITS = {"validation": (0.25, 0.5), "test": (0.5, 1.0)}
K = 10
BATCH_EVENTS = 1000


@dataclass(frozen=True)
class Queries:
    """One row per (user, m): the known items' rows, padded with -1, and the target's row."""

    known: np.ndarray  # (queries, max m) int64
    target: np.ndarray  # (queries,) int64
    m: np.ndarray  # (queries,) int64


def _queries(events: pd.DataFrame, new_users: np.ndarray, index: pd.Index) -> Queries:
    """The new users' first events, as rows of the model's item table (-1: no row)."""
    mine = events[events["user"].isin(new_users)]
    rank = mine.groupby("user", sort=False).cumcount().to_numpy()
    rows = index.get_indexer(mine["item"].to_numpy(object))
    width = max(KNOWN) + 1
    first = np.full((len(pd.unique(mine["user"])), width), -1, np.int64)
    user_code = pd.factorize(mine["user"])[0]
    keep = rank < width
    first[user_code[keep], rank[keep]] = rows[keep]
    lengths = np.bincount(user_code[keep], minlength=len(first))
    parts = []
    for m in KNOWN:
        asked = np.flatnonzero(lengths > m)
        target = first[asked, m]
        known = np.where(np.arange(max(KNOWN)) < m, first[asked, : max(KNOWN)], -1)
        valid = (target >= 0) & (known >= 0).any(axis=1) & ~(known == target[:, None]).any(axis=1)
        parts.append((known[valid], target[valid], np.full(int(valid.sum()), m)))
    return Queries(*(np.concatenate(column) for column in zip(*parts)))


def _hits(scores: np.ndarray, queries: Queries) -> np.ndarray:
    """Whether each query's target is in its top K, the known items left out."""
    scores = scores.copy()
    owner = np.repeat(np.arange(len(scores)), queries.known.shape[1])
    known = queries.known.ravel()
    scores[owner[known >= 0], known[known >= 0]] = -np.inf
    top = np.argpartition(-scores, K, axis=1)[:, :K]
    return (top == queries.target[:, None]).any(axis=1)


def _evaluate(events: pd.DataFrame, learned: float, asked: float, show_progress: bool) -> dict[str, object]:
    split, end = int(len(events) * learned), int(len(events) * asked)
    train, later = events.iloc[:split], events.iloc[split:end]
    model = OnlineBPR()
    with progress_bar(f"online-bpr on the first {learned:.0%}", split, show_progress) as advance:
        for start in range(0, split, BATCH_EVENTS):
            part = train.iloc[start : start + BATCH_EVENTS]
            model.learn_many(EventBatch.from_columns(part["user"].to_numpy(object), part["item"].to_numpy(object),
                                                     part["type"].to_numpy(object), part["t"].to_numpy(np.float64),
                                                     part["value"].to_numpy(np.float64)))
            advance(len(part))
    model.items.sync()
    dim, values, index = model.params.dim, model.items.values.astype(np.float64), model.items.index
    new_users = np.setdiff1d(pd.unique(later["user"]), pd.unique(train["user"]))
    queries = _queries(later, new_users, index)
    popularity = train.groupby("item").size().reindex(index, fill_value=0).to_numpy(np.float64)
    vectors, bias = values[:, :dim], values[:, dim]
    present = queries.known >= 0
    means = (vectors[np.maximum(queries.known, 0)] * present[..., None]).sum(axis=1) / present.sum(axis=1)[:, None]
    strategies = {"popularity": np.broadcast_to(popularity, (len(means), len(index))),
                  "bias": np.broadcast_to(bias, (len(means), len(index)))}
    strategies.update({f"fold_in@{w:g}": w * means @ vectors.T + bias for w in WEIGHTS})
    report: dict[str, object] = {"learned_events": split, "new_users": len(new_users)}
    for name, scores in strategies.items():
        hits = _hits(np.asarray(scores), queries)
        report[name] = {f"m={m}": {f"hit@{K}": round(float(hits[queries.m == m].mean()), 4),
                                   "queries": int((queries.m == m).sum())} for m in KNOWN} | \
            {f"mean_hit@{K}": round(float(np.mean([hits[queries.m == m].mean() for m in KNOWN])), 4)}
    return report


def _choose(validation: dict[str, dict[str, object]]) -> tuple[float, dict[str, float], list[float]]:
    """Among the weights never below the better of popularity and the biases on any log's
    validation split (all of them if none is), the one with the best mean rank of validation
    hit@10, ties broken by the smallest worst relative loss against each log's best weight.
    Returns it, each weight's mean rank and the eligible weights."""
    def hit(report: dict[str, object], strategy: str) -> float:
        return report[strategy][f"mean_hit@{K}"]

    table = pd.DataFrame({name: {w: hit(report, f"fold_in@{w:g}") for w in WEIGHTS}
                          for name, report in validation.items()})
    floor = pd.Series({name: max(hit(report, "popularity"), hit(report, "bias")) for name, report in validation.items()})
    eligible = [w for w in WEIGHTS if (table.loc[w] >= floor).all()] or list(WEIGHTS)
    ranks = table.rank(ascending=False, method="average").mean(axis=1)
    regret = (1.0 - table / table.max(axis=0)).max(axis=1)
    chosen = min(eligible, key=lambda w: (ranks[w], regret[w]))
    return chosen, {f"{w:g}": round(float(ranks[w]), 3) for w in WEIGHTS}, eligible


def study_cold_users(logs: dict[str, InteractionLog], show_progress: bool | None = None) -> dict[str, object]:
    """Each log's hit@10 per strategy on validation and test; `chosen_weight` is the fold-in weight
    with the best mean rank over the logs' validation figures, and `test_chosen` its test figures."""
    reports: dict[str, dict[str, dict[str, object]]] = {}
    for name, log in logs.items():
        batch = EventBatch.from_log(log)
        events = pd.DataFrame({"user": batch.user_id, "item": batch.item_id, "type": batch.event_type,
                               "t": batch.timestamp, "value": batch.value})
        reports[name] = {split: _evaluate(events, *bounds, show_progress) for split, bounds in SPLITS.items()}
    chosen, ranks, eligible = _choose({name: report["validation"] for name, report in reports.items()})
    summary = {name: {split: {strategy: figures[f"mean_hit@{K}"] for strategy, figures in report[split].items()
                              if isinstance(figures, dict)} for split in SPLITS} for name, report in reports.items()}
    return {"protocol": "new users' (m+1)-th item from their first m, m in 1..3; the weight is chosen on the "
                        "validation splits of every log",
            "chosen_weight": chosen, "validation_mean_rank": ranks, "never_below_baselines": eligible, f"mean_hit@{K}": summary,
            "test_chosen": {name: {"fold_in": report["test"][f"fold_in@{chosen:g}"][f"mean_hit@{K}"],
                                   "popularity": report["test"]["popularity"][f"mean_hit@{K}"],
                                   "bias": report["test"]["bias"][f"mean_hit@{K}"]}
                            for name, report in reports.items()},
            "logs": reports}


def study_logs(data: InteractionLog | None, name: str = "data") -> dict[str, InteractionLog]:
    """The synthetic logs every study uses (sessions of a theme, tighter ones, users in planted
    groups: each user's first events come after others' so most users are new at some point),
    and `data` beside them."""
    logs = {"sessions": session_log(sessions=4000, seed=1),
            "sessions-tight": session_log(sessions=4000, affinity=0.9, seed=2),
            "groups": synthetic_log(events=20_000, users=4000, seed=3)}
    return logs if data is None else {name: data, **logs}
