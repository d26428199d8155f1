"""The cold-start content tower: features, the ridge fit, the blob, and `streamrec content-tower fit`
against real parameter-server shards (issue 17)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from scipy import sparse

from streamrec.app.cli import cli
from streamrec.param_server.artifacts import CATALOGUE_BLOB, encode_catalogue
from streamrec.param_server.client import ParamClient
from streamrec.stream.catalogue import ItemCatalogue, read_jsonl
from streamrec.trainer.content_tower import (
    ContentTower,
    FeatureSpec,
    _ridge_path,
    tower_blob,
)
from tests.param_server.conftest import StartServer, start_server  # noqa: F401  (the fixture)

STREAMREC = str(Path(sys.executable).parent / "streamrec")
GENRES = [f"g{n}" for n in range(8)]
WORDS = ["love", "war", "night", "city", "dark", "star", "king", "lost", "dream", "blue"]


def catalogue_of(records: list[dict]) -> ItemCatalogue:
    return read_jsonl([json.dumps(r) for r in records], "test")


def subprocess_env(address: str, tmp_path: Path) -> dict[str, str]:
    """A `streamrec` subprocess on this parameter server, without any token of the environment."""
    env = {**os.environ, "STREAMREC_PARAM_SERVERS": address, "STREAMREC_HOME": str(tmp_path / "home")}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    return env


def synthetic_items(n: int, seed: int = 0) -> list[dict]:
    """Items with 1-3 genres, a three-word title ending in a year, and a year (missing for 1 in 7)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        record = {"item_id": f"i{i}", "genre": [GENRES[g] for g in rng.choice(len(GENRES), rng.integers(1, 4), replace=False)],
                  "title": " ".join(rng.choice(WORDS, 3)).title() + f" ({1950 + i % 50})"}
        if i % 7:
            record["year"] = 1950 + i % 50
        records.append(record)
    return records


def genre_rows(records: list[dict], width: int = 5, seed: int = 1) -> np.ndarray:
    """Rows that are a known linear function of the genres (plus an offset)."""
    mapping = np.random.default_rng(seed).normal(size=(len(GENRES), width))
    held = np.zeros((len(records), len(GENRES)))
    for i, record in enumerate(records):
        held[i, [GENRES.index(g) for g in record["genre"]]] = 1.0
    return held @ mapping + 0.5


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_features_follow_the_spec_rules() -> None:
    catalogue = catalogue_of([
        {"item_id": "a", "genre": ["Comedy", "Drama"], "title": "Toy Story (1995)", "year": 1995},
        {"item_id": "b", "genre": ["Comedy"], "title": "A Toy Soldiers 2 (1991)", "year": 1991},
        {"item_id": "c", "genre": ["Drama"], "title": "A Story of Y (1995)"},
        {"item_id": "d", "genre": ["Western"], "title": "the end (1995)", "year": 2001},
        {"item_id": "e", "genre": [], "title": "Amélie THE Übermensch 2 (2001)", "year": 2001},
        {"item_id": "f", "genre": [], "title": "Das Übermensch", "year": 2001},
    ])
    spec = FeatureSpec.fit(catalogue, np.arange(6))
    assert set(spec.categorical["genre"]) == {"Comedy", "Drama"}  # Western: one item only
    assert set(spec.text["title"]) == {"toy", "story", "the", "übermensch"}  # no numbers, no 1-letter words
    year = spec.numeric["year"]
    assert year.mean == pytest.approx((1995 + 1991 + 3 * 2001) / 5) and year.edges == tuple(sorted(year.edges))
    features = spec.features(catalogue, np.arange(6)).toarray()
    assert features.shape == (6, spec.n_features)
    z, missing = spec.n_features - year.columns, spec.n_features - year.columns + 1
    assert features[2, z] == 0 and features[2, missing] == 1 and features[2, missing + 1:].sum() == 0
    assert features[0, missing] == 0 and features[0, missing + 1:].sum() == 1  # exactly one bin
    assert features[0, z] == pytest.approx((1995 - year.mean) / year.std)


@pytest.mark.parametrize(("n", "p"), [(60, 12), (12, 60)])  # primal and dual sides
def test_ridge_matches_the_dense_closed_form(n: int, p: int) -> None:
    rng = np.random.default_rng(n)
    features = sparse.random(n, p, density=0.3, random_state=n, format="csr")
    targets, weights = rng.normal(size=(n, 3)), rng.random(n) + 0.5
    for lam in (0.01, 1.0, 100.0):
        coef, intercept = _ridge_path(features, targets, weights)(lam)
        x = np.hstack([features.toarray(), np.ones((n, 1))])
        penalty = lam * np.eye(p + 1)
        penalty[p, p] = 0.0  # the intercept is not penalised
        expected = np.linalg.solve(x.T @ (weights[:, None] * x) + penalty, x.T @ (weights[:, None] * targets))
        assert np.allclose(coef, expected[:p], atol=1e-8) and np.allclose(intercept, expected[p], atol=1e-8)


def test_a_tower_learns_rows_that_are_linear_in_the_genres() -> None:
    records = synthetic_items(800)
    catalogue = catalogue_of(records)
    truth = genre_rows(records)
    noisy = truth + np.random.default_rng(2).normal(scale=0.3, size=truth.shape)
    trained = catalogue.ids[:600]
    weights = 1.0 + np.random.default_rng(3).random(600)
    tower = ContentTower.fit(catalogue, trained, noisy[:600], weights)
    metrics = tower.metrics
    assert metrics["items"] == 600 and metrics["validation_items"] == 120
    assert metrics["validation_cosine"] > 0.9 > metrics["baseline_cosine"]
    assert metrics["validation_mse"] < 0.1 * metrics["baseline_mse"]
    assert metrics["validation_mse"] < 0.3 ** 2 * 1.3  # about the noise, no worse
    ids, predicted = tower.predict(catalogue, catalogue.ids[600:])  # items the fit never saw
    assert ids.tolist() == catalogue.ids[600:].tolist() and predicted.dtype == np.float32
    assert cosines(predicted, truth[600:]).mean() > 0.98
    assert np.sqrt(((predicted - truth[600:]) ** 2).mean()) < 0.1
    with pytest.raises(ValueError, match="not in the catalogue"):
        tower.predict(catalogue, ["nope"])


def test_the_blob_round_trip_and_a_later_catalogue_with_new_items_and_values() -> None:
    records = synthetic_items(300)
    catalogue = catalogue_of(records)
    tower = ContentTower.fit(catalogue, catalogue.ids, genre_rows(records), np.ones(300))
    again = ContentTower.from_blob(tower.to_blob())
    assert again.spec == tower.spec and again.metrics == tower.metrics
    assert np.array_equal(again.predict(catalogue)[1], tower.predict(catalogue)[1])
    newcomers = [
        {"item_id": "new-a", "genre": ["g1", "a-genre-never-seen"], "title": "Love Night Zebra (2001)", "studio": "x"},
        {"item_id": "new-b", "genre": ["g1"], "title": "Love Night (2001)"},
        {"item_id": "new-c", "genre": ["g1"], "title": "Love Night (2001)", "year": 1960},
    ]
    later = catalogue_of(newcomers + records)  # new value codes and positions for every item
    originals = np.arange(len(catalogue))
    shifted = originals + len(newcomers)
    assert abs(tower.spec.features(later, shifted) - tower.spec.features(catalogue, originals)).max() == 0
    assert np.allclose(again.predict(later, catalogue.ids)[1], tower.predict(catalogue)[1], atol=1e-6)
    _, rows = again.predict(later, ["new-a", "new-b", "new-c"])
    assert np.array_equal(rows[0], rows[1])  # the unseen genre, word and attribute add nothing
    assert not np.array_equal(rows[1], rows[2])  # the year does
    with pytest.raises(ValueError, match="not a content tower"):
        ContentTower.from_blob(encode_catalogue(catalogue))


def test_cli_fits_publishes_and_seeds_only_items_without_rows(start_server: StartServer, tmp_path) -> None:  # noqa: F811
    servers = [start_server("--no-checkpoints", "--shard", str(s), "--num-shards", "2") for s in range(2)]
    env = {"STREAMREC_PARAM_SERVERS": ",".join(s.address for s in servers), "STREAMREC_HOME": str(tmp_path / "home"),
           "STREAMREC_PARAM_SERVER_TOKEN": None}
    records = synthetic_items(60)
    catalogue = catalogue_of(records)
    truth = genre_rows(records).astype(np.float32)
    ids = catalogue.ids.tolist()
    trained, few, unseen, untrained = ids[:38], ids[38:40], ids[40:50], ids[50:]

    def fit(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["content-tower", "fit", "--json", *args], env=env)
        return result.exit_code, result.output

    with ParamClient([s.address for s in servers]) as client:
        client.create_table("bpr_items", 4, scalars=1, optimizer="sgd")
        assert fit()[0] == 1 and "no catalogue is published" in fit()[1]
        client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue))
        code, output = fit("--table", "nope")
        assert code == 1 and "no table 'nope'" in output
        code, output = fit()
        assert code == 1 and "has 0 rows of catalogue items" in output  # nothing trained yet
        client.assign("bpr_items", ids[:40], truth[:40, :4], truth[:40, 4:])
        client.assign("bpr_items", untrained + ["not-in-catalogue"], np.full((11, 4), 7, np.float32),
                      np.full((11, 1), 7, np.float32))
        # every shard counts every item: 3 events each for `few`, which a sum over shards would make 6
        client.push({}, item_counts=(trained + few + ["not-in-catalogue"], np.array([9] * 38 + [3, 3, 50])))
        existing = trained + few + untrained + ["not-in-catalogue"]
        before = client.pull("bpr_items", existing).values

        code, output = fit()
        assert code == 0, output
        report = orjson.loads(output)
        assert report["items"] == 38 and report["seeded"] == 10 and report["rows"] == 51
        assert report["validation_cosine"] > 0.9 and report["validation_mse"] < report["baseline_mse"]
        assert np.array_equal(client.pull("bpr_items", existing).values, before)  # no row with values changed
        seeded = client.pull("bpr_items", unseen)
        tower = ContentTower.from_blob(client.get_blob(tower_blob("bpr_items")).data)
        assert seeded.found.all() and np.array_equal(seeded.values, tower.predict(catalogue, unseen)[1])
        assert cosines(seeded.values, truth[40:50]).min() > 0.95  # rows in the learner's space

        code, output = fit()  # seeded items have rows now and no events: not refitted on, not reseeded
        assert code == 0 and orjson.loads(output)["seeded"] == 0 and orjson.loads(output)["items"] == 38
        assert np.array_equal(client.pull("bpr_items", unseen).values, seeded.values)


@pytest.mark.timeout(60)
def test_every_reports_a_failed_round_and_goes_on(start_server: StartServer, tmp_path) -> None:  # noqa: F811
    """`--every`: no catalogue yet is a reported round, not the end; once one is published the next
    round fits (min-events 0: rows without counted events weigh as one) and seeds."""
    server = start_server("--no-checkpoints")
    env = subprocess_env(server.address, tmp_path)
    records = synthetic_items(30)
    catalogue = catalogue_of(records)
    truth = genre_rows(records).astype(np.float32)
    with ParamClient([server.address]) as client:
        client.create_table("bpr_items", 4, scalars=1, optimizer="sgd")
        client.assign("bpr_items", catalogue.ids[:25], truth[:25, :4], truth[:25, 4:])
        loop = subprocess.Popen([STREAMREC, "content-tower", "fit", "--every", "0.2s", "--min-events", "0", "--json"],
                                stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert "no catalogue is published" in json.loads(loop.stdout.readline())["error"]
            client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue))
            report = json.loads(loop.stdout.readline())
            while "error" in report:  # a round that started before the publish
                report = json.loads(loop.stdout.readline())
            assert report["items"] == 25 and report["seeded"] == 5 and loop.poll() is None
        finally:
            loop.terminate()
            loop.wait(timeout=30)
        assert client.pull("bpr_items", catalogue.ids[25:]).found.all()


@pytest.mark.timeout(90)
def test_seed_every_gives_the_items_a_new_catalogue_version_adds_their_rows_between_fits(
        start_server: StartServer, tmp_path) -> None:  # noqa: F811
    """The items topic adds items at any time; `--seed-every` seeds them from the published tower
    within seconds, where the next fit may be an hour away."""
    server = start_server("--no-checkpoints")
    env = subprocess_env(server.address, tmp_path)
    records = synthetic_items(40)
    catalogue = catalogue_of(records)
    truth = genre_rows(records).astype(np.float32)
    refused = CliRunner().invoke(cli, ["content-tower", "fit", "--seed-every", "1s"], env=env)
    assert refused.exit_code == 2 and "needs --every" in refused.output
    with ParamClient([server.address]) as client:
        client.create_table("bpr_items", 4, scalars=1, optimizer="sgd")
        client.assign("bpr_items", catalogue.ids[:25], truth[:25, :4], truth[:25, 4:])
        client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue_of(records[:30])))
        loop = subprocess.Popen([STREAMREC, "content-tower", "fit", "--every", "1h", "--seed-every", "0.2s",
                                 "--min-events", "0", "--json"], stdout=subprocess.PIPE, text=True, env=env)
        try:
            fitted = json.loads(loop.stdout.readline())
            assert fitted["items"] == 25 and fitted["seeded"] == 5
            version = client.put_blob(CATALOGUE_BLOB, encode_catalogue(catalogue))  # ten items more
            seeded = json.loads(loop.stdout.readline())
            assert seeded == {"table": "bpr_items", "catalogue_version": version, "tower_version": fitted["version"],
                              "seeded": 10, "skipped_for_room": 0}
        finally:
            loop.terminate()
            loop.wait(timeout=30)
        tower = ContentTower.from_blob(client.get_blob(tower_blob("bpr_items")).data)
        new = catalogue.ids[30:]
        assert np.array_equal(client.pull("bpr_items", new).values, tower.predict(catalogue, new)[1])
