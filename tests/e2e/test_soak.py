"""`streamrec bench soak` on a tiny run through the real pipeline (broker, trainer, parameter
server with checkpoints, two serving workers): every event is learned, the report carries the keys
issue 16's checks read plus a series per process, and the parameter server's tables stay within
their row bound although the id space outgrows it."""

from __future__ import annotations

import json

from click.testing import CliRunner

from streamrec.app.cli import cli
from tests.conftest import settings_env


def test_soak_reports_memory_and_keeps_the_row_bound(settings):
    args = ["bench", "soak", "--events", "20000", "--users", "10000", "--items", "1000", "--max-rows", "4000",
            "--query-rate", "5", "--json"]
    result = CliRunner().invoke(cli, args, env=settings_env(settings), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("trainer_rss_growth", "serving_rss_growth", "param_server_rows", "param_server_row_bound"):
        assert key in data
    series = data["series"]
    assert series["consumed"][-1] == 20000
    assert len(series["trainer_rss_bytes"]) == len(series["serving_rss_bytes"]) == len(series["consumed"])
    assert min(series["trainer_rss_bytes"]) > 0 and min(series["serving_rss_bytes"]) > 0
    assert data["param_server_within_bound"] and data["param_server_rows"] <= data["param_server_row_bound"]
    users = data["tables"]["bpr_users"]
    assert users["max_rows"] == 4000 and users["rows"] <= 4000 and users["evicted_for_room"] > 0
