"""`streamrec demo` end to end on a small log: every process starts, the summary and plots come
out, and nothing is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        env=env, capture_output=True, text=True, timeout=300,
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
    logs = Path(summary["logs"])
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(logs) not in ps  # the demo's parameter server, trainer and workers are gone
