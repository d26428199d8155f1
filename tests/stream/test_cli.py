"""The stream commands' JSON outputs, run through the real CLI against the real broker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.core.net import free_port
from tests.conftest import REPO, settings_env


def run(settings, *args: str, input: bytes | None = None) -> dict | list:
    result = CliRunner().invoke(cli, list(args), env=settings_env(settings), input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_config_json_reflects_env_and_flags(settings):
    data = run(settings, "config", "--json")
    assert data["kafka_bootstrap"] == settings.kafka_bootstrap and data["topic"] == settings.topic
    assert data["dlq_topic"] == settings.topic + ".dlq"
    flagged = run(settings, "--topic", "other", "config", "--json")
    assert flagged["topic"] == "other"


def test_secrets_never_appear_in_a_settings_repr(settings):
    """`param_server_token` lacked `repr=False` (api_token had it): any log or traceback that
    printed the settings would have shown the parameter server's shared secret."""
    shown = repr(settings.model_copy(update={"param_server_token": "ps-s3cret", "api_token": "api-s3cret"}))
    assert "ps-s3cret" not in shown and "api-s3cret" not in shown


def test_topics_create_list_describe(settings):
    created = run(settings, "topics", "create", "--partitions", "2", "--json")
    assert created == {settings.topic: "created", settings.dlq_topic: "created", settings.impressions_topic: "created"}
    assert run(settings, "topics", "create", "--json")[settings.topic] == "exists"
    assert settings.topic in run(settings, "topics", "list", "--json")
    described = run(settings, "topics", "describe", "--json")
    assert described["messages"] == 0 and len(described["partitions"]) == 2


def test_produce_counts_every_line(settings, tmp_path):
    run(settings, "topics", "create", "--json")
    good = {"user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": 1_700_000_000}
    lines = [orjson.dumps(good), b"garbage", orjson.dumps({**good, "event_type": "nope"}), orjson.dumps(good), b""]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    summary = run(settings, "produce", str(path), "--json")
    assert summary["accepted"] == 2 and summary["dead_lettered"] == 3 and summary["lines"] == 5
    from_stdin = run(settings, "produce", "-", "--json", input=b"\n".join(lines[:3]))
    assert (from_stdin["accepted"], from_stdin["dead_lettered"]) == (1, 2)
    described = run(settings, "topics", "describe", "--json")
    assert described["messages"] == 3


def test_replay_json_summary(settings, ml100k):
    summary = run(settings, "replay", "--data", str(ml100k), "--limit", "500", "--json")
    assert summary["produced"] == 500 and summary["dead_lettered"] == 0
    assert summary["first_timestamp"] == 874724710.0 and summary["events_per_second"] > 0


def test_a_negative_limit_is_refused(settings, ml100k):
    """`--limit -3` replayed all but the last 3 events."""
    result = CliRunner().invoke(cli, ["replay", "--data", str(ml100k), "--limit", "-3", "--json"],
                                env=settings_env(settings))
    assert result.exit_code == 2 and "--limit" in result.output and "-3 is not in the range x>=0" in result.output


def test_bad_format_is_a_clear_error(settings, tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    result = CliRunner().invoke(cli, ["replay", "--data", str(path), "--format", "csv"], env=settings_env(settings))
    assert result.exit_code != 0 and "use --map" in result.output


def test_replay_refuses_a_log_without_timestamps(settings, tmp_path):
    """Each row's position became its time (0, 1, 2: 1970), which no event may carry: every event
    was dead-lettered and the replay exited 0."""
    path = tmp_path / "plays.csv"
    path.write_text("user_id,item_id\n1,10\n2,10\n3,11\n")
    result = CliRunner().invoke(cli, ["replay", "--data", str(path), "--format", "csv", "--json"],
                                env=settings_env(settings))
    assert result.exit_code == 1, result.output
    assert f"cannot read {path} as csv: {path} has no timestamp column" in result.stderr
    assert "--map timestamp=COLUMN" in result.stderr and result.stdout == ""
    assert settings.topic not in run(settings, "topics", "list", "--json")  # refused before anything was sent


def test_replay_exits_1_when_every_event_is_dead_lettered(settings, tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,100\nu2,i2,101\n")  # 1970: older than any valid event
    result = CliRunner().invoke(cli, ["replay", "--data", str(path), "--format", "csv", "--json"],
                                env=settings_env(settings))
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)  # the summary is still printed, for scripts
    assert (summary["produced"], summary["dead_lettered"]) == (0, 2)
    assert f"every event (2) was dead-lettered to {settings.dlq_topic}" in result.stderr


@pytest.mark.parametrize("speed", ["nan", "inf", "-1"])
def test_a_speed_that_is_not_a_finite_non_negative_number_is_refused(settings, tmp_path, speed):
    """`--speed nan` passed the `speed < 0` check (every comparison with nan is false)."""
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,1700000000\n")
    result = CliRunner().invoke(cli, ["replay", "--data", str(path), "--format", "csv", "--speed", speed],
                                env=settings_env(settings))
    assert result.exit_code == 2 and "Invalid value for --speed: must be a finite number >= 0" in result.output


def test_an_unreachable_broker_is_a_one_line_error(tmp_path):
    """`replay`, `produce` and `export --from topic` ended in a KafkaTimeoutError traceback (after ~33 s)."""
    closed = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "STREAMREC_KAFKA_BOOTSTRAP": closed, "STREAMREC_HOME": str(tmp_path / "home")}
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\nu1,i1,1700000000\n")
    exe = str(Path(sys.executable).parent / "streamrec")
    commands = [[exe, "replay", "--data", str(log), "--format", "csv"],
                [exe, "export", "--to", "parquet", str(tmp_path / "topic.parquet")],
                [exe, "produce", str(tmp_path / "events.jsonl")]]
    (tmp_path / "events.jsonl").write_text('{"user_id": "u1", "item_id": "i1", "event_type": "click"}\n')
    running = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command in commands]  # side by side: each waits for the client's bootstrap timeout
    for process in running:
        _, err = process.communicate(timeout=180)
        assert process.returncode == 1, err
        assert err.startswith(f"Error: the Kafka broker at {closed} did not answer: ") and err.count("\n") == 1, err
    assert not (tmp_path / "topic.parquet").exists()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_bench_stream_json(settings, client):
    """The bench's guarantee is completeness, not speed: every synthetic event is produced, consumed
    and decoded exactly once (distinct event ids), none rejected, and the report carries all its fields."""
    data = run(settings, "bench", "stream", "--events", "3000", "--client", client, "--json")
    assert set(data) == {"client", "events", "produced", "consumed", "decoded", "distinct", "partitions", "rejected", "acks",
                         "produce_events_per_second", "consume_events_per_second", "produce_seconds", "consume_seconds",
                         "raw_produce_events_per_second", "raw_consume_events_per_second", "produce_vs_raw",
                         "consume_vs_raw"}
    assert data["raw_produce_events_per_second"] > 0 and data["raw_consume_events_per_second"] > 0
    assert data["client"] == client and data["partitions"] == 3
    assert data["events"] == data["produced"] == data["consumed"] == data["decoded"] == data["distinct"] == 3000
    assert data["rejected"] == 0


def test_infra_up_is_idempotent_and_down_stops_what_it_started(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env["STREAMREC_HOME"] = str(tmp_path / "home")
    exe = [str(Path(sys.executable).parent / "streamrec")]
    first = json.loads(subprocess.run([*exe, "infra", "up", "--json"], env=env, check=True, capture_output=True).stdout)
    try:
        assert first["kafka_reachable"] and first["redis_reachable"]
        second = json.loads(subprocess.run([*exe, "infra", "up", "--json"], env=env, check=True, capture_output=True).stdout)
        assert second["kafka_bootstrap"] == first["kafka_bootstrap"] and second["started"] == first["started"]
        status = json.loads(subprocess.run([*exe, "infra", "status", "--json"], env=env, check=True, capture_output=True).stdout)
        assert status["kafka_bootstrap"] == first["kafka_bootstrap"]
        if "broker" in first["started"]:
            assert "memory only" in status["broker"] and status["note"]
    finally:
        down = json.loads(subprocess.run([*exe, "infra", "down", "--json"], env=env, check=True, capture_output=True).stdout)
    assert all(down["stopped"].values())
    assert set(down["stopped"]) == set(first["started"])


def test_infra_up_that_fails_on_redis_stops_the_broker_it_started(tmp_path, monkeypatch):
    """Redis set explicitly but unreachable: `up` had started a broker first and left it running,
    recorded nowhere, so `infra down` could not stop it (nor the demo, which calls `up`)."""
    from streamrec.app import infra
    from streamrec.core import net
    from streamrec.core.config import Settings, read_infra_state

    for name in [k for k in os.environ if k.startswith("STREAMREC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STREAMREC_REDIS_URL", f"redis://127.0.0.1:{net.free_port()}/0")
    home = tmp_path / "home"
    with pytest.raises(infra.InfraError, match="not reachable"):
        infra.up(Settings(home=home))
    logs = list((home / "logs").glob("tansu-*.log"))
    assert len(logs) == 1  # a broker was started on the way
    port = int(logs[0].stem.split("-")[1])
    assert not net.port_open("127.0.0.1", port) and read_infra_state(home) == {}


def test_infra_up_refuses_a_single_redis_for_a_cluster(tmp_path, monkeypatch, kafka_bootstrap, redis_url,
                                                       redis_cluster):
    """STREAMREC_REDIS_CLUSTER with a URL of a plain Redis (or none, so that `up` fell back to the
    local one): every cluster client failed on it later with no word of why. Now `up` says so,
    and takes a node of a real cluster."""
    from streamrec.app import infra
    from streamrec.core.config import Settings

    for name in [k for k in os.environ if k.startswith("STREAMREC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("STREAMREC_REDIS_URL", redis_url)
    with pytest.raises(infra.InfraError, match="no cluster node"):
        infra.up(Settings(home=tmp_path / "home", redis_cluster=True))
    monkeypatch.setenv("STREAMREC_REDIS_URL", redis_cluster.url)
    assert infra.up(Settings(home=tmp_path / "home", redis_cluster=True))["redis_url"] == redis_cluster.url


def test_embedded_redis_starts_and_stops(tmp_path):
    from streamrec.app import infra
    from streamrec.core import net

    server = infra.start_redis(tmp_path)
    url = f"redis://{server.host}:{server.port}/0"
    assert net.redis_ping(url)
    assert infra.stop(server.to_json())
    assert not net.redis_ping(url)


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or the standalone `docker-compose`; either validates offline."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(compose_command() is None and os.environ.get("CI") != "true",
                    reason="no docker compose client installed (under CI=true this fails instead)")
def test_docker_compose_file_is_valid_and_exposes_nothing_unauthenticated(tmp_path):
    """With the secrets `streamrec infra secrets` writes: valid; the parameter server and Redis are not
    published on the host, everything that is binds 127.0.0.1; without them compose refuses."""
    import yaml

    from streamrec.app.infra_secrets import write_secrets

    command = compose_command()
    assert command is not None, "CI=true but no docker compose client: .ci/run should have installed one"
    base = [*command, "-f", str(REPO / "docker-compose.yml"), "--project-directory", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_PASSWORD", "STREAMREC_PARAM_SERVER_TOKEN",
                                                                "GRAFANA_ADMIN_PASSWORD", "STREAMREC_API_TOKEN")}
    missing = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert missing.returncode != 0 and "streamrec infra secrets" in missing.stderr + missing.stdout
    write_secrets(tmp_path / ".env")
    result = subprocess.run([*base, "--env-file", str(tmp_path / ".env"), "config"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert "ports" not in services["param-server"] and "ports" not in services["redis"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert set(published) == {"kafka", "serving", "prometheus", "grafana"}
    for ports in published.values():
        for port in ports:
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", port
    secrets = (tmp_path / ".env").read_text()
    assert "--requirepass" in " ".join(services["redis"]["command"])
    token = next(line.split("=", 1)[1] for line in secrets.splitlines() if line.startswith("STREAMREC_PARAM_SERVER_TOKEN="))
    assert services["param-server"]["environment"]["STREAMREC_PARAM_SERVER_TOKEN"] == token
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] not in ("", "admin")
