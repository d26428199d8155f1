"""`streamrec demo` end to end on a small log: every process starts, the summary and plots come
out, the summary reads as a report, and nothing is left running."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import redis

from streamrec.app.demo import status_rows, summary_rows
from streamrec.stream.topics import list_topics
from tests.conftest import settings_env
from tests.trainer_online.conftest import planted_events

STREAMREC = str(Path(sys.executable).parent / "streamrec")


def test_demo_runs_the_pipeline_and_cleans_up(settings, tmp_path):
    log = tmp_path / "events.csv"
    events = planted_events(4000)
    log.write_text("user_id,item_id,timestamp,event_type\n" + "".join(
        f"{e['user_id']},{e['item_id']},{e['timestamp']},{e['event_type']}\n" for e in events))
    env = {**os.environ, **settings_env(settings)}
    result = subprocess.run(
        [STREAMREC, "demo", "--data", str(log), "--format", "csv", "--duration", "10", "--refit-every", "1500",
         "--poll-interval", "1", "--json"],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["events"] == 4000 and summary["dead_lettered"] == 0
    assert summary["trainer"]["consumed"] == 4000
    assert summary["prequential"]["hr@10"] > 0.2  # planted clusters are learnable
    assert summary["serving_errors"] == 0 and summary["serving"]["requests"] > 0
    assert set(summary["prequential"]["refit_models"]) == {"item-knn", "als"}  # refits were scored
    for plot in summary["plots"]:
        assert Path(plot).stat().st_size > 1000
    assert_reads_as_a_report(summary)
    logs = Path(summary["logs"])
    ps = subprocess.run(["ps", "-eo", "args"], check=True, capture_output=True, text=True).stdout
    assert str(logs) not in ps  # the demo's parameter server, trainer and workers are gone
    # nor its topics and feature-store keys (the broker and Redis here outlive the demo: a user's
    # Redis kept ~83,000 keys per run, some for 30 days)
    run = logs.name
    assert not [t for t in list_topics(settings.kafka_bootstrap) if run in t]
    assert not list(redis.Redis.from_url(settings.redis_url).scan_iter(f"demo{run}*", count=1000))


LONG_FLOAT = re.compile(r"\d\.\d{4,}")  # e.g. 309365.4666666667: a figure nobody rounded


def assert_reads_as_a_report(summary: dict) -> None:
    """The summary as the demo prints it: rounded figures with units, online beside refit, no JSON."""
    rows = dict(summary_rows(summary))
    for label, text in summary_rows(summary):
        assert not LONG_FLOAT.search(text) and "{" not in text, (label, text)
    assert rows["events"] == "4,000 replayed, 0 dead-lettered"
    assert re.fullmatch(r"online 0\.\d{3}  \|  (item-knn|als) \(refit\) 0\.\d{3}  \|  (item-knn|als) \(refit\) 0\.\d{3}",
                        rows["hr@10 (prequential)"]), rows["hr@10 (prequential)"]
    assert re.fullmatch(r"p50 [\d.]+ ms, p99 [\d.]+ ms over [\d,]+ requests", rows["serving latency"])
    assert re.search(r" at [\d,]+ events/s", rows["replay"]), rows["replay"]
    assert [text for label, text in summary_rows(summary) if label == "plot"] == summary["plots"]
    assert rows["logs"] == summary["logs"]


def test_live_display_formats_every_count_alike():
    status = {"replayed": 12345, "total": 100000, "events_per_second": 2469.1357, "trainer_consumed": 12000,
              "lag": 345, "hr@10": 0.123456, "ps_rows": {"bpr_items": 1682, "bpr_users": 943},
              "serving_p99_ms": 12.3456, "serving_requests": 1234, "serving_errors": 0,
              "last_serving_error": None, "staleness_s": 1.23456, "refits": 2}
    rows = dict(status_rows(status))
    assert rows["replayed"] == "12,345 / 100,000 events"
    assert rows["replay rate"] == "2,469 events/s"
    assert rows["trainer consumed"] == "12,000"
    assert rows["parameter-server rows"] == "bpr_items 1,682, bpr_users 943"
    assert rows["serving requests / errors"] == "1,234 / 0"
    assert rows["serving p99 (last 200)"] == "12.3 ms"
    assert rows["prequential hr@10 (last 1,000)"] == "0.123"
    starting = dict(status_rows({**status, "trainer_consumed": None, "lag": None, "hr@10": None, "ps_rows": None,
                                 "serving_p99_ms": None, "staleness_s": None}))
    assert starting["consumer lag"] == starting["prequential hr@10 (last 1,000)"] == "-"


def test_a_refit_that_arrives_after_the_replay_still_scores_the_events_after_its_data() -> None:
    """A cold refit can finish after the whole log was replayed (a loaded machine, no compiled
    cache): the spans replayed after it started wait on the scorer's thread, and the model scores
    exactly the events after the ones it was fitted on, none before."""
    import threading
    import time

    import numpy as np

    from streamrec.app.demo import StreamScorer
    from streamrec.stream.synthetic import synthetic_log
    from streamrec.trainer.interactions import Interactions
    from streamrec.trainer.models import create

    log = synthetic_log(events=600, users=40, items=30, seed=0)
    scorer = StreamScorer(log, every=1)
    scorer.submit(0, 200)
    scorer.refit_started(200)
    for start in range(200, 600, 100):
        scorer.submit(start, start + 100)
    trained_on = 250  # the refit read a little past where it started
    model = create("popularity").fit(Interactions.from_log(log.take(np.arange(trained_on)), implicit=True))

    def late_refit() -> None:
        time.sleep(1.0)
        scorer.publish_model("popularity", model, trained_on)
        scorer.refit_finished()

    threading.Thread(target=late_refit).start()
    scorer.finish()
    # the same as a model in place from event 250 on
    reference = StreamScorer(log, every=1)
    reference.publish_model("popularity", model, trained_on)
    reference.submit(0, trained_on)
    reference.submit(trained_on, 600)
    reference.finish()
    assert scorer.points["popularity"] == reference.points["popularity"]
    assert len(scorer.points["popularity"]) > 40
    assert min(t for t, _, _ in scorer.points["popularity"]) >= log.timestamp[trained_on]


def test_no_refit_starts_at_the_end_of_the_log() -> None:
    """A refit every quarter of the log started a fourth time at its last event, with no event
    left to score it on (four refits reported, three scored)."""
    from streamrec.app.demo import RefitLoop, StreamScorer
    from streamrec.core.config import Settings
    from streamrec.stream.synthetic import synthetic_log

    log = synthetic_log(events=600, users=40, items=30, seed=0)
    refits = RefitLoop(Settings(), StreamScorer(log, every=1), every=150, until=len(log))
    refits.maybe_start(len(log))
    assert not refits.busy.locked() and refits.next_at == 150
