"""Real infrastructure for tests: a Kafka-compatible broker and Redis, never mocks.

Each is chosen in this order: explicit env settings (STREAMREC_KAFKA_BOOTSTRAP,
STREAMREC_REDIS_URL), else containers through testcontainers when a Docker engine answers, else the
local default (the embedded Tansu broker; the Redis at the default URL, or an embedded one).

MovieLens 100K comes from the data-set cache: the `ml100k` fixture imports a local copy (folder
or zip) named by $STREAMREC_TEST_ML100K with `streamrec datasets import` into a session
STREAMREC_HOME and hands out the cached folder. Without the data a test skips, or fails when $CI
is set (CI must not pass by skipping).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from click.testing import CliRunner

from streamrec.app import infra
from streamrec.core import net
from streamrec.core.config import Settings
from tests import children
from tests.redis_cluster import RedisCluster

REPO = Path(__file__).resolve().parents[1]
ML100K_ENV = "STREAMREC_TEST_ML100K"
# test-only default: the copy beside the checkout on the development machines
ML100K_SOURCE = Path(os.environ.get(ML100K_ENV) or REPO.parent / "shared" / "data" / "ml-100k")
TEST_SESSION_MS, TEST_HEARTBEAT_MS = 2000, 500  # fast group joins (INFRA.md)


def _docker_engine() -> bool:
    """True when a Docker engine answers within a second (the client alone is not enough)."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (DockerException, OSError):
        return False


@pytest.fixture(scope="session")
def infra_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("streamrec-home")


@pytest.fixture(scope="session")
def kafka_bootstrap(infra_home: Path) -> Iterator[str]:
    explicit = os.environ.get("STREAMREC_KAFKA_BOOTSTRAP")
    if explicit:
        yield explicit
        return
    if _docker_engine():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield container.get_bootstrap_server()
        return
    broker = infra.start_broker(infra_home)
    yield f"{broker.host}:{broker.port}"
    infra.stop(broker.to_json())


@pytest.fixture(scope="session")
def redis_url(infra_home: Path) -> Iterator[str]:
    explicit = os.environ.get("STREAMREC_REDIS_URL")
    if explicit:
        yield explicit
        return
    if _docker_engine():
        from testcontainers.redis import RedisContainer

        with RedisContainer() as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    default = Settings.model_fields["redis_url"].default
    if net.redis_ping(default):
        yield default
        return
    server = infra.start_redis(infra_home)
    yield f"redis://{server.host}:{server.port}/0"
    infra.stop(server.to_json())


@pytest.fixture(params=["kafka-python", "confluent"])
def kafka_client(request: pytest.FixtureRequest) -> str:
    """Every Kafka-touching test that takes this runs once per client backend."""
    return request.param


@pytest.fixture
def topic() -> str:
    return f"test.{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(kafka_bootstrap: str, redis_url: str, topic: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test infrastructure, with a fresh topic and state directory."""
    return Settings(
        kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, topic=topic, home=tmp_path / "home",
        session_timeout_ms=TEST_SESSION_MS, heartbeat_interval_ms=TEST_HEARTBEAT_MS,
        consumer_group=f"group-{topic}",
    )


def missing_data(reason: str) -> NoReturn:
    """Skip on a developer machine; fail under CI, where a missing data set is a broken setup."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def datasets_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A STREAMREC_HOME whose data-set cache the test copies are imported into, once per session."""
    return tmp_path_factory.mktemp("datasets-home")


@pytest.fixture(scope="session")
def ml100k(datasets_home: Path) -> Path:
    """The cached MovieLens 100K folder, imported (and so verified) through `streamrec datasets import`."""
    if not ML100K_SOURCE.exists():
        missing_data(f"MovieLens 100K not found at {ML100K_SOURCE} (set {ML100K_ENV} to a folder or ml-100k.zip)")
    from streamrec.app.cli import cli

    result = CliRunner().invoke(
        cli, ["--home", str(datasets_home), "datasets", "import", "ml-100k", str(ML100K_SOURCE), "--json"]
    )
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout)["path"])


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that make a `streamrec` subprocess use `settings`."""
    return {
        "STREAMREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "STREAMREC_REDIS_URL": settings.redis_url,
        "STREAMREC_REDIS_CLUSTER": "true" if settings.redis_cluster else "false",
        "STREAMREC_TOPIC": settings.topic,
        "STREAMREC_HOME": str(settings.home),
        "STREAMREC_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
        "STREAMREC_HEARTBEAT_INTERVAL_MS": str(settings.heartbeat_interval_ms),
        "STREAMREC_CONSUMER_GROUP": settings.consumer_group,
        "STREAMREC_FEATURE_PREFIX": settings.feature_prefix,
    }


@pytest.fixture
def redis_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisCluster]:
    """A Redis Cluster of this test alone: 3 masters, 3 replicas (tests/redis_cluster.py); the
    marker `cluster_node_timeout_ms` sets how long a silent node has before it is marked failed."""
    marker = request.node.get_closest_marker("cluster_node_timeout_ms")
    timeout = {"node_timeout_ms": marker.args[0]} if marker else {}
    started = RedisCluster(tmp_path / "redis-cluster", **timeout).start()
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def stop_leaked_children() -> Iterator[None]:
    """Kill what the test's tracked processes left running (tests/children.py): set up before,
    and so torn down after, the test's other function-scoped fixtures."""
    mark = children.mark()
    yield
    children.stop_since(mark)
