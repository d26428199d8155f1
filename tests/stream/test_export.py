"""`streamrec export --to parquet`: the log, from a file or the topic, as Parquet that reads back
column for column (the interchange Spark refits read)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading

import numpy as np
import pyarrow.parquet as pq

from streamrec.stream.export import export_parquet
from streamrec.stream.loaders import InteractionLog, load_log
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


def _log(rows: int) -> InteractionLog:
    ids = np.array([f"u{i % 5000}" for i in range(rows)], dtype=object)
    return InteractionLog(ids, ids.copy(), np.full(rows, 4.0), np.arange(rows, dtype=np.float64) + 1e9)


def test_concurrent_exports_to_one_path_each_install_a_whole_file(tmp_path) -> None:
    """Both wrote into one fixed `.NAME.tmp`: the file at PATH was torn (ZSTD "Data corruption
    detected" when read) or one export crashed in os.replace, while the other reported success."""
    logs, target = [_log(200_000), _log(150_000)], tmp_path / "out" / "log.parquet"
    for _ in range(5):
        barrier, errors = threading.Barrier(2), []

        def export(log: InteractionLog) -> None:
            barrier.wait()
            try:
                export_parquet(log, target)
            except Exception as exc:  # reported by the assertion below
                errors.append(repr(exc))

        threads = [threading.Thread(target=export, args=(log,)) for log in logs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert pq.read_table(target).num_rows in (200_000, 150_000)
        assert os.listdir(target.parent) == ["log.parquet"]  # no temporary file left
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # as a plain new file, not mkstemp's 0o600


def test_event_types_export_as_the_text_they_are(tmp_path) -> None:
    """`event_types().astype(str)` went through numpy's fixed-width strings: a trailing NUL was cut,
    making "click\\0" one event type with "click" (and every value was padded to the longest)."""
    source = tmp_path / "log.jsonl"
    source.write_text("\n".join(json.dumps({"user_id": "u", "item_id": "i", "timestamp": 1e9 + n, "event_type": kind})
                                for n, kind in enumerate(["click", "click\u0000", "view" + "w" * 1000])))
    target = tmp_path / "log.parquet"
    export_parquet(load_log(source, "jsonl"), target)
    assert pq.read_table(target).column("event_type").to_pylist() == ["click", "click\u0000", "view" + "w" * 1000]


def test_a_path_export_cannot_write_is_a_one_line_error(tmp_path) -> None:
    """A parent that is a file, or a folder nobody may write (/proc), ended in a traceback; a path
    ending in a slash wrote a file named like the folder it named."""
    source = tmp_path / "log.csv"
    source.write_text("user_id,item_id,timestamp\nu,i,1000000000\n")
    (tmp_path / "afile").write_text("")
    env = {**os.environ, "STREAMREC_HOME": str(tmp_path / "home")}
    for target, code, message in [(tmp_path / "afile" / "x.parquet", 1, f"Error: cannot write {tmp_path}/afile/x.parquet: "),
                                  ("/proc/x.parquet", 1, "Error: cannot write /proc/x.parquet: "),
                                  (f"{tmp_path}/newdir/", 2, "names a folder; PATH is the file to write")]:
        done = subprocess.run([STREAMREC, "export", "--to", "parquet", str(target), "--from", str(source), "--format", "csv"],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == code and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "newdir").exists()
