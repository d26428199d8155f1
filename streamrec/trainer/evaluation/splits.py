"""Train/test splits of an interaction log, exactly as EVALUATION.md defines them."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from streamrec.stream.loaders import InteractionLog, load_log
from streamrec.trainer.interactions import Interactions

N_FOLDS = 5


def rating_folds(
    log: InteractionLog, path: str | Path, fmt: str, seed: int
) -> list[tuple[InteractionLog, InteractionLog]]:
    """ml-100k: the given u1..u5 base/test files, beside `u.data` (the folder, or `u.data` in it:
    given the file, random folds were drawn without a word); other data: five shuffled 80/20 folds."""
    folder = Path(path)
    if folder.name == "u.data" and folder.is_file():
        folder = folder.parent
    if fmt == "ml-100k" and folder.is_dir() and (folder / "u1.base").exists():
        missing = [name for n in range(1, N_FOLDS + 1) for name in (f"u{n}.base", f"u{n}.test")
                   if not (folder / name).exists()]
        if missing:
            raise ValueError(f"{folder} holds u1.base but not {', '.join(missing)}: the rating protocol uses all "
                             f"{N_FOLDS} of MovieLens' folds")
        return [
            (load_log(folder / f"u{n}.base", fmt), load_log(folder / f"u{n}.test", fmt))
            for n in range(1, N_FOLDS + 1)
        ]
    rated = np.flatnonzero(np.isfinite(log.rating))
    if not len(rated):
        raise ValueError("the rating protocol needs explicit ratings; this log has none")
    if len(rated) < N_FOLDS:
        raise ValueError(f"the rating protocol's {N_FOLDS} folds need at least {N_FOLDS} rated events; "
                         f"this log has {len(rated)}")
    if len(rated) < len(log):  # announced, as a missing timestamp column is
        print(f"note: {len(log) - len(rated)} of {len(log)} events have no rating; the rating protocol's "
              "folds use the rated ones only", file=sys.stderr)
    parts = np.array_split(np.random.default_rng(seed).permutation(rated), N_FOLDS)
    folds = []
    for n in range(N_FOLDS):
        test = np.sort(parts[n])
        train = np.sort(np.concatenate([p for m, p in enumerate(parts) if m != n]))
        folds.append((log.take(train), log.take(test)))
    return folds


def distinct_pairs(log: InteractionLog) -> InteractionLog:
    """One event per (user, item) pair, at its latest timestamp, carrying the sum of the pair's
    values (an event without a value counts 1): the topn protocol's pair de-duplication
    (EVALUATION.md), so a repeated item can neither be the test item and a training item at once,
    nor weigh more than once unless `--weights` asks for its values. Time order is kept."""
    if not len(log):
        return log
    frame = pd.DataFrame({"u": log.user_id, "i": log.item_id, "t": log.timestamp,
                          "v": np.where(np.isfinite(log.rating), log.rating, 1.0), "row": np.arange(len(log))})
    grouped = frame.groupby(["u", "i"], sort=False)
    last_row = frame.loc[grouped["t"].idxmax().to_numpy(), "row"].to_numpy()
    collapsed = log.take(np.sort(last_row))
    if len(collapsed) == len(log):
        return log
    totals = grouped["v"].sum()
    summed = totals.reindex(pd.MultiIndex.from_arrays([collapsed.user_id, collapsed.item_id])).to_numpy()
    return replace(collapsed, rating=summed.astype(np.float64))


def protocol_log(log: InteractionLog, protocol: str, fmt: str) -> InteractionLog:
    """The log a protocol runs on, for `evaluate` and `tune` alike (tune checked nothing of the
    prequential protocol's ids, and failed at its final fit on an id a search had learned from).
    Prequential: ids an event stream takes (`_check_stream_ids`). Sessions (the `sessions` format
    under topn, EVALUATION.md's session protocol) with fewer than two distinct items are dropped:
    unlike a user with one item, which stays as training data, such a session has no next item to
    predict, and kept it moved the figures (600 one-item sessions on items no longer session holds
    took a popularity baseline from 0.166 to 0.0)."""
    if protocol == "prequential":
        _check_stream_ids(log)
    if fmt != "sessions" or protocol != "topn" or not len(log):
        return log
    pairs = pd.DataFrame({"session": log.user_id, "item": log.item_id}).drop_duplicates()
    distinct = pairs.groupby("session", sort=False).size()
    keep = np.isin(log.user_id, distinct.index[distinct.to_numpy() >= 2].to_numpy())
    dropped = int(len(distinct) - (distinct.to_numpy() >= 2).sum())
    if dropped == len(distinct):  # an empty log failed later, in the split, with an IndexError
        raise ValueError(f"none of the {dropped:,} sessions has two distinct items, so none has a next item to "
                         "predict (sessions with fewer are dropped; EVALUATION.md)")
    if dropped:
        print(f"note: {dropped:,} sessions with fewer than two distinct items dropped (EVALUATION.md)",
              file=sys.stderr)
    return log if keep.all() else log.take(keep)


def leave_last_out(data: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """(train mask over events, test event index per test user) for temporal leave-last-out.

    The test event of a user is their latest one (ties: the largest item id; item indices follow
    id order). Users with a single interaction are training-only.
    """
    order = np.lexsort((data.item_idx, data.timestamps, data.user_idx))
    users = data.user_idx[order]
    last = np.r_[users[1:] != users[:-1], True]
    first = np.r_[True, users[1:] != users[:-1]]
    test = order[last & ~first]
    train = np.ones(len(data), dtype=bool)
    train[test] = False
    return train, test


def _check_stream_ids(log: InteractionLog) -> None:
    """The online models take the ids a live stream takes: at most `MAX_ID_BYTES` of UTF-8 (a longer
    one is dead-lettered there). A longer id is an error that shows it, before any learning, where
    it failed deep in the key store without saying which id."""
    from streamrec.stream.events import MAX_ID_BYTES, SHORT_ID_CHARS, id_fits

    for name, ids in (("user_id", log.user_id), ("item_id", log.item_id)):
        chars = np.fromiter(map(len, ids), np.int64, len(ids))
        for row in np.flatnonzero(chars > SHORT_ID_CHARS).tolist():
            if not id_fits(ids[row]):
                size = len(ids[row].encode("utf-8", "surrogatepass"))
                raise ValueError(f"{name} {ids[row][:40]!r}... is {size} bytes long; online models take "
                                 f"ids of at most {MAX_ID_BYTES} UTF-8 bytes, as the event stream does "
                                 "(a longer one is dead-lettered there): shorten or hash them first")
