"""New users (issue 17, cold start): real serving workers, parameter server and Redis. A user
without a row but with events is served from their recent items' mean vector (fold-in); one
without events from the context slices of their request, only of the kinds whose merit shows they
predict better than the global list; else from the trending list."""

from __future__ import annotations

import dataclasses

import numpy as np

from streamrec.param_server.client import ParamClient
from streamrec.serving.context import RequestContext, rank
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.context_slices import Merit, SliceTops, event_slices, slice_counts
from streamrec.trainer.online.exploration import ExplorationStore
from streamrec.trainer.online.feature_store import FeatureStore
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import StartServing, load_model, wait_for, write_history

DIM = 4
DAY0 = 1_700_006_400.0  # a UTC midnight


def _slices(redis_url: str, prefix: str) -> None:
    """ios users take ios-0..ios-4; everyone else the trending items. The merit says the device
    predicts and the daypart does not."""
    items = [f"ios-{n % 5}" for n in range(50)] + [f"t{n % 10}" for n in range(200)]
    contexts = [{"device": "ios"}] * 50 + [{"device": "web"}] * 200
    batch = EventBatch.from_columns(np.array([f"u{n}" for n in range(250)], object), np.array(items, object),
                                    np.array(["click"] * 250, object), np.full(250, DAY0 + 13 * 3600.0))
    batch = dataclasses.replace(batch, context=np.array(contexts, object))
    counts = slice_counts(event_slices(batch, np.ones(250, bool)), 7 * 86_400.0, {})
    counts = dataclasses.replace(counts, merit_kinds=np.array(["device", "daypart"], object),
                                 merit_events=np.array([1000, 1000]), merit_hits=np.array([500, 100]),
                                 merit_reference_hits=np.array([100, 100]))
    ExplorationStore.from_url(redis_url, prefix).count(np.empty(0, object), np.zeros(0), np.zeros(0), DAY0,
                                                       slices=counts)


def _world(ps: ParamClient, feature_store: FeatureStore, redis_url: str, prefix: str) -> None:
    items = {f"t{n}": np.array([1.0 - n / 20, 0, 0, 0], np.float32) for n in range(10)}
    items.update({f"ios-{n}": np.zeros(DIM, np.float32) for n in range(5)})
    load_model(ps, {"known": np.array([1.0, 0, 0, 0], np.float32)}, items)
    write_history(feature_store, [(f"w{n}", f"t{n % 10}", DAY0 + n) for n in range(100)]
                  + [("new:seen", "ios-0", DAY0)])
    _slices(redis_url, prefix)


def test_a_new_user_gets_the_slice_of_their_device_and_only_useful_kinds_count(
        param_server: ServerProcess, ps: ParamClient, feature_store: FeatureStore, redis_url: str, prefix: str,
        start_serving: StartServing) -> None:
    _world(ps, feature_store, redis_url, prefix)
    serving = start_serving(param_server.address, redis_url, prefix)
    wait_for(lambda: serving.get("/readyz").json().get("context_reads"))

    def answer(**params: object) -> dict:
        reply = serving.get("/recommend", k=5, **params)
        assert reply.status_code == 200, reply.text
        return reply.json()

    body = answer(user_id="new:user", device="ios")
    assert body["cold_start"] and body["context"] == ["device=ios"]  # the daypart's merit is not enough
    assert {e["item_id"] for e in body["items"]} == {f"ios-{n}" for n in range(5)}
    assert all(e["sources"] == ["context"] for e in body["items"])
    # the same through FastAPI's route (explain=yes is not in the direct route's plain form)
    assert [e["item_id"] for e in answer(user_id="new:user", device="ios", hour=13, explain="yes")["items"]] \
        == [e["item_id"] for e in body["items"]]
    # seen items are left out and the list is filled to k
    seen = answer(user_id="new:seen", device="ios")
    assert "ios-0" not in [e["item_id"] for e in seen["items"]] and len(seen["items"]) == 5
    # no device: no useful slice, the trending list as before
    plain = answer(user_id="new:user")
    assert plain.get("context") is None and all(e["sources"] == ["trending"] for e in plain["items"])
    # a device nobody counted, and a user with a row, are not served from slices either
    assert answer(user_id="new:user", device="car").get("context") is None
    assert answer(user_id="known", device="ios").get("context") is None
    for bad in ({"device": "x" * 10_000}, {"hour": 24}, {"hour": "noon"}, {"device": ""}):
        assert serving.get("/recommend", user_id="new:user", **bad).status_code == 422
    metrics = serving.get("/metrics").text
    assert 'streamrec_serving_recommended_items_total{source="context"}' in metrics


def test_slices_shrink_towards_the_global_list_by_their_size():
    lists = {"all": (np.array(["a", "b"], object), np.array([90.0, 10.0])),
             "device=ios": (np.array(["b"], object), np.array([10.0]))}
    mass = {"all": 100.0, "device=ios": 10.0}
    ranked = [rank(SliceTops(lists, {"all": 100, "device=ios": events}, mass, {"device": Merit(100, 50, 10)}, DAY0),
                   RequestContext(device="ios"), 2, prior=100.0)[0].tolist() for events in (10, 1000)]
    assert ranked == [["a", "b"], ["b", "a"]]  # 10 ios events barely move the list; 1,000 turn it
    useless = SliceTops(lists, {"all": 100, "device=ios": 1000}, mass, {"device": Merit(100, 12, 10)}, DAY0)
    assert rank(useless, RequestContext(device="ios"), 2, prior=100.0) is None


def test_a_user_without_a_row_but_with_events_is_served_from_their_items(
        param_server: ServerProcess, ps: ParamClient, feature_store: FeatureStore, redis_url: str, prefix: str,
        start_serving: StartServing) -> None:
    items = {f"pop{n}": np.array([0, 0, 0, 1.0], np.float32) for n in range(5)}
    items.update({f"a{n}": np.array([1.0, 0, 0, 0], np.float32) for n in range(5)})
    items.update({f"b{n}": np.array([0, 1.0, 0, 0], np.float32) for n in range(5)})
    biases = np.array([0.5] * 5 + [0.0] * 10, np.float32)  # the popular items lead on bias alone
    load_model(ps, {"known": np.array([0, 1.0, 0, 0], np.float32)}, items, biases)
    write_history(feature_store, [(f"w{n}", f"pop{n % 5}", DAY0 + n) for n in range(50)]
                  + [("new:a-fan", "a0", DAY0 + 60), ("new:a-fan", "a1", DAY0 + 61), ("known", "b0", DAY0 + 62),
                     ("new:gone", "retired-item", DAY0 + 63)])
    serving = start_serving(param_server.address, redis_url, prefix)

    def answer(user: str) -> dict:
        reply = serving.get("/recommend", user_id=user, k=3)
        assert reply.status_code == 200, reply.text
        return reply.json()

    fan = answer("new:a-fan")
    assert fan["cold_start"] and fan["fold_in"] == 2
    assert {e["item_id"] for e in fan["items"]} == {"a2", "a3", "a4"}  # like a0 and a1, seen ones left out
    known = answer("known")  # a row: served from it as always
    assert not known["cold_start"] and known.get("fold_in") is None
    assert {e["item_id"] for e in known["items"]} < {"b1", "b2", "b3", "b4"}
    for user in ("new:gone", "new:nobody"):  # no event with a row, or no event at all: trending
        body = answer(user)
        assert body["cold_start"] and body.get("fold_in") is None
        assert {e["item_id"] for e in body["items"]} <= {f"pop{n}" for n in range(5)}
