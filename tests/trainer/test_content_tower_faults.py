"""The content tower under faults, against real parameter-server processes and a real Redis (keys
under a prefix of each test's own): a table near max_rows, Redis or a Redis Cluster unreachable,
huge numeric attributes, periods out of range."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.core.net import free_port
from streamrec.param_server.artifacts import CATALOGUE_BLOB, encode_catalogue
from streamrec.param_server.client import ParamClient
from streamrec.trainer.content_tower import SEED_RESERVE, ContentTower, FeatureSpec, refresh_content_tower
from streamrec.trainer.online.exploration import ExplorationStore
from tests.param_server.conftest import StartServer, start_server  # noqa: F401  (the fixture)
from tests.trainer.test_content_tower import (
    STREAMREC,
    catalogue_of,
    genre_rows,
    subprocess_env,
    synthetic_items,
)


@pytest.fixture
def store(redis_url: str) -> Iterator[ExplorationStore]:
    """An exploration store under a prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"ctf{uuid.uuid4().hex[:8]}"
    yield ExplorationStore.from_url(redis_url, prefix)
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def closed_url() -> str:
    """A Redis URL where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"


def trained_table(client: ParamClient, records: list[dict], trained: int, max_rows: int | None = None) -> np.ndarray:
    """`bpr_items` with rows and 10 events each for the first `trained` items; returns their rows."""
    ids = catalogue_of(records).ids[:trained]
    rows = genre_rows(records[:trained]).astype(np.float32)
    client.create_table("bpr_items", 4, scalars=1, optimizer="sgd", max_rows=max_rows)
    client.assign("bpr_items", ids, rows[:, :4], rows[:, 4:])
    client.push({}, item_counts=(ids.tolist(), np.full(trained, 10, np.int64)))
    return rows


@pytest.mark.parametrize("shards", [1, 2])
def test_seeding_never_evicts_a_trained_row_and_reports_what_did_not_fit(
        start_server: StartServer, shards: int) -> None:  # noqa: F811
    """A table near max_rows made room for every seeded row by evicting its least recently updated
    rows, the trained ones: after two rounds no learned row was left (and with more new items than
    max_rows every round failed with TableFullError). Seeding now fills only the rows each shard
    has free, the newest catalogue items first, and counts the rest as skipped_for_room."""
    max_rows = 100  # per shard
    servers = [start_server("--no-checkpoints", "--shard", str(s), "--num-shards", str(shards)) for s in range(shards)]
    records = synthetic_items(130 * shards)
    catalogue = catalogue_of(records)
    with ParamClient([s.address for s in servers]) as client:
        client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue))
        learned = trained_table(client, records, 30 * shards, max_rows)
        trained = catalogue.ids[: 30 * shards]
        missing = catalogue.ids[30 * shards:]
        per_shard = np.bincount(client.shard_of(trained), minlength=shards)
        free = max_rows - max_rows // SEED_RESERVE - per_shard

        report = refresh_content_tower(client, "bpr_items", 5)
        seeded = client.pull("bpr_items", missing).found
        assert report["seeded"] == int(seeded.sum()) == int(free.sum())
        assert report["skipped_for_room"] == missing.size - report["seeded"] > 0
        shard_of_missing = client.shard_of(missing)
        for shard in range(shards):  # each shard's newest items got its free rows
            on = shard_of_missing == shard
            newest = int(free[shard])
            assert on.sum() > newest and seeded[on].tolist() == [False] * int(on.sum() - newest) + [True] * newest

        again = refresh_content_tower(client, "bpr_items", 5)  # no room left: nothing is seeded
        assert again["seeded"] == 0 and again["skipped_for_room"] == report["skipped_for_room"]
        info = client.tables()["bpr_items"]
        assert info["evicted_for_room"] == 0 and info["rows"] == trained.size + report["seeded"]
        pulled = client.pull("bpr_items", trained)
        assert pulled.found.all() and np.array_equal(pulled.values, learned)


def test_items_whose_redis_mark_failed_are_seeded_and_marked_by_the_next_round(
        start_server: StartServer, store: ExplorationStore, redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    """The items were assigned before they were marked fresh, so a round whose Redis write failed
    left them with rows the next round did not see as new, and they never became fresh. They are
    now marked first: the failed round writes no row, the next seeds and marks them. The failure
    names Redis (it was blamed on the parameter server)."""
    server = start_server("--no-checkpoints")
    records = synthetic_items(40)
    catalogue = catalogue_of(records)
    new = catalogue.ids[30:].tolist()
    store.redis.set(store.keys.key("clock"), "1000000")  # the trainer has counted events
    env = {"STREAMREC_PARAM_SERVERS": server.address, "STREAMREC_HOME": str(tmp_path / "home"),
           "STREAMREC_PARAM_SERVER_TOKEN": None, "STREAMREC_REDIS_URL": redis_url, "STREAMREC_REDIS_CLUSTER": "false",
           "STREAMREC_FEATURE_PREFIX": store.keys.prefix}
    with ParamClient([server.address]) as client:
        trained_table(client, records, 30)
        client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue))
        down = CliRunner().invoke(cli, ["content-tower", "fit", "--json"],
                                  env={**env, "STREAMREC_REDIS_URL": closed_url()})
        assert down.exit_code == 1, down.output
        assert not client.pull("bpr_items", new).found.any()  # no row without its mark
        assert "Error: feature store Redis redis://127.0.0.1:" in down.output and "parameter server" not in down.output

        up = CliRunner().invoke(cli, ["content-tower", "fit", "--json"], env=env)
        assert up.exit_code == 0, up.output
        assert orjson.loads(up.output)["seeded"] == len(new) and client.pull("bpr_items", new).found.all()
    fresh = store.fresh(100)
    assert sorted(fresh.ids.tolist()) == sorted(new) and (fresh.first_seen == 1_000_000).all()


@pytest.mark.timeout(120)
def test_every_reports_an_unreachable_redis_cluster_and_goes_on(
        start_server: StartServer, tmp_path: Path) -> None:  # noqa: F811
    """A Redis Cluster client connects as it is built, and redis-py's RedisClusterException is no
    RedisError: `--every` exited 1 at its first round. Now each round reports it and the loop goes on."""
    server = start_server("--no-checkpoints")
    records = synthetic_items(40)
    env = {**subprocess_env(server.address, tmp_path), "STREAMREC_REDIS_CLUSTER": "true",
           "STREAMREC_REDIS_URL": closed_url(), "STREAMREC_FEATURE_PREFIX": f"ctf{uuid.uuid4().hex[:8]}"}
    with ParamClient([server.address]) as client:
        trained_table(client, records, 30)
        client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue_of(records)))
        loop = subprocess.Popen([STREAMREC, "content-tower", "fit", "--every", "0.2s", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            for _ in range(2):  # the items are still without rows, so the next round tries again
                line = loop.stdout.readline()
                assert line, loop.communicate(timeout=30)[1][-2000:]
                assert json.loads(line)["error"].startswith("feature store Redis redis://127.0.0.1:")
            assert loop.poll() is None
        finally:
            loop.terminate()
            loop.wait(timeout=30)
        assert not client.pull("bpr_items", catalogue_of(records).ids[30:]).found.any()


@pytest.mark.parametrize("values", [[1e308, 1.7e308], [1.7e308, -1.7e308], [1e-310, 3e-310]])
def test_a_tower_fits_on_numeric_attributes_of_any_finite_size(values: list[float]) -> None:
    """The mean and std of values near 1e308 overflowed: NaN features, and every round failed with
    "Eigenvalues did not converge"."""
    records = [{**record, "price": values[i % 2]} for i, record in enumerate(synthetic_items(60))]
    catalogue = catalogue_of(records)
    tower = ContentTower.fit(catalogue, catalogue.ids, genre_rows(records), np.ones(60))
    price = tower.spec.numeric["price"]
    assert np.isfinite([price.mean, price.std, *price.edges]).all() and price.std > 0
    assert tower.metrics["validation_cosine"] > 0.9
    assert np.isfinite(tower.predict(catalogue)[1]).all()


def test_one_huge_value_does_not_zero_the_column() -> None:
    """One item at 1e200 made the std infinite, and the standardised value 0 for every item."""
    catalogue = catalogue_of([{"item_id": f"i{i}", "price": 1e200 if i == 0 else float(i)} for i in range(20)])
    spec = FeatureSpec.fit(catalogue, np.arange(20))
    z = spec.features(catalogue, np.arange(20)).toarray()[:, 0]
    assert np.isfinite(spec.numeric["price"].std) and np.isfinite(z).all()
    assert z[0] > 4 and (z[1:] < 0).all()  # the huge item stands out, on the same scale as the others


@pytest.mark.timeout(60)  # a period the loop took ran it in this process until the timeout
@pytest.mark.parametrize(("args", "hint"), [
    (["--every", "0s"], "--every"),
    (["--every", "999999999999d"], "--every"),
    (["--every", "1h", "--seed-every", "0s"], "--seed-every"),
    (["--every", "1h", "--seed-every", "366d"], "--seed-every"),
])
def test_content_tower_periods_out_of_range_are_refused(args: list[str], hint: str) -> None:
    """0s ran rounds back to back (or was ignored for --seed-every); a huge period died with
    OverflowError after the first round."""
    result = CliRunner().invoke(cli, ["content-tower", "fit", *args], env={"STREAMREC_PARAM_SERVERS": "127.0.0.1:1"})
    assert result.exit_code == 2 and f"Invalid value for {hint}:" in result.output, result.output
    assert "more than 0s and at most 365d" in result.output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("period", ["0s", "999999999999d"])
def test_refit_periods_out_of_range_are_refused(period: str, tmp_path: Path) -> None:
    """`refit --every` shares the parser: 0s refitted back to back, a huge period overflowed."""
    env = {**subprocess_env("127.0.0.1:1", tmp_path), "STREAMREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    result = subprocess.run([STREAMREC, "refit", "--model", "popularity", "--from", "topic", "--every", period],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "Invalid value for --every:" in result.stderr, result.stderr[-2000:]
