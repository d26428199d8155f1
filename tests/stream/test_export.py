"""`streamrec export --to parquet`: the log, from a file or the topic, as Parquet that reads back
column for column (the interchange Spark refits read)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq

from streamrec.stream.loaders import load_log
from streamrec.stream.topics import create_topics
from tests.conftest import settings_env
from tests.trainer_online.conftest import STREAMREC, planted_events, produce_events


def test_a_file_exports_and_reads_back_unchanged(tmp_path) -> None:
    rows = [
        {"user_id": "u:1", "item_id": "caf\u00e9 \u2615", "timestamp": 3.5, "rating": 4.0, "event_type": "rating"},
        {"user_id": "u:2", "item_id": "x" * 10_000, "timestamp": 1.0, "event_type": "click"},
        {"user_id": "007", "item_id": "{i}", "timestamp": 2.0, "event_type": "purchase"},
        {"user_id": "u:1\u0000", "item_id": "{i}", "timestamp": 4.0, "event_type": "click"},  # not "u:1"
    ]
    source = tmp_path / "log.jsonl"
    source.write_text("\n".join(json.dumps(row) for row in rows))
    target = tmp_path / "out" / "log.parquet"
    done = subprocess.run([STREAMREC, "export", "--to", "parquet", str(target), "--from", str(source), "--format", "jsonl"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "STREAMREC_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) | {"bytes": 0} == {"path": str(target), "rows": 4, "users": 4, "items": 3, "bytes": 0,
                                                       "source": str(source)}
    assert pq.read_schema(target).names == ["user_id", "item_id", "timestamp", "rating", "event_type"]
    assert not list(target.parent.glob(".*.tmp"))
    original, back = load_log(source, "jsonl"), load_log(target, "parquet")
    for column in ("user_id", "item_id", "event_type"):
        assert getattr(back, column).tolist() == getattr(original, column).tolist()
    assert back.timestamp.tolist() == [1.0, 2.0, 3.5, 4.0]
    np.testing.assert_array_equal(back.rating, original.rating)  # NaN where an event has no rating


def test_the_topic_exports_every_valid_event(settings, tmp_path) -> None:
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 3)
    events = planted_events(500)
    produce_events(settings, events)
    target = tmp_path / "topic.parquet"
    done = subprocess.run([STREAMREC, "export", "--to", "parquet", str(target)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **settings_env(settings)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 500
    log = load_log(target, "parquet")
    assert sorted(zip(log.user_id, log.item_id, log.timestamp)) == sorted(
        (e["user_id"], e["item_id"], e["timestamp"]) for e in events)
    assert set(log.event_type) == {"click"}


def test_export_explains_a_missing_source(tmp_path) -> None:
    done = subprocess.run([STREAMREC, "export", "--to", "parquet", str(tmp_path / "x.parquet"), "--from",
                           str(tmp_path / "missing.csv"), "--format", "csv"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "STREAMREC_HOME": str(tmp_path / "home")})
    assert done.returncode != 0 and "missing.csv" in done.stderr and not (tmp_path / "x.parquet").exists()
