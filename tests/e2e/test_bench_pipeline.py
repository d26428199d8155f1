"""`streamrec bench pipeline` through the real CLI: a pre-loaded run and a run with a concurrent
producer, each learning every event into a checkpointing parameter server, beside the raw client's
speed on the same bytes; the JSON carries the keys issue 16's checks read."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from streamrec.app.cli import cli
from tests.conftest import settings_env


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_bench_pipeline_json(settings, client):
    args = ["bench", "pipeline", "--events", "3000", "--client", client, "--json"]
    result = CliRunner().invoke(cli, args, env=settings_env(settings), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["client"] == client and data["events"] == data["applied"] == 3000
    assert data["checkpoint_every_seconds"] == 10.0
    for key in ("events_per_second", "events_per_second_concurrent_producer", "raw_consume_events_per_second",
                "raw_produce_events_per_second", "events_per_second_vs_raw_consume", "prequential_hr@10",
                "p50_batch_seconds", "p99_batch_seconds", "lag_after_seconds", "produce_events_per_second"):
        assert key in data, key
    assert data["events_per_second"] > 0 and data["events_per_second_concurrent_producer"] > 0
    assert 0 < data["events_per_second_vs_raw_consume"]
