"""`streamrec experiments report`: per-arm outcomes of a live experiment, with honest intervals.

Inputs are what the running system already writes: serving's impressions topic (one impression
per answer: request id, user, shown items, the user's arm in each experiment) and the interaction
topic. Each impression is joined, by event time, with what the user did next:
- a **hit** when one of the user's positive events within `window_s` after the answer is an item
  the answer showed (hit@k of subsequent events, k = the answer's length: the figure is named
  `hit@{k}` after the k the answers were asked for, 10 unless told, and the report carries `k`);
- a **click** when an event carries the answer's `request_id` in its `context` and its item was
  shown (the attributed click-through; CTR = clicks / impressions).

Users, not requests, are the unit of randomisation, and one user's answers are correlated, so the
95% intervals come from a bootstrap over users (a cluster bootstrap): each replicate redraws the
arm's users with replacement and recomputes the ratio of the sums. The relative lift of each arm
against each other arm uses the replicates of both, paired by index. A sample-ratio check
compares the arms' user counts with the configured weights (chi-square); a p-value under 0.001
means assignment or logging is broken, and the estimates should not be trusted. So do users seen
in several arms (a sticky assignment gives each user one) and arms the configured experiment does
not have: the check reports both and raises its warning for either.

Impressions are trusted in no respect: one that is not what serving writes (a string `request_id`
and `user_id`, a list of string `items`, a finite numeric `timestamp`, `experiments` mapping names
to arm names) is counted in `malformed_impressions` and used nowhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson
import pandas as pd
from scipy import stats

from streamrec.serving.experiments import Experiments
from streamrec.stream.events import EventSchema, InvalidEvent
from streamrec.stream.impressions import shown_items
from streamrec.stream.kafka import Record
from streamrec.trainer.online.roles import EventRoles

BOOTSTRAP = 1000
SRM_ALPHA = 0.001
BLOCK_ELEMENTS = 4_000_000  # bootstrap draws per block (memory bound)
CLICK_CLOCK_SKEW_S = 60.0  # a click may be stamped this much before its answer: two clocks, serving's and the client's
DEFAULT_K = 10  # serving's default answer length: the figure keeps its historical name, hit@10

Shown = tuple[str, str, float, list[str]]  # request id, user id, time, shown items


def hit_key(k: int) -> str:
    """The name of the hit-rate figure for answers of `k` items (`hit@10` for the default)."""
    return f"hit@{k}"


def record_impressions(value: bytes | None) -> tuple[list[object], int]:
    """(the impressions of one record of the impressions topic, lines that are not JSON). A
    record holds many impressions, one JSON line each: a bad line costs that line, not the
    record's other impressions; a tombstone (no value) counts as one bad line."""
    if value is None:
        return [], 1
    parsed: list[object] = []
    bad = 0
    for line in value.split(b"\n"):
        if not line:
            continue
        try:
            parsed.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            bad += 1
    return parsed, bad


def _finite_number(value: object) -> bool:
    """An int or float (never a bool, never a numeric string) that is not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_impression(impression: object) -> tuple[Shown, dict[str, str]] | None:
    """((request id, user, time, shown items), {experiment: arm}) of one impression; None when its
    shape is not what serving writes. `list(items)` turned the string "abc" into three items and
    a nested list into an unhashable item, `float("nan")` made a time no join matches, and
    `dict(["ab"])` read experiment a arm b: every field is checked for its type instead."""
    if not isinstance(impression, dict) or (shown := shown_items(impression)) is None:
        return None
    request_id, timestamp = impression.get("request_id"), impression.get("timestamp")
    experiments = impression.get("experiments")
    if experiments is None:  # answered outside any experiment: no arm to report, not malformed
        experiments = {}
    if not isinstance(request_id, str) or not _finite_number(timestamp) or not isinstance(experiments, dict):
        return None
    if not all(isinstance(arm, str) for arm in experiments.values()):  # JSON keys are strings already
        return None
    return (request_id, shown[0], float(timestamp), shown[1]), experiments


def impressions_frame(records: Iterable[Record]) -> tuple[pd.DataFrame, int]:
    """(one row per impression and experiment it belongs to, the malformed impressions: lines that
    are not JSON, tombstones and impressions `parse_impression` refuses, none of them used). A
    request id logged twice (at-least-once delivery) counts once."""
    rows, malformed = [], 0
    for record in records:
        impressions, malformed_lines = record_impressions(record.value)
        malformed += malformed_lines
        for imp in impressions:
            parsed = parse_impression(imp)
            if parsed is None:
                malformed += 1
                continue
            base, experiments = parsed
            rows.extend((*base, experiment, arm) for experiment, arm in experiments.items())
    frame = pd.DataFrame(rows, columns=["request_id", "user_id", "timestamp", "items", "experiment", "arm"])
    return frame.drop_duplicates(["request_id", "experiment"], ignore_index=True), malformed


def events_frame(records: Iterable[Record], schema: EventSchema | None = None,
                 roles: EventRoles | None = None) -> tuple[pd.DataFrame, int]:
    """(the positive interaction events: user, item, time and the request id from their context;
    records the schema refuses, which the trainer dead-letters too and which count for no arm)."""
    schema, positive = schema or EventSchema(), (roles or EventRoles()).positive_types
    rows, invalid = [], 0
    for record in records:
        try:
            event = schema.validate(orjson.loads(record.value))
        except (orjson.JSONDecodeError, InvalidEvent):
            invalid += 1
            continue
        if event["event_type"] in positive:
            request_id = (event.get("context") or {}).get("request_id")
            rows.append((event["user_id"], event["item_id"], float(event["timestamp"]),
                         str(request_id) if request_id is not None else None))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "request_id"]), invalid


def outcomes(impressions: pd.DataFrame, events: pd.DataFrame, window_s: float) -> pd.DataFrame:
    """`impressions` with `hit` and `click` (bool) per row, joined by (user, item) and event time.
    A hit is the user's first positive event on a shown item after the answer, within `window_s`:
    an as-of join, one row per shown item, so memory is linear. Joining every event of the user
    on the item and then filtering took 4.3 GB for one user with 8,000 answers and events on one
    item. A click must also be the shown user's, within the same window: a click carrying someone
    else's request id, or dated before the answer (beyond `CLICK_CLOCK_SKEW_S`: the answer is
    stamped by serving's clock and the click by the client's), is not one."""
    shown = impressions[["request_id", "user_id", "timestamp", "items"]].drop_duplicates("request_id")
    shown = shown.explode("items").rename(columns={"items": "item_id"}).dropna(subset=["item_id", "timestamp"])
    key = ["user_id", "item_id"]
    # the as-of join needs keys of one type on both sides: an empty frame's columns are objects
    types = {"user_id": str, "item_id": str, "timestamp": np.float64}
    shown = shown.astype(types)
    positive = events[[*key, "timestamp"]].astype(types)
    first_after = pd.merge_asof(shown.sort_values("timestamp"),
                                positive.sort_values("timestamp").rename(columns={"timestamp": "timestamp_event"}),
                                left_on="timestamp", right_on="timestamp_event", by=key, direction="forward",
                                allow_exact_matches=False)
    in_window = first_after["timestamp_event"] <= first_after["timestamp"] + window_s  # NaN: no later event
    hit_ids = set(first_after.loc[in_window, "request_id"])
    clicked = shown.merge(events.dropna(subset=["request_id"])[["request_id", *key, "timestamp"]].astype(types),
                          on=["request_id", *key], suffixes=("", "_event"))
    after = clicked["timestamp_event"] - clicked["timestamp"]
    click_ids = set(clicked.loc[(after >= -CLICK_CLOCK_SKEW_S) & (after <= window_s), "request_id"])
    result = impressions.copy()
    result["hit"] = result["request_id"].isin(hit_ids)
    result["click"] = result["request_id"].isin(click_ids)
    return result


def bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, rng: np.random.Generator,
                    replicates: int = BOOTSTRAP) -> np.ndarray:
    """Replicates of sum(numerators) / sum(denominators) with the users (rows) redrawn."""
    n = len(numerators)
    out = np.empty(replicates)
    block = max(1, BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, replicates, block):
        stop = min(replicates, start + block)
        draws = rng.integers(0, n, (stop - start, n))
        out[start:stop] = numerators[draws].sum(axis=1) / np.maximum(denominators[draws].sum(axis=1), 1)
    return out


def interval95(values: np.ndarray) -> list[float] | None:
    """The 2.5% and 97.5% quantiles of the finite replicates; None when there are none."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None
    return [float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))]


def experiment_report(frame: pd.DataFrame, weights: dict[str, float] | None, rng: np.random.Generator,
                      catalogue_items: int | None = None, k: int = DEFAULT_K) -> dict[str, Any]:
    """One experiment's arms (rows of `outcomes` for it): estimates, intervals, lifts, SRM. `k` is
    the answer length the hit rate is named after (`hit@{k}`): the simulator asks for its --k, and
    a key fixed at hit@10 mislabelled every other k."""
    key = hit_key(k)
    arms: dict[str, Any] = {}
    replicates: dict[str, np.ndarray] = {}
    order = list(weights) if weights else sorted(frame["arm"].unique())
    order = [arm for arm in order if arm in set(frame["arm"])] + sorted(set(frame["arm"]) - set(order))
    for arm in order:
        rows = frame[frame["arm"] == arm]
        per_user = rows.groupby("user_id").agg(requests=("hit", "size"), hits=("hit", "sum"), clicks=("click", "sum"))
        requests, hits, clicks = (per_user[c].to_numpy(np.float64) for c in ("requests", "hits", "clicks"))
        replicates[arm] = bootstrap_ratio(hits, requests, rng)
        shown = {item for items in rows["items"] for item in items}
        arms[arm] = {
            "users": len(per_user), "requests": int(requests.sum()), "hits": int(hits.sum()),
            key: float(hits.sum() / requests.sum()), "ci95": interval95(replicates[arm]),
            "clicks": int(clicks.sum()), "ctr": float(clicks.sum() / requests.sum()),
            "ctr_ci95": interval95(bootstrap_ratio(clicks, requests, rng)),
            "coverage_items": len(shown),
            "coverage": len(shown) / catalogue_items if catalogue_items else None,
        }
    lift = {}
    for arm in order:  # every ordered pair: "b vs a" is b's rate over a's, minus one
        for base in order:
            if arm != base:
                with np.errstate(divide="ignore", invalid="ignore"):  # a replicate whose base is 0 has no ratio
                    relative = replicates[arm] / replicates[base] - 1
                base_rate = arms[base][key]
                lift[f"{arm} vs {base}"] = {"relative": arms[arm][key] / base_rate - 1 if base_rate else None,
                                             "ci95": interval95(relative),
                                             "replicates_without_base": int((replicates[base] == 0).sum())}
    several = users_in_several_arms(frame)
    return {"arms": arms, "lift": lift, "k": k, "users_in_several_arms": several,
            "srm": sample_ratio_check(arms, weights, several)}


def users_in_several_arms(frame: pd.DataFrame) -> int:
    """Users with answers from more than one arm of the experiment (rows of one experiment).
    Serving's assignment is sticky, so each is an assignment or logging fault, and their answers
    count in every arm they were seen in."""
    if not len(frame):
        return 0
    return int((frame.groupby("user_id")["arm"].nunique() > 1).sum())


def sample_ratio_check(arms: dict[str, Any], weights: dict[str, float] | None,
                       several_arms: int = 0) -> dict[str, Any] | None:
    """Chi-square of the arms' user counts against the configured weights; None without two or
    more configured arms, or when no user was seen at all. Every configured arm counts, with 0
    users where none was seen: an arm that gets nobody is the worst mismatch, and leaving it out
    reported p = 1 (or no check at all when one arm took every user). Arms the configuration does
    not have (`unconfigured_arms`, their users) and users seen in several arms break the split as
    surely, but the chi-square over the configured arms cannot see them: each raises the warning
    on its own. `p_value` is None when every user was in unconfigured arms."""
    if not weights or len(weights) < 2:
        return None
    names = list(weights)
    observed = np.array([arms[arm]["users"] if arm in arms else 0 for arm in names], np.float64)
    unconfigured = {arm: figures["users"] for arm, figures in arms.items() if arm not in weights}
    if not observed.sum() and not unconfigured:
        return None
    shares = np.array([weights[arm] for arm in names], np.float64)
    expected = observed.sum() * shares / shares.sum()
    p_value = float(stats.chisquare(observed, expected).pvalue) if observed.sum() else None
    mismatch = p_value is not None and p_value < SRM_ALPHA
    return {"p_value": p_value, "warning": mismatch or bool(unconfigured) or several_arms > 0,
            "observed_users": dict(zip(names, observed.astype(int).tolist())),
            "expected_users": dict(zip(names, expected.round(1).tolist())),
            "users_in_several_arms": several_arms, "unconfigured_arms": unconfigured}


def build_report(impression_records: Iterable[Record], event_records: Iterable[Record], window_s: float,
                 experiments: Experiments | None = None, only: str | None = None, seed: int = 0,
                 catalogue_items: int | None = None, k: int = DEFAULT_K) -> dict[str, Any]:
    """The whole report: every experiment seen in the impressions (or `only`), and at the top level
    the `arms` / `lift` of the selected one (the shape `streamrec simulate` prints). A window of
    0 s (or less) would make every hit 0 and still look like a result: it is refused."""
    if not math.isfinite(window_s) or window_s <= 0:
        raise ValueError(f"the window must be a finite number of seconds above 0, not {window_s}")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    impressions, malformed = impressions_frame(impression_records)
    events, invalid_events = events_frame(event_records)
    joined = outcomes(impressions, events, window_s) if len(impressions) else impressions
    configured = {e.name: {a.name: a.weight for a in e.arms} for e in experiments.spec.experiments} if experiments else {}
    names = sorted(joined["experiment"].unique()) if len(joined) else []
    if only is not None:
        if only not in names:
            raise ValueError(f"no impressions of experiment {only!r}; seen: {names}")
        names = [only]
    rng = np.random.default_rng(seed)
    reports = {name: experiment_report(joined[joined["experiment"] == name], configured.get(name), rng, catalogue_items,
                                       k)
               for name in names}
    selected = reports[names[0]] if names else {"arms": {}, "lift": {}, "k": k, "users_in_several_arms": 0,
                                                 "srm": None}
    return {**selected, "experiment": names[0] if names else None, "experiments": reports,
            "impressions": int(impressions["request_id"].nunique()) if len(impressions) else 0,
            "malformed_impressions": malformed, "invalid_events": invalid_events, "window_seconds": window_s, "bootstrap": BOOTSTRAP,
            "method": "per-user (cluster) bootstrap of the ratio of sums; lift paired by replicate; "
                      "sample-ratio chi-square against the configured weights"}
