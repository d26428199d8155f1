"""Exploration slots (issue 17, cold start): fresh items take a share of the answer, chosen by
Thompson sampling on the counts in Redis; real serving workers, parameter server and Redis."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamrec.param_server.client import ParamClient
from streamrec.serving.config import ServingConfig
from streamrec.serving.explore import ExplorationPool, closest, slots, thompson
from streamrec.serving.refresher import Refresher
from streamrec.trainer.online.exploration import ExplorationStore, FreshItems
from streamrec.trainer.online.feature_store import FeatureStore
from tests.exploration_credits import credits
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import StartServing, load_model, wait_for, write_history

DIM = 4


def test_the_share_of_slots_is_kept_on_average():
    rng = np.random.default_rng(0)
    assert slots(0.2, 10, rng) == 2 and slots(1.0, 10, rng) == 10 and slots(0.0, 10, rng) == 0
    assert abs(np.mean([slots(0.05, 10, rng) for _ in range(4000)]) - 0.5) < 0.05


def test_thompson_sampling_favours_items_that_were_clicked_and_keeps_trying_the_unshown():
    fresh = FreshItems(np.array(["good", "bad", "new", "barred"], object), np.array([200, 200, 0, 0]),
                       np.array([40, 1, 0, 0]), np.zeros(4), 0.0)
    eligible = np.array([True, True, True, False])
    rng = np.random.default_rng(1)
    wins = np.bincount([thompson(fresh, eligible, 1, 10.0, rng)[0][0] for _ in range(2000)], minlength=4)
    assert wins[3] == 0  # never an item the request may not show
    assert wins[0] > wins[2] > wins[1]  # 20% CTR beats the prior (~10%), which beats 0.5%
    assert wins[2] > 100  # an item never shown is still tried
    picks, draws = thompson(fresh, eligible, 3, 10.0, rng)
    assert sorted(picks.tolist()) == [0, 1, 2] and np.all(np.diff(draws) <= 0)


def test_the_draws_are_narrowed_to_the_best_scored_eligible_items():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    eligible = np.array([False, True, True, True, True])
    assert closest(scores, eligible, 2).tolist() == [False, True, True, False, False]  # 0 is not eligible
    assert closest(scores, eligible, 0) is eligible and closest(scores, eligible, 4) is eligible


def _world(ps: ParamClient, feature_store: FeatureStore, redis_url: str, prefix: str) -> ExplorationStore:
    items = {f"i{n}": np.array([1.0 - n / 20, 0, 0, 0], np.float32) for n in range(20)}
    items.update({"fresh-good": np.zeros(DIM, np.float32), "fresh-seen": np.zeros(DIM, np.float32)})
    load_model(ps, {"u1": np.array([1.0, 0, 0, 0], np.float32)}, items)
    write_history(feature_store, [("u1", "fresh-seen", 1.0)])
    explore = ExplorationStore.from_url(redis_url, prefix)
    ids = np.array(["fresh-good", "fresh-seen", "fresh-no-row"], object)
    explore.count(ids, np.array([50, 50, 0]), np.array([5.0, 5.0, 5.0]), 5.0, credits=credits(ids, [25, 25, 0]))
    return explore


def test_fresh_items_take_the_last_slots_never_seen_or_rowless_ones(
        param_server: ServerProcess, ps: ParamClient, feature_store: FeatureStore, redis_url: str, prefix: str,
        start_serving: StartServing) -> None:
    _world(ps, feature_store, redis_url, prefix)
    serving = start_serving(param_server.address, redis_url, prefix, extra_env={"STREAMREC_EXPLORE_SHARE": "0.2"})

    def answer() -> list[dict]:
        reply = serving.get("/recommend", user_id="u1", k=10)
        assert reply.status_code == 200, reply.text
        return reply.json()["items"]

    items = wait_for(lambda: (a := answer()) and a[-1]["sources"] == ["explore"] and a)
    # two slots, but fresh-seen is seen and fresh-no-row has no row yet: only fresh-good explores,
    # and the personal list keeps its first 9
    assert [entry["item_id"] for entry in items] == [*(f"i{n}" for n in range(9)), "fresh-good"]
    assert [entry["sources"] for entry in items].count(["explore"]) == 1
    metrics = serving.get("/metrics").text
    assert 'streamrec_serving_recommended_items_total{source="explore"}' in metrics


def test_an_arm_sets_its_own_share(param_server: ServerProcess, ps: ParamClient, feature_store: FeatureStore,
                                   redis_url: str, prefix: str, start_serving: StartServing, tmp_path: Path) -> None:
    _world(ps, feature_store, redis_url, prefix)
    spec = tmp_path / "experiments.yaml"
    spec.write_text("experiments: [{name: cold, arms: [{name: explore, explore: 0.1}]}]\n")
    serving = start_serving(param_server.address, redis_url, prefix, args=("--experiments", str(spec)),
                            extra_env={"STREAMREC_IMPRESSIONS": "off"})
    body = wait_for(lambda: (b := serving.get("/recommend", user_id="u1", k=10).json())
                    and b["items"][-1]["sources"] == ["explore"] and b)
    assert body["arm"] == "explore" and [e["item_id"] for e in body["items"]][-1] == "fresh-good"
    plain = serving.get("/recommend", user_id="u1", k=10, exclude_seen=False).json()  # fresh-seen allowed now
    assert plain["items"][-1]["item_id"] in {"fresh-good", "fresh-seen"}


def test_a_user_with_a_vector_explores_the_fresh_items_it_scores_highest(
        param_server: ServerProcess, ps: ParamClient, feature_store: FeatureStore, redis_url: str, prefix: str,
        start_serving: StartServing) -> None:
    """Five fresh items with the same counts: with one candidate, u1's slot always goes to the one
    its vector points at; with all five candidates, the draws spread over them."""
    items = {f"i{n}": np.array([1.0 - n / 20, 0, 0, 0], np.float32) for n in range(20)}
    fresh = ["fresh-near", *(f"fresh-far{n}" for n in range(4))]
    items.update({"fresh-near": np.array([0.45, 0, 0, 0], np.float32),
                  **{name: np.array([-1.0, 0, 0, 0], np.float32) for name in fresh[1:]}})
    load_model(ps, {"u1": np.array([1.0, 0, 0, 0], np.float32)}, items)
    write_history(feature_store, [("u1", "i19", 1.0)])
    ExplorationStore.from_url(redis_url, prefix).count(np.array(fresh, object), np.full(5, 20), np.full(5, 5.0), 5.0,
                                                      credits=credits(fresh, [2] * 5))

    def explored(serving) -> list[str]:
        wait_for(lambda: serving.get("/recommend", user_id="u1", k=10).json()["items"][-1]["sources"] == ["explore"])
        return [serving.get("/recommend", user_id="u1", k=10).json()["items"][-1]["item_id"] for _ in range(40)]

    env = {"STREAMREC_EXPLORE_SHARE": "0.1", "STREAMREC_EXPLORE_CANDIDATES": "1"}
    assert set(explored(start_serving(param_server.address, redis_url, prefix, extra_env=env))) == {"fresh-near"}
    spread = explored(start_serving(param_server.address, redis_url, prefix,
                                    extra_env={**env, "STREAMREC_EXPLORE_CANDIDATES": "0"}))
    assert len(set(spread)) >= 3 and spread.count("fresh-near") < 30


def test_counts_that_give_no_posterior_explore_nothing_rather_than_fail():
    fresh = FreshItems(np.array(["a", "b"], object), np.array([-1000, 5]), np.array([0, 9]), np.zeros(2), 0.0)
    picks, draws = thompson(fresh, np.ones(2, bool), 1, 10.0, np.random.default_rng(0))
    assert len(picks) == 0 and len(draws) == 0


def test_a_negative_counter_in_redis_neither_fails_a_request_nor_stops_exploring(
        param_server: ServerProcess, ps: ParamClient, feature_store: FeatureStore, redis_url: str, prefix: str,
        start_serving: StartServing) -> None:
    """A counter set by hand to -1000 made every exploring answer a 500 (a Beta draw with a < 0);
    it reads as 0 impressions now."""
    explore = _world(ps, feature_store, redis_url, prefix)
    explore.redis.hset(explore.keys.key("shown"), "fresh-good", -1000)
    serving = start_serving(param_server.address, redis_url, prefix, extra_env={"STREAMREC_EXPLORE_SHARE": "0.2"})

    def answer() -> list[dict]:
        reply = serving.get("/recommend", user_id="u1", k=10)
        assert reply.status_code == 200, reply.text
        return reply.json()["items"]

    assert wait_for(lambda: answer()[-1]["item_id"] == "fresh-good")
    assert all(answer()[-1]["sources"] == ["explore"] for _ in range(10))


def test_the_pool_reader_survives_a_counter_that_is_not_an_integer(redis_url: str, prefix: str) -> None:
    """int(b"1.5") ended the worker's pool thread for good: the pool then never changed again."""
    explore = ExplorationStore.from_url(redis_url, prefix)
    explore.count(np.array(["a", "b"], object), np.array([4, 4]), np.array([5.0, 5.0]), 5.0,
                  credits=credits(["a", "b"], [1, 1]))
    explore.redis.hset(explore.keys.key("clicks"), "a", "1.5")
    pool = ExplorationPool(ServingConfig(redis_url=redis_url, feature_prefix=prefix, explore_refresh_s=0.05)).start()
    try:
        wait_for(lambda: pool.reads >= 2)
        assert dict(zip(pool.fresh.ids.tolist(), pool.fresh.clicks.tolist())) == {"a": 0, "b": 1}  # read as 0
        explore.count(np.array(["c"], object), np.array([1]), np.array([6.0]), 6.0)
        wait_for(lambda: "c" in pool.fresh.ids.tolist())  # still re-reading
    finally:
        pool.close()


def test_a_refresher_goes_on_after_any_failed_read() -> None:
    class Flaky(Refresher):
        calls = 0

        def _read(self) -> None:
            self.calls += 1
            if self.calls <= 2:
                raise ValueError("a read that fails for a reason other than Redis")

    flaky = Flaky("flaky", 0.01).start()
    try:
        wait_for(lambda: flaky.reads >= 1)
    finally:
        flaky.close()
    assert flaky.failures == 2
