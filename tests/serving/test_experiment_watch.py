"""`streamrec experiments watch`: the report's join, kept live as Prometheus series; whatever order
and chunks the two topics arrive in (within the lateness), the counters end equal to the report's."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from streamrec.core.net import port_open
from streamrec.serving.experiment_report import events_frame, impressions_frame
from streamrec.serving.experiment_watch import LiveOutcomes, WatchMetrics
from streamrec.stream.topics import partitions_of
from tests.conftest import settings_env
from tests.serving.conftest import free_port
from tests.serving.test_experiment_report import T0, WINDOW, encoded, produce_world, world
from tests.trainer_online.conftest import STREAMREC, wait_until


def value(metrics: WatchMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_live_counts_equal_the_truth_in_any_arrival_order(seed: int) -> None:
    impressions, events, truth = world(users_a=60, users_b=60, seed=seed)
    rng = np.random.default_rng(seed)
    # the two topics are read apart: impressions show up to 45 s after the events around them
    stream = [(imp["timestamp"] + rng.uniform(0, 45), "i", imp) for imp in impressions + impressions[:20]]
    stream += [(event["timestamp"], "e", event) for event in events]
    stream.sort(key=lambda entry: entry[0])
    metrics = WatchMetrics()
    live = LiveOutcomes(WINDOW, lateness_s=120.0, metrics=metrics)
    start = 0
    while start < len(stream):
        chunk = stream[start : start + int(rng.integers(1, 40))]
        start += len(chunk)
        imp, ev = encoded([entry[2] for entry in chunk if entry[1] == "i"], [entry[2] for entry in chunk if entry[1] == "e"])
        live.add(impressions_frame(imp)[0], events_frame(ev)[0])
    for arm in "ab":
        labels = {"experiment": "e", "arm": arm}
        assert value(metrics, "streamrec_serving_arm_impressions_total", **labels) == truth[arm]["requests"]
        assert value(metrics, "streamrec_serving_arm_hits_total", **labels) == truth[arm]["hits"]
        assert value(metrics, "streamrec_serving_arm_clicks_total", **labels) == truth[arm]["clicks"]
        assert value(metrics, "streamrec_serving_arm_shown_items", **labels) == 5 * truth[arm]["requests"]
    # state stays bounded: only the last round of answers (each user's third, 10,000 s after the
    # second) and the events the window and the lateness can still reach are held
    assert len(live.impressions) == 120 and len(live.events) < len(events) / 2


def test_records_later_than_the_lateness_are_counted_as_late() -> None:
    metrics = WatchMetrics()
    live = LiveOutcomes(60.0, lateness_s=10.0, metrics=metrics)
    imp, ev = encoded([], [{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": T0 + 1000.0}])
    live.add(impressions_frame(imp)[0], events_frame(ev)[0])
    old = {"request_id": "r", "user_id": "u", "items": ["i"], "timestamp": T0 + 100.0, "experiments": {"e": "a"}}
    imp, ev = encoded([old], [{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": T0 + 500.0}])
    live.add(impressions_frame(imp)[0], events_frame(ev)[0])
    assert value(metrics, "streamrec_serving_watch_late_records_total", kind="impressions") == 1
    assert value(metrics, "streamrec_serving_watch_late_records_total", kind="events") == 1
    assert value(metrics, "streamrec_serving_arm_impressions_total", experiment="e", arm="a") == 1


def test_an_event_dated_hours_ahead_does_not_make_the_rest_late() -> None:
    """The join's clock was the newest timestamp ever seen: one valid event of a client whose clock
    runs 6 h ahead made every record after it late, unscored, until wall time caught up."""
    metrics = WatchMetrics()
    live = LiveOutcomes(WINDOW, lateness_s=60.0, metrics=metrics)
    now = time.time()
    imp, ev = encoded([], [{"user_id": "skewed", "item_id": "x", "event_type": "click", "timestamp": now + 6 * 3600}])
    live.add(impressions_frame(imp)[0], events_frame(ev)[0])
    for n in range(5):
        shown = {"request_id": f"r{n}", "user_id": f"u{n}", "items": ["i1", "i2"], "timestamp": now + n,
                 "experiments": {"e": "a"}}
        clicked = {"user_id": f"u{n}", "item_id": "i2", "event_type": "click", "timestamp": now + n + 5,
                   "context": {"request_id": f"r{n}"}}
        live.add(impressions_frame(encoded([shown], [])[0])[0], events_frame(encoded([], [clicked])[1])[0])
    assert value(metrics, "streamrec_serving_arm_hits_total", experiment="e", arm="a") == 5
    assert value(metrics, "streamrec_serving_arm_clicks_total", experiment="e", arm="a") == 5
    assert value(metrics, "streamrec_serving_watch_late_records_total", kind="impressions") == 0


def test_the_command_serves_the_reports_counts(settings) -> None:
    impressions, events, truth = world(users_a=30, users_b=30)
    produce_world(settings, impressions, events, 2)
    port = free_port()
    proc = subprocess.Popen([STREAMREC, "experiments", "watch", "--from-beginning", "--window", "10m",
                             "--lateness", "30000s", "--metrics-port", str(port)],
                            env={**os.environ, **settings_env(settings)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def scraped() -> dict[str, float]:
            import httpx

            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                return {}
            return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                    if line.startswith("streamrec_serving_arm_") and not line.startswith("#")}

        expected = {f'streamrec_serving_arm_{name}_total{{arm="{arm}",experiment="e"}}': float(truth[arm][key])
                    for arm in "ab" for name, key in (("impressions", "requests"), ("hits", "hits"), ("clicks", "clicks"))}
        try:
            wait_until(lambda: all(scraped().get(k) == v for k, v in expected.items()), timeout=60)
        except TimeoutError:
            pass  # the comparison below says what differs
        got = scraped()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert {k: got.get(k) for k in expected} == expected, err[-2000:]
    assert proc.returncode == 0, err[-2000:]


def test_a_watch_started_before_its_topics_creates_them_and_runs(settings) -> None:
    """Started before serving's first answer (no impressions topic yet), the watch raised KeyError
    and exited; it creates both topics with the settings' partitions, as the trainer does."""
    port = free_port()
    proc = subprocess.Popen([STREAMREC, "experiments", "watch", "--metrics-port", str(port)],
                            env={**os.environ, **settings_env(settings)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    def partitions(topic: str) -> list[int]:
        try:
            return partitions_of(settings.kafka_bootstrap, topic)
        except KeyError:
            return []

    try:  # the metrics port opens before the topics are read: wait for the topics themselves
        wait_until(lambda: proc.poll() is not None or (port_open("127.0.0.1", port) and
                                                       all(partitions(t) for t in (settings.impressions_topic,
                                                                                   settings.topic))), timeout=60)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert partitions(settings.impressions_topic) == [0, 1, 2] and partitions(settings.topic) == [0, 1, 2]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
