"""Typed hyperparameters, what each model exports for a refit, and the blend's array combiners."""

from pathlib import Path

import numpy as np
import pytest

from streamrec.core.params import ParamError, parse_params
from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models import create, load, model_class
from streamrec.trainer.models.combiners import BoostedTrees, RidgeCombiner
from streamrec.trainer.models.export import Export
from tests.trainer.synthetic import planted_log


@pytest.fixture(scope="module")
def log():
    return planted_log()


def test_params_are_typed_from_strings_and_unknown_or_mistyped_ones_are_refused():
    cls = model_class("bpr")
    typed = parse_params(cls.Params, ["factors=8", "lr=0.5", "negatives=uniform"], "bpr")
    assert cls(**typed.model_dump()).params == {**cls().params, "factors": 8, "lr": 0.5, "negatives": "uniform"}
    with pytest.raises(ParamError, match="facotrs.*known: .*factors"):
        create("bpr", facotrs=8)
    with pytest.raises(ParamError, match="negatives"):
        create("bpr", negatives="hard")  # not one of the samplers
    with pytest.raises(ParamError, match="factors"):
        create("als", factors="2.5")  # an int field refuses a fraction
    for name in ("mf-sgd", "svdpp", "timesvdpp", "neighborhood-factor"):  # the compiled epoch needs a step
        with pytest.raises(ParamError, match="batch_size.*greater than or equal to 1"):
            create(name, batch_size=0)
    for name, bad in (("item-knn", {"k": -1}), ("user-knn", {"min_k": -1}), ("neighborhood-factor", {"neighbors": 0})):
        with pytest.raises(ParamError, match=f"{next(iter(bad))}.*greater than or equal to"):
            create(name, **bad)


def test_bpr_exports_its_bias_as_the_item_scalar(log):
    model = create("bpr", factors=8, epochs=3, popularity_blend=0).fit(Interactions.from_log(log, implicit=True))
    export = model.export()
    np.testing.assert_array_equal(export.item_vectors, model.Q)
    np.testing.assert_array_equal(export.user_vectors, model.P)
    np.testing.assert_array_equal(export.item_biases, model.b)
    scores = export.user_vectors[:3] @ export.item_vectors.T + export.item_biases
    np.testing.assert_allclose(scores, model.user_scores(np.arange(3)), rtol=1e-5)
    assert export.neighbours is None and export.ranker is None


def test_factor_models_export_their_vectors_and_neighbour_models_their_lists(log):
    data = Interactions.from_log(log, implicit=True)
    als = create("als", factors=3, iterations=2, popularity_blend=0).fit(data).export()
    assert als.item_vectors.shape == (data.n_items, 3) and als.user_vectors.shape == (data.n_users, 3)
    assert als.item_biases is None and als.neighbours is None
    knn = create("item-knn", k=10).fit(data)
    lists = knn.export().neighbours
    assert lists.indices.shape == (data.n_items, data.n_items - 1)
    similar, _ = knn.similar_items(knn.items.ids[:1], 5)
    assert knn.items.ids[lists.indices[0, :5]].tolist() == similar[0].tolist()
    assert ((lists.indices >= 0) == (lists.scores > 0)).all()  # -1 exactly where there is no neighbour
    assert create("user-knn", k=10).fit(data).export() == Export()  # no item neighbourhood to publish
    assert create("popularity").fit(data).export() == Export()


@pytest.mark.parametrize(("name", "weight"), [("bpr", 0.5), ("als", 2.0), ("bpr", float("inf"))])
def test_the_popularity_blend_travels_in_the_vectors_serving_searches(log, name, weight):
    """Serving ranks by user . item (+ bias): with the blend folded in as one more coordinate it
    must rank exactly as the model's own `recommend`."""
    data = Interactions.from_log(log, implicit=True)
    model = create(name, factors=8, popularity_blend=weight).fit(data)
    export = model.export()
    assert export.item_vectors.shape[1] == export.user_vectors.shape[1] == model.item_vectors().shape[1] + 1 - (name == "bpr")
    served = export.user_vectors @ export.item_vectors.T + (0 if export.item_biases is None else export.item_biases)
    own = model.user_scores(np.arange(data.n_users))
    for u in range(data.n_users):  # same order: every pair of items compares the same way
        order = np.argsort(-own[u], kind="stable")
        assert (np.diff(served[u][order]) <= 1e-4 * (1 + np.abs(served[u]).max())).all(), u


def test_the_automatic_popularity_blend_ranks_implicit_fits_and_leaves_rating_fits_alone():
    """`auto` chooses the weight on a ranking fit and stays off on ratings: the weight would change
    no predicted rating, and choosing it scored every validation user against every item. The log
    has nothing but popularity (random users, Zipf items), so ranking fits lean on it."""
    rng = np.random.default_rng(0)
    n, weights = 8000, 1.0 / np.arange(1, 301)
    log = InteractionLog(user_id=np.array([f"u{u}" for u in rng.integers(0, 800, n)], object),
                         item_id=np.array([f"i{i}" for i in rng.choice(300, n, p=weights / weights.sum())], object),
                         rating=rng.integers(1, 6, n).astype(float), timestamp=np.arange(n, dtype=float))
    for name in ("item-knn", "user-knn"):
        assert create(name).fit(Interactions.from_log(log, implicit=True)).blend_weight > 0, name
        assert create(name).fit(Interactions.from_log(log)).blend_weight == 0.0, name
    assert create("item-knn", popularity_blend=0.5).fit(Interactions.from_log(log)).blend_weight == 0.5


def test_export_refuses_inconsistent_parts():
    with pytest.raises(ValueError, match="alongside item vectors"):
        Export(user_vectors=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="dimensions"):
        Export(item_vectors=np.zeros((4, 3)), user_vectors=np.zeros((2, 5)))
    with pytest.raises(ValueError, match="biases"):
        Export(item_vectors=np.zeros((4, 3)), item_biases=np.zeros(3))


def test_array_combiners_predict_exactly_like_sklearn():
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4))
    X[rng.random(X.shape) < 0.05] = np.nan  # missing values take each split's learned side
    y = np.nansum(X, axis=1) + rng.normal(size=len(X))
    test = rng.normal(size=(500, 4))
    test[:20, 1] = np.nan
    trees = BoostedTrees.fit(X, y, iterations=50, seed=0)
    reference = HistGradientBoostingRegressor(max_iter=50, random_state=0).fit(X, y)
    np.testing.assert_array_equal(trees.predict(test), reference.predict(test))
    np.testing.assert_array_equal(BoostedTrees.from_state(trees.state()).predict(test), reference.predict(test))
    dense, clean = np.nan_to_num(X), np.nan_to_num(test)
    ridge = RidgeCombiner.fit(dense, y, alpha=1.0)
    np.testing.assert_array_equal(ridge.predict(clean), Ridge(alpha=1.0).fit(dense, y).predict(clean))


def test_blend_round_trips_with_every_member_and_both_combiners(log, tmp_path: Path):
    model = create("blend", members="mf-sgd,item-knn", combiner="gbt", gbt_iterations=30).fit(Interactions.from_log(log))
    loaded = load(model.save(tmp_path / "blend"))
    users = model.users.index(np.repeat(np.unique(log.user_id)[:6], 5))
    items = model.items.index(np.tile(np.unique(log.item_id)[:5], 6))
    expected, restored = model.member_scores(users, items), loaded.member_scores(users, items)
    assert set(expected) == {"mf-sgd", "item-knn", "blend-ridge", "blend-gbt"} == set(restored)
    for name in expected:
        np.testing.assert_array_equal(restored[name], expected[name], err_msg=name)
    assert loaded.params == model.params


def test_the_blend_fits_its_members_on_threads_with_the_same_result_as_one_thread(log):
    """Members fit concurrently (both fits of each at once): every member draws from its own
    generator, so scheduling cannot change a prediction; the rbm member also holds torch on one
    thread while the others run, and the last fit out restores torch's own count."""
    import torch

    before = torch.get_num_threads()
    data = Interactions.from_log(log)
    members = "mf-sgd,item-knn,rbm,svdpp"
    alone = create("blend", members=members, workers=1, gbt_iterations=20).fit(data)
    threaded = create("blend", members=members, workers=3, gbt_iterations=20).fit(data)
    assert torch.get_num_threads() == before
    users = alone.users.index(np.repeat(np.unique(log.user_id)[:8], 6))
    items = alone.items.index(np.tile(np.unique(log.item_id)[:6], 8))
    expected, got = alone.member_scores(users, items), threaded.member_scores(users, items)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert set(threaded.member_fit_seconds) == set(members.split(","))
    with pytest.raises(ParamError, match="workers"):
        create("blend", workers=-1)


def test_the_automatic_combiner_takes_the_one_that_predicts_the_other_half_better(log, tmp_path: Path):
    blend = create("blend", gbt_iterations=50)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 3))
    support = rng.normal(size=(4000, 2))
    linear = X @ np.array([0.5, 0.3, 0.2]) + 0.1 * rng.normal(size=4000)
    assert blend._choose_combiner(X, np.column_stack([X, support]), linear) == "ridge"
    bent = np.where(support[:, 0] > 0, X[:, 0], -X[:, 1]) + 0.1 * rng.normal(size=4000)  # no linear mix fits it
    assert blend._choose_combiner(X, np.column_stack([X, support]), bent) == "gbt"

    model = create("blend", members="mf-sgd,item-knn", gbt_iterations=30).fit(Interactions.from_log(log))
    loaded = load(model.save(tmp_path / "auto"))
    assert loaded.combiner == model.combiner in ("ridge", "gbt")
    users = model.users.index(np.repeat(np.unique(log.user_id)[:6], 5))
    items = model.items.index(np.tile(np.unique(log.item_id)[:5], 6))
    np.testing.assert_array_equal(loaded.pair_scores(users, items), model.pair_scores(users, items))
    np.testing.assert_array_equal(model.pair_scores(users, items), model.member_scores(users, items)[f"blend-{model.combiner}"])
