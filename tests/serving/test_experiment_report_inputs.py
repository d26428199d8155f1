"""`streamrec experiments report` on input it must not trust and settings it must refuse: impressions
of the wrong shape are counted as malformed (never crash the report or turn into made-up items,
times or arms), users in several arms and arms the configuration lacks raise the sample-ratio
warning, the hit rate is named after the k asked for, a window of 0 and a missing impressions
topic are one-line errors. The command cases run against the real broker."""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
import pytest
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.serving.experiment_report import build_report, experiment_report
from streamrec.serving.experiments import Experiments
from streamrec.stream.impressions import encode_records
from streamrec.stream.kafka import Record, make_producer
from streamrec.stream.topics import create_topics
from tests.conftest import settings_env

T0 = 1.7e9
WINDOW = 600.0
SPEC = Experiments.parse("experiments: [{name: e, arms: [{name: a}, {name: b}]}]")


def record(value: bytes | None) -> Record:
    return Record("t", 0, 0, 0, None, value, ())


def impression(request_id: str, user: str, arm: str, items: object = ("x",), **fields: object) -> dict:
    return {"request_id": request_id, "user_id": user, "items": list(items) if isinstance(items, tuple) else items,
            "timestamp": T0, "experiments": {"e": arm}, **fields}


def click_on(user: str, item: str, at: float = T0 + 5) -> Record:
    return record(orjson.dumps({"user_id": user, "item_id": item, "event_type": "click", "timestamp": at}))


def report_of(impressions: list[dict], events: list[Record], experiments: Experiments | None = SPEC,
              **options: object) -> dict:
    return build_report([record(v) for v in encode_records(impressions)], events, WINDOW, experiments, **options)


GOOD = [impression("r1", "u1", "a"), impression("r2", "u2", "b")]

MALFORMED = {
    "nested items": impression("m", "u9", "a", items=[["x"]]),  # crashed: unhashable list
    "items a string": impression("m", "u9", "a", items="xyz"),  # read as items x, y, z
    "items a mapping": impression("m", "u9", "a", items={"x": 1}),  # read as item x
    "items not strings": impression("m", "u9", "a", items=[1, 2]),
    "time a string": {**impression("m", "u9", "a"), "timestamp": "nan"},  # float("nan") was accepted
    "time a numeric string": {**impression("m", "u9", "a"), "timestamp": str(T0)},
    "time a bool": {**impression("m", "u9", "a"), "timestamp": True},
    "no time": {key: value for key, value in impression("m", "u9", "a").items() if key != "timestamp"},
    "experiments a list": {**impression("m", "u9", "a"), "experiments": ["ab"]},  # read as experiment a, arm b
    "experiments a string": {**impression("m", "u9", "a"), "experiments": "e"},
    "arm not a string": {**impression("m", "u9", "a"), "experiments": {"e": {"x": 1}}},
    "request id not a string": {**impression("m", "u9", "a"), "request_id": 7},
    "user id not a string": {**impression("m", "u9", "a"), "user_id": 9},
    "not an object": [1, 2],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_impression_is_counted_and_used_nowhere(case: str) -> None:
    clean = report_of(GOOD, [click_on("u1", "x"), click_on("u9", "x"), click_on("u9", "y")])
    report = report_of([*GOOD, MALFORMED[case]], [click_on("u1", "x"), click_on("u9", "x"), click_on("u9", "y")])
    assert report["malformed_impressions"] == 1
    assert report["impressions"] == 2 and report["arms"] == clean["arms"]
    assert set(report["arms"]) == {"a", "b"}  # no arm made of a malformed experiments field


def test_a_bad_line_costs_that_line_not_the_records_other_impressions() -> None:
    """A record holds many impressions as JSON lines: one line that is not JSON lost them all."""
    value = b"\n".join([orjson.dumps(GOOD[0]), b"{not json", orjson.dumps(GOOD[1])])
    report = build_report([record(value), record(None)], [click_on("u1", "x")], WINDOW, SPEC)
    assert report["malformed_impressions"] == 2  # the bad line and the tombstone
    assert report["impressions"] == 2 and report["arms"]["a"]["hits"] == 1


def test_an_impression_without_experiments_is_not_malformed() -> None:
    plain = {key: value for key, value in impression("p", "u3", "a").items() if key != "experiments"}
    report = report_of([*GOOD, plain, {**impression("q", "u4", "a"), "experiments": None}], [])
    assert report["malformed_impressions"] == 0 and report["arms"]["a"]["requests"] == 1


def test_users_in_several_arms_and_unconfigured_arms_raise_the_sample_ratio_warning() -> None:
    """A balanced split whose check passed although one user was answered from both arms and
    another from an arm the configuration does not have."""
    balanced = [impression(f"r{n}", f"u{n}", "ab"[n % 2]) for n in range(200)]
    assert report_of(balanced, [])["srm"]["warning"] is False
    report = report_of([*balanced, impression("twice", "u0", "b"), impression("stale", "z", "c")], [])
    srm = report["srm"]
    assert srm["users_in_several_arms"] == 1 and report["users_in_several_arms"] == 1
    assert srm["unconfigured_arms"] == {"c": 1}
    assert srm["p_value"] > 0.5 and srm["warning"] is True
    only_one_fault = report_of([*balanced, impression("twice", "u0", "b")], [])["srm"]
    assert only_one_fault["unconfigured_arms"] == {} and only_one_fault["warning"] is True


def test_every_user_in_an_unconfigured_arm_is_still_a_warning() -> None:
    srm = report_of([impression(f"r{n}", f"u{n}", "old") for n in range(10)], [])["srm"]
    assert srm is not None and srm["warning"] is True and srm["p_value"] is None
    assert srm["unconfigured_arms"] == {"old": 10} and srm["observed_users"] == {"a": 0, "b": 0}


def test_the_hit_rate_is_named_after_k() -> None:
    """The key was hit@10 whatever k the answers had (simulate --k 3 printed hit@10)."""
    rows = [("a", f"u{n}", n % 2 == 0, ["x", "y", "z"]) for n in range(20)] + \
           [("b", f"v{n}", n % 4 == 0, ["x", "y", "z"]) for n in range(20)]
    frame = pd.DataFrame(rows, columns=["arm", "user_id", "hit", "items"]).assign(click=False)
    three = experiment_report(frame, {"a": 1.0, "b": 1.0}, np.random.default_rng(0), k=3)
    assert three["k"] == 3
    for arm, rate in (("a", 0.5), ("b", 0.25)):
        assert three["arms"][arm]["hit@3"] == rate and "hit@10" not in three["arms"][arm]
    assert three["lift"]["a vs b"]["relative"] == pytest.approx(1.0)
    default = experiment_report(frame, {"a": 1.0, "b": 1.0}, np.random.default_rng(0))
    assert default["k"] == 10 and default["arms"]["a"]["hit@10"] == 0.5
    assert report_of(GOOD, [click_on("u1", "x")], k=5)["arms"]["a"]["hit@5"] == 1.0
    assert report_of([], [], k=5)["k"] == 5


@pytest.mark.parametrize("window", [0.0, -1.0, float("nan")])
def test_a_window_of_no_time_is_refused(window: float) -> None:
    with pytest.raises(ValueError, match="window"):
        build_report([], [], window, SPEC)


def test_the_command_refuses_a_zero_window(settings) -> None:
    result = CliRunner().invoke(cli, ["experiments", "report", "--window", "0", "--json"], env=settings_env(settings))
    assert result.exit_code == 2, result.output
    assert "--window" in result.output and "more than 0" in result.output


def test_a_missing_impressions_topic_is_one_line_saying_what_writes_it(settings) -> None:
    create_topics(settings.kafka_bootstrap, [settings.topic], 1)  # events exist, impressions were never logged
    result = CliRunner().invoke(cli, ["experiments", "report", "--json"], env=settings_env(settings))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert settings.impressions_topic in line and "does not exist" in line and "impressions on" in line


def test_the_command_names_the_hit_rate_after_its_k(settings) -> None:
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.impressions_topic], 1)
    with make_producer(settings.kafka_bootstrap) as producer:
        for value in encode_records(GOOD):
            producer.send(settings.impressions_topic, value)
        producer.send(settings.topic, click_on("u1", "x").value, b"u1")
        producer.flush()
    result = CliRunner().invoke(cli, ["experiments", "report", "--k", "5", "--json"], env=settings_env(settings))
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout)
    assert report["k"] == 5 and report["arms"]["a"]["hit@5"] == 1.0 and "hit@10" not in report["arms"]["a"]
