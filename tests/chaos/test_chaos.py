"""`streamrec chaos` on the first 20,000 MovieLens 100K events (slow: CI).

Every process of the pipeline is killed at seeded moments while the log is replayed; the run must
end with every event applied exactly once in every store, serving failures limited to requests a
killed worker was answering, and the live hr@10 close to a run without faults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamrec.core.config import Settings
from tests.conftest import settings_env

STREAMREC = str(Path(sys.executable).parent / "streamrec")
EVENTS, RATE = 20_000, 200  # about 100 s of replay per run, two runs (with faults, clean)
FAULTS = {"trainer_kill": 5, "param_server_kill": 3, "param_server_wipe": 1, "redis_restart": 2,
          "serving_worker_kill": 3}
# hr@10 on a 20k prefix is scored on ~2,000 events per run (every 10th), and a run with faults also
# scores again the events it re-learns after a rewind (e.g. everything after the empty restart, with
# a model learning from scratch): one standard error of the difference is already ~0.01, so the
# issue's 0.01 (for all 100,000 events) is asserted as 0.03 here.
HR_TOLERANCE = 0.03
NOTHING = {"lost_events": 0, "duplicated_events": 0, "items_short": 0, "items_over": 0}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def report(kafka_bootstrap: str, redis_url: str, ml100k: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One chaos run (with its clean run) shared by the tests below; nothing may be left running."""
    out = tmp_path_factory.mktemp("chaos")
    settings = Settings(kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, home=tmp_path_factory.mktemp("home"))
    result = subprocess.run(
        [STREAMREC, "chaos", "--data", str(ml100k), "--events", str(EVENTS), "--rate", str(RATE), "--seed", "0",
         "--out-dir", str(out), "--json"],
        env={**os.environ, **settings_env(settings)}, capture_output=True, text=True, timeout=1100,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps
    return json.loads(result.stdout)


def test_every_planned_fault_struck_and_was_recovered_from(report):
    assert {kind: figures["kills"] for kind, figures in report["faults"].items()} == FAULTS
    for kind, figures in report["faults"].items():
        assert None not in figures["recovery_seconds"], (kind, figures)
    assert report["drained"]


def test_no_event_lost_or_counted_twice(report):
    assert report["produced_events"] == EVENTS
    assert report["applied_events"] == EVENTS
    assert report["broker"] == NOTHING
    assert {k: report["param_server"][k] for k in NOTHING} == NOTHING
    assert all(shard == NOTHING for shard in report["param_server"]["shards"])
    assert report["feature_store"] == NOTHING
    for kind, figures in report["faults"].items():
        assert (figures["lost_events"], figures["duplicated_events"]) == (0, 0), (kind, figures)
    assert report["unattributed"] == []


def test_serving_fails_only_requests_in_flight_on_a_killed_worker(report):
    serving = report["serving"]
    assert serving["answered"] > 0.9 * serving["requests"]
    assert serving["failures"] == serving["failures_in_flight_on_killed_worker"], (
        f"failures not in flight on a killed worker: {serving['other_failures']}")  # the reasons first: a dict is cut
    recovery = report["faults"]["serving_worker_kill"]["recovery_seconds"]  # kill -> a request answered again
    assert all(seconds is not None and seconds <= 5 for seconds in recovery), recovery


def test_live_quality_matches_a_run_without_faults(report):
    prequential = report["prequential"]
    assert prequential["evaluated"] > 0 and prequential["clean_evaluated"] > 0
    assert abs(prequential["hr@10"] - prequential["clean_hr@10"]) <= HR_TOLERANCE, prequential
