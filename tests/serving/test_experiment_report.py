"""`streamrec experiments report`: exact joins of impressions with later events and attributed
clicks, intervals from a bootstrap over users that cover the truth and separate different arms,
the sample-ratio check, at-least-once duplicates and malformed records; and the command end to end
against a real broker."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import orjson
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.serving.experiment_report import build_report
from streamrec.serving.experiments import Experiments
from streamrec.stream.impressions import encode_records
from streamrec.stream.kafka import Record, make_producer
from streamrec.stream.topics import create_topics
from tests.conftest import settings_env

WINDOW = 600.0
T0 = 1.7e9
SPEC = Experiments.parse("experiments: [{name: e, arms: [{name: a}, {name: b}]}]")


def record(value: bytes) -> Record:
    return Record("t", 0, 0, 0, None, value, ())


def world(users_a: int = 200, users_b: int = 200, seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    """Three answers per user, five items each. A user of arm a hits with probability 0.2 and of b
    with 0.5 (a later event on a shown item within the window); every third hit is a click with
    the answer's request id. Also events that must not count: before the answer, after the window,
    on an item not shown. Returns (impressions, events, the true counts)."""
    rng = np.random.default_rng(seed)
    impressions, events = [], []
    truth = {"a": {"requests": 0, "hits": 0, "clicks": 0}, "b": {"requests": 0, "hits": 0, "clicks": 0}}
    for u in range(users_a + users_b):
        arm, p = ("a", 0.2) if u < users_a else ("b", 0.5)
        for n in range(3):
            t = T0 + 10_000.0 * (n + 1)
            request_id = f"r{u}-{n}"
            items = [f"i{u}-{n}-{j}" for j in range(5)]
            impressions.append({"request_id": request_id, "user_id": f"u{u}", "items": items, "timestamp": t,
                                "experiment": "e", "arm": arm, "experiments": {"e": arm}})
            truth[arm]["requests"] += 1
            events.append({"user_id": f"u{u}", "item_id": items[0], "event_type": "click", "timestamp": t - 5})
            events.append({"user_id": f"u{u}", "item_id": items[1], "event_type": "click", "timestamp": t + WINDOW + 5})
            events.append({"user_id": f"u{u}", "item_id": "elsewhere", "event_type": "click", "timestamp": t + 5})
            if rng.random() < p:
                truth[arm]["hits"] += 1
                clicked = rng.random() < 1 / 3
                truth[arm]["clicks"] += clicked
                events.append({"user_id": f"u{u}", "item_id": items[2], "event_type": "click", "timestamp": t + 60,
                               **({"context": {"request_id": request_id}} if clicked else {})})
    return impressions, events, truth


def encoded(impressions: list[dict], events: list[dict]) -> tuple[list[Record], list[Record]]:
    return ([record(v) for v in encode_records(impressions)], [record(orjson.dumps(e)) for e in events])


def test_counts_are_exact_and_intervals_cover_the_truth_and_separate_the_arms() -> None:
    impressions, events, truth = world()
    imp, ev = encoded(impressions + impressions[:50], events)  # 50 delivered twice (at least once)
    imp.append(record(b"not json"))
    ev.append(record(b'{"user_id": "u1"}'))  # refused by the schema: counted, no arm's outcome
    report = build_report(imp, ev, WINDOW, SPEC)
    assert report["impressions"] == 1200 and report["malformed_impressions"] == 1 and report["invalid_events"] == 1
    for arm, rate in (("a", 0.2), ("b", 0.5)):
        got = report["arms"][arm]
        assert (got["requests"], got["hits"], got["clicks"]) == tuple(truth[arm][k] for k in ("requests", "hits", "clicks"))
        assert got["users"] == 200 and got["hit@10"] == truth[arm]["hits"] / 600
        low, high = got["ci95"]
        assert low < got["hit@10"] < high and low < rate < high and high - low < 0.15
    lift = report["lift"]["b vs a"]
    assert lift["ci95"][0] > 0 and lift["ci95"][0] < lift["relative"] < lift["ci95"][1]
    assert report["lift"]["a vs b"]["ci95"][1] < 0
    assert report["srm"]["warning"] is False and report["experiment"] == "e"


def test_intervals_widen_when_a_users_answers_are_alike() -> None:
    """A cluster bootstrap: when each user either always or never hits, the interval is wider than
    the binomial one that counts answers as independent."""
    impressions, events, _ = world()
    by_user: dict[str, bool] = {}
    kept = []
    for e in events:
        user = e["user_id"]
        if (e["timestamp"] - T0) % 10_000 == 60:  # a hit: keep all of a user's hits or none
            by_user.setdefault(user, int(user[1:]) % 2 == 0)
            if not by_user[user]:
                continue
        kept.append(e)
    report = build_report(*encoded(impressions, kept), WINDOW, SPEC)
    got = report["arms"]["b"]
    rate, n = got["hit@10"], got["requests"]
    binomial = 2 * 1.96 * np.sqrt(rate * (1 - rate) / n)
    assert got["ci95"][1] - got["ci95"][0] > 1.2 * binomial


def test_a_lopsided_split_raises_the_sample_ratio_warning() -> None:
    impressions, events, _ = world(users_a=300, users_b=100)
    report = build_report(*encoded(impressions, events), WINDOW, SPEC)
    assert report["srm"]["warning"] is True and report["srm"]["observed_users"] == {"a": 300, "b": 100}
    assert build_report(*encoded(impressions, events), WINDOW, None)["srm"] is None  # no weights, no check


def test_an_arm_that_got_no_users_is_a_sample_ratio_mismatch() -> None:
    """The check compared only the arms seen: a=500, b=500 with a configured c at 0 gave p = 1, and
    every user in one of two arms gave no check at all."""
    three = Experiments.parse("experiments: [{name: e, arms: [{name: a}, {name: b}, {name: c}]}]")
    impressions, events, _ = world(users_a=150, users_b=150)
    srm = build_report(*encoded(impressions, events), WINDOW, three)["srm"]
    assert srm["warning"] is True and srm["observed_users"] == {"a": 150, "b": 150, "c": 0}
    srm = build_report(*encoded(world(users_a=300, users_b=0)[0], []), WINDOW, SPEC)["srm"]
    assert srm is not None and srm["warning"] is True and srm["observed_users"] == {"a": 300, "b": 0}


def test_a_click_counts_only_from_the_shown_user_within_the_window() -> None:
    """Clicks were joined on (request_id, item) alone: another user's click carrying the answer's
    request id counted, and so did one dated days before the answer. A click stamped a few seconds
    before its answer is clock skew (serving stamps the answer, the client the click): it counts."""
    shown = [{"request_id": f"r-{user}", "user_id": user, "items": ["i1", "i2"], "timestamp": T0,
              "experiments": {"e": arm}} for user, arm in (("alice", "a"), ("bob", "b"), ("carol", "b"))]

    def click(user: str, request_id: str, at: float) -> dict:
        return {"user_id": user, "item_id": "i1", "event_type": "click", "timestamp": at,
                "context": {"request_id": request_id}}

    events = [click("mallory", "r-alice", T0 + 5), click("bob", "r-bob", T0 - 10 * 86400),
              click("bob", "r-bob", T0 + WINDOW + 5), click("carol", "r-carol", T0 + 5)]
    report = build_report(*encoded(shown, events), WINDOW, SPEC)
    assert {arm: report["arms"][arm]["clicks"] for arm in "ab"} == {"a": 0, "b": 1}  # carol's click only
    skewed = build_report(*encoded(shown, [click("alice", "r-alice", T0 - 5)]), WINDOW, SPEC)
    assert skewed["arms"]["a"]["clicks"] == 1


def test_the_hit_join_takes_memory_linear_in_one_users_activity() -> None:
    """One user with n answers all showing x and n events on x: the join built the n * n pairs of
    the user's answers and events on x before filtering by the window (4.3 GB at n = 8,000)."""
    n = 3000
    shown = [{"request_id": f"r{i}", "user_id": "bot", "items": ["x", f"y{i % 7}"], "timestamp": T0 + i,
              "experiments": {"e": "a"}} for i in range(n)]
    shown.append({"request_id": "s", "user_id": "other", "items": ["x"], "timestamp": T0, "experiments": {"e": "b"}})
    events = [{"user_id": "bot", "item_id": "x", "event_type": "view", "timestamp": T0 + i + 0.5} for i in range(n - 1)]
    records = encoded(shown, events)
    tracemalloc.start()
    try:
        report = build_report(*records, WINDOW, SPEC)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report["arms"]["a"]["hits"] == n - 1 and report["arms"]["b"]["hits"] == 0  # the last answer has no event
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB"


def produce_world(settings, impressions: list[dict], events: list[dict], partitions: int) -> None:
    """The impressions and events on the settings' topics, created with `partitions` each."""
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.impressions_topic], partitions)
    with make_producer(settings.kafka_bootstrap) as producer:
        for value in encode_records(impressions):
            producer.send(settings.impressions_topic, value)
        for event in events:
            producer.send(settings.topic, orjson.dumps(event), event["user_id"].encode())
        producer.flush()


def test_the_command_reads_both_topics(settings) -> None:
    impressions, events, truth = world(users_a=40, users_b=40)
    produce_world(settings, impressions, events, 1)
    spec = settings.home / "experiments.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text("experiments: [{name: e, arms: [{name: a}, {name: b}]}]\n")
    result = CliRunner().invoke(cli, ["experiments", "report", "--experiments", str(spec), "--window", "10m", "--json"],
                                env=settings_env(settings), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {arm: report["arms"][arm]["hits"] for arm in "ab"} == {arm: truth[arm]["hits"] for arm in "ab"}
    assert set(report["lift"]) == {"b vs a", "a vs b"} and report["srm"]["warning"] is False
