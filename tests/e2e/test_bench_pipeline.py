"""`streamrec bench pipeline` through the real CLI: a pre-loaded run and a run with a concurrent
producer, each learning every event into a checkpointing parameter server, beside the raw client's
speed on the same bytes; the JSON carries the keys issue 16's checks read."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from streamrec.app.cli import cli
from tests.conftest import settings_env


@pytest.mark.slow  # two bench runs (17 and 24 s)
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
    cpu = data["cpu_microseconds_per_event"]  # where the CPU went over the trainer's active span
    assert cpu["trainers"] > 0 and cpu["redis"] > 0 and cpu["machine"] >= cpu["trainers"]
    assert cpu["param_server"] is not None and cpu["param_server"] >= 0


@pytest.mark.slow  # about a minute: two trainers wait out their idle exit
def test_bench_pipeline_with_two_trainers_and_two_shards(settings):
    """The scale-out shape of the operations guide: two trainers in one group share the topic's
    partitions (each applies a part, together every event once) and push to two shards."""
    args = ["bench", "pipeline", "--events", "3000", "--trainers", "2", "--shards", "2", "--json"]
    result = CliRunner().invoke(cli, args, env=settings_env(settings), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["trainers"], data["shards"]) == (2, 2) and data["partitions"] >= 2
    assert data["applied"] == 3000 and sum(data["applied_per_trainer"]) == 3000
    assert len(data["applied_per_trainer"]) == 2
    assert data["events_per_second"] > 0 and data["prequential_hr@10"] is not None
