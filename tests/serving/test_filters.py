"""`/recommend` filters and configured business rules over a published item catalogue, through a
real parameter server, `streamrec catalogue publish` and a serving worker over HTTP; and the
filtered candidate search against real FAISS indexes (flat and IVF) where the allowed items are
the ones the unfiltered search would never reach."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from streamrec.param_server.artifacts import encode_catalogue
from streamrec.param_server.client import Delta, ParamClient
from streamrec.param_server.keys import Keys
from streamrec.param_server.replica import TableMirror
from streamrec.serving.artifacts import Artifacts
from streamrec.serving.config import ServingConfig
from streamrec.serving.fastpath import parse
from streamrec.serving.filters import Bound, FilterError, ItemFilter
from streamrec.serving.index import ItemIndex, query_rows
from streamrec.serving.pipeline import allowed_rows, ann_within
from streamrec.serving.state import ServingState
from streamrec.stream.catalogue import ItemCatalogue, read_catalogue, read_jsonl
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.serving.conftest import STREAMREC, Serving, load_model, serving_factory, start_param_server, wait_for

DIM, N_ITEMS, N_USERS = 8, 60, 4
GENRES = ("drama", "comedy", "horror")


def genre_of(j: int) -> str:
    return GENRES[j % 3]


def year_of(j: int) -> int:
    return 1980 + j


def in_stock(j: int) -> bool:
    return j % 5 != 0


@dataclass
class World:
    serving: Serving
    catalogue_file: Path
    env: dict[str, str]
    users: np.ndarray
    items: np.ndarray

    def ranked(self, user: int, keep: object) -> list[str]:
        """Items by score for `user` among those where keep(j) holds."""
        scores = self.items @ self.users[user]
        return [f"i{j}" for j in np.argsort(-scores, kind="stable") if keep(j)]  # type: ignore[operator]

    def publish(self, records: list[dict[str, object]]) -> dict[str, object]:
        self.catalogue_file.write_text("".join(json.dumps(r) + "\n" for r in records))
        done = subprocess.run([STREAMREC, "catalogue", "publish", str(self.catalogue_file), "--json"], env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def records(genre: object = genre_of) -> list[dict[str, object]]:
    return [{"item_id": f"i{j}", "genre": genre(j), "year": year_of(j), "in_stock": in_stock(j),  # type: ignore[operator]
             "tags": ["a:b"] if j < 3 else ["plain"]} for j in range(N_ITEMS)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[World]:
    home = tmp_path_factory.mktemp("serving-filters")
    server = start_param_server(home / "ps")
    rng = np.random.default_rng(11)
    users = rng.normal(size=(N_USERS, DIM)).astype(np.float32)
    items = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    prefix = f"test-filters-{uuid.uuid4().hex[:10]}"
    start, started = serving_factory(home)
    env = {**os.environ, "STREAMREC_HOME": str(home), "STREAMREC_PARAM_SERVERS": server.address}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    try:
        with ParamClient([server.address]) as client:
            load_model(client, {f"u{u}": users[u] for u in range(N_USERS)}, {f"i{j}": items[j] for j in range(N_ITEMS)})
        world = World(None, home / "items.jsonl", env, users.astype(np.float64), items.astype(np.float64))  # type: ignore[arg-type]
        published = world.publish(records())
        assert published["items"] == N_ITEMS and published["version"] >= 1
        world.serving = start(server.address, redis_url, prefix, args=("--index", "flat"),
                              extra_env={"STREAMREC_ITEM_RULES": "exclude=in_stock:false"})
        yield world
    finally:
        for s in started:
            s.stop()
        server.kill()
        FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix)).clear()


def ids(reply: object) -> list[str]:
    assert reply.status_code == 200, reply.text  # type: ignore[attr-defined]
    return [item["item_id"] for item in reply.json()["items"]]  # type: ignore[attr-defined]


def test_the_rule_from_configuration_holds_without_any_filter(world: World) -> None:
    got = ids(world.serving.get("/recommend", user_id="u0", k=N_ITEMS))
    assert got == world.ranked(0, in_stock)  # every in-stock item, none out of stock, in score order


def test_include_keeps_only_matching_items_in_score_order(world: World) -> None:
    got = ids(world.serving.get("/recommend", user_id="u1", k=5, include="genre:comedy"))
    assert got == world.ranked(1, lambda j: genre_of(j) == "comedy" and in_stock(j))[:5]


def test_alternatives_of_one_attribute_and_several_attributes(world: World) -> None:
    reply = world.serving.http.get("/recommend", params=[("user_id", "u2"), ("k", N_ITEMS), ("include", "genre:comedy"),
                                                         ("include", "genre:horror"), ("range", "year:1990..2010")])
    assert ids(reply) == world.ranked(2, lambda j: genre_of(j) != "drama" and 1990 <= year_of(j) <= 2010 and in_stock(j))


def test_exclude_and_open_ranges(world: World) -> None:
    got = ids(world.serving.get("/recommend", user_id="u3", k=N_ITEMS, exclude="genre:drama", range="year:..1999"))
    assert got == world.ranked(3, lambda j: genre_of(j) != "drama" and year_of(j) <= 1999 and in_stock(j))
    assert ids(world.serving.get("/recommend", user_id="u3", k=N_ITEMS, range="year:2040..")) == []


def test_values_may_hold_colons(world: World) -> None:
    got = ids(world.serving.get("/recommend", user_id="u0", k=10, include="tags:a:b"))
    assert sorted(got) == sorted(f"i{j}" for j in range(3) if in_stock(j))


def test_a_filtered_cold_user_still_gets_k_allowed_items(world: World) -> None:
    body = world.serving.get("/recommend", user_id="nobody", k=7, include="genre:horror").json()
    assert body["cold_start"] and len(body["items"]) == 7
    assert all(genre_of(int(item["item_id"][1:])) == "horror" and in_stock(int(item["item_id"][1:]))
               for item in body["items"])


@pytest.mark.parametrize(("params", "message"), [
    ({"include": "colour:red"}, "unknown attribute 'colour'"),
    ({"include": "year:1990"}, "'year' is numeric"),
    ({"range": "genre:1..2"}, "'genre' is categorical"),
    ({"include": "genre"}, "ATTRIBUTE:VALUE expected"),
    ({"range": "year:2000..1990"}, "LOW <= HIGH"),
    ({"range": "year:..", }, "ATTRIBUTE:LOW..HIGH expected"),
    ({"range": "year:abc..1"}, "ATTRIBUTE:LOW..HIGH expected"),
    ({"range": "year:1_990.."}, "ATTRIBUTE:LOW..HIGH expected"),  # Python's float would read 1990
    ({"include": "g:" + "x" * 10_000}, "longer than 600 characters"),
    ({"range": "year:now..now-1d"}, "LOW <= HIGH"),
    ({"range": "year:now-1x.."}, "ATTRIBUTE:LOW..HIGH expected"),
    ({"range": "year:nan.."}, "ATTRIBUTE:LOW..HIGH expected"),
    ({"available": "maybe"}, "true or false expected"),
    ({"available": "true"}, "available needs numeric available_from and/or available_until"),
])
def test_a_filter_that_cannot_apply_is_refused_like_any_invalid_query(world: World, params, message) -> None:
    reply = world.serving.get("/recommend", user_id="u0", **params)
    assert reply.status_code == 422
    detail = reply.json()["detail"]
    assert isinstance(detail, list) and message in detail[0]["msg"]


def test_a_new_catalogue_version_is_served_after_the_next_poll(world: World) -> None:
    try:
        world.publish(records(genre=lambda j: "comedy"))  # every item becomes a comedy
        wait_for(lambda: len(ids(world.serving.get("/recommend", user_id="u0", k=N_ITEMS, include="genre:comedy")))
                 == sum(map(in_stock, range(N_ITEMS))))
    finally:
        world.publish(records())
        wait_for(lambda: ids(world.serving.get("/recommend", user_id="u1", k=5, include="genre:comedy"))
                 == world.ranked(1, lambda j: genre_of(j) == "comedy" and in_stock(j))[:5])
    shown = subprocess.run([STREAMREC, "catalogue", "show", "--json"], env=world.env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and json.loads(shown.stdout)["attributes"]["genre"] == {"kind": "categorical",
                                                                                         "values": 3}


def test_a_rule_the_new_catalogue_cannot_apply_is_named_until_one_can(world: World) -> None:
    """Rules are written before any catalogue exists, so one naming an attribute the catalogue lacks
    (or has as another kind) is skipped; it used to be skipped in silence, which turned a business
    rule off without a word when one cell changed a column's kind. /readyz names it now."""
    assert world.serving.get("/readyz").json()["inert_rules"] == []
    try:
        world.publish([{k: (int(v) if k == "in_stock" else v) for k, v in r.items()} for r in records()])  # 0 / 1
        ready = wait_for(lambda: (r := world.serving.get("/readyz").json())["inert_rules"] and r)
        assert ready["inert_rules"] == ["exclude=in_stock:false: the catalogue has 'in_stock' as numeric, "
                                        "not categorical"]
    finally:
        world.publish(records())
        wait_for(lambda: world.serving.get("/readyz").json()["inert_rules"] == [])
    assert ids(world.serving.get("/recommend", user_id="u0", k=N_ITEMS)) == world.ranked(0, in_stock)


def test_availability_windows_and_times_relative_to_now_follow_the_clock_without_a_new_catalogue(world: World) -> None:
    """`available=true` keeps the items whose [available_from, available_until) holds now, and a
    range bound may be `now` or an offset from it. Items leave and enter at their times with the
    same catalogue version: the cached mask is built again when the next item crosses a bound."""
    start = time.time() + 10.0  # late enough for the catalogue to reach serving first (the CLI starts in ~3 s)

    def window(j: int) -> dict[str, float]:
        return ({"available_until": start} if j % 4 == 1 else {"available_from": start} if j % 4 == 2
                else {"available_until": start - 3600} if j % 4 == 3 and j < 20 else {})

    def released(j: int) -> float:  # odd items released an hour ago, even ones at `start`
        return start - 3600 if j % 2 else start

    try:
        world.publish([{**r, **window(j), "released": released(j)} for j, r in enumerate(records())])
        before = [j for j in range(N_ITEMS) if j % 4 != 2 and not (j % 4 == 3 and j < 20)]
        wait_for(lambda: ids(world.serving.get("/recommend", user_id="u0", k=N_ITEMS, available="true"))
                 == world.ranked(0, lambda j: j in before and in_stock(j)))
        recent = world.serving.get("/recommend", user_id="u1", k=N_ITEMS, range="released:now-2h..now")
        assert ids(recent) == world.ranked(1, lambda j: j % 2 == 1 and in_stock(j))
        assert time.time() < start, "the catalogue took too long to reach serving: the test proves nothing"
        while time.time() < start + 0.05:
            time.sleep(0.05)
        after = [j for j in range(N_ITEMS) if j % 4 in (0, 2) or (j % 4 == 3 and j >= 20)]
        assert ids(world.serving.get("/recommend", user_id="u0", k=N_ITEMS, available="true")) == world.ranked(
            0, lambda j: j in after and in_stock(j))
        recent = world.serving.get("/recommend", user_id="u1", k=N_ITEMS, range="released:now-2h..now")
        assert ids(recent) == world.ranked(1, in_stock)
        assert ids(world.serving.get("/recommend", user_id="u1", k=N_ITEMS, range="released:now+1s..")) == []
    finally:
        world.publish(records())
        wait_for(lambda: world.serving.get("/recommend", user_id="u0", available="true").status_code == 422)


def test_a_timed_mask_holds_until_the_next_item_crosses_a_bound() -> None:
    catalogue = read_catalogue_of([{"item_id": "a", "available_until": 100.0}, {"item_id": "b", "available_from": 50.0},
                                   {"item_id": "c", "released": 10.0}, {"item_id": "d", "released": 30.0}])
    rows = np.arange(4)
    available = ItemFilter.parse([], [], [], ["true"])
    assert available.timed and available.mask(catalogue, rows, 4, now=40.0).tolist() == [True, False, True, True]
    assert available.valid_until(catalogue, 40.0) == 50.0  # b enters
    assert available.mask(catalogue, rows, 4, now=100.0).tolist() == [False, True, True, True]
    assert available.valid_until(catalogue, 100.0) == float("inf")
    recent = ItemFilter.parse([], [], ["released:now-15s..now"])
    assert recent.timed and recent.ranges == (("released", Bound(-15.0, True), Bound(0.0, True)),)
    assert recent.mask(catalogue, rows, 4, now=20.0).tolist() == [False, False, True, False]
    assert recent.valid_until(catalogue, 20.0) == 25.0  # c leaves when now - 15 passes 10
    assert recent.valid_until(catalogue, 26.0) == 30.0  # d enters when now reaches 30
    assert not ItemFilter.parse([], [], ["released:1..2"]).timed
    assert ItemFilter.parse([], [], [], ["true", "false"]) == ItemFilter()  # the last value wins, as for FastAPI
    assert ItemFilter.parse_rules("available=true").inert(read_catalogue_of([{"item_id": "a", "x": 1}])) == [
        "available=true: the catalogue has no numeric available_from or available_until, or one that is not numeric"]


def test_serve_refuses_a_broken_item_catalogue_at_start(tmp_path: Path) -> None:
    """Each worker reads `--item-catalogue` when it starts: a broken file crash-looped them for
    ever, the parent never ready and never exiting."""
    path = tmp_path / "bad.csv"
    path.write_text("item_id,title\ni1,One,extra\n")
    env = {**os.environ, "STREAMREC_HOME": str(tmp_path)}
    done = subprocess.run([STREAMREC, "serve", "--item-catalogue", str(path), "--port", "0", "--workers", "2"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "bad.csv:2: 3 fields, the header has 2" in done.stderr


# ---- the filtered search against real FAISS indexes, in process ---------------------------------------
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_allowed_items_the_unfiltered_search_never_reaches_are_still_found(tmp_path: Path, kind: str) -> None:
    """The 12 allowed items are the worst-scoring of 4,000: the over-fetch finds none of them,
    so the ID-selector search (and, where IVF probes miss some, the exact search) must."""
    rng = np.random.default_rng(3)
    n, dim = 4000, 16
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    user = rng.normal(size=dim).astype(np.float32)
    worst = np.argsort(vectors @ user)[:12]
    mirror = TableMirror(None, "items", compact=True)
    keys = Keys.from_strings([f"i{j}" for j in range(n)])
    mirror.apply(Delta(values=np.hstack([vectors, np.zeros((n, 1), np.float32)]), found=np.ones(n, bool), dim=dim,
                       ids=keys, deleted=Keys.empty("str"), version=(1,), full=True))
    index = ItemIndex(kind, nprobe=2, ivf_min_items=100)
    index.rebuild(mirror)
    catalogue_file = tmp_path / "items.jsonl"
    catalogue_file.write_text("".join(json.dumps({"item_id": f"i{j}", "shelf": "back" if j in set(worst.tolist())
                                                  else "front"}) + "\n" for j in range(n)))
    artifacts = Artifacts().with_blob("catalogue/items", "catalogue", encode_catalogue(read_catalogue(catalogue_file)), 1)
    state = ServingState.build(None, mirror, index, artifacts, 1)  # type: ignore[arg-type]
    allowed = allowed_rows(state, ItemFilter(), ItemFilter.parse(["shelf:back"], [], []))
    assert allowed is not None and allowed.sum() == 12
    found = ann_within(state, query_rows(user[None], mirror), 10, 10, allowed)
    expected = worst[np.argsort(-(vectors[worst] @ user))][:10]
    assert sorted(mirror.index[found].tolist()) == sorted(f"i{j}" for j in expected)
    with pytest.raises(FilterError, match="unknown attribute"):
        allowed_rows(state, ItemFilter(), ItemFilter.parse(["aisle:1"], [], []))


def read_catalogue_of(lines: list[dict[str, object]]) -> ItemCatalogue:
    return read_jsonl([json.dumps(line) for line in lines], "<test>")


def test_rules_that_name_missing_attributes_are_skipped_but_bad_rules_stop_the_worker() -> None:
    rules = ItemFilter.parse_rules("exclude=in_stock:false&range=stock:1..")
    assert rules.exclude == (("in_stock", "false"),) and rules.ranges == (("stock", Bound(1.0), Bound(float("inf"))),)
    without_stock = read_catalogue_of([{"item_id": "a", "in_stock": True}])
    assert rules.applicable(without_stock) == ItemFilter(exclude=(("in_stock", "false"),))  # no `stock`: skipped
    assert not rules.applicable(None)
    with pytest.raises(FilterError, match="unknown parameter"):
        ItemFilter.parse_rules("drop=in_stock:false")
    with pytest.raises(ValidationError, match="ATTRIBUTE:VALUE expected"):
        ServingConfig(item_rules="exclude=in_stock")


def test_the_direct_route_takes_well_formed_filters_and_leaves_the_rest_to_fastapi() -> None:
    query = parse(b"user_id=u1&include=genre:a&include=genre:b&exclude=tag:x%3Ay&range=year:1990..")
    assert query is not None
    assert query.item_filter == ItemFilter.parse(["genre:a", "genre:b"], ["tag:x:y"], ["year:1990.."])
    assert parse(b"user_id=u1&include=genre") is None  # FastAPI's route refuses it (422)
    assert parse(b"user_id=u1&range=year:2..1") is None
    assert parse(b"user_id=u1").item_filter == ItemFilter()  # type: ignore[union-attr]
