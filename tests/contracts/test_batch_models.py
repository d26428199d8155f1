"""The contract every registered batch model keeps, checked on tiny synthetic data.

Discovered from the registry: registering a model is all it takes to be checked here.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest

from streamrec.stream.loaders import InteractionLog
from streamrec.trainer import registry
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models import load
from streamrec.trainer.models.base import Recommender
from tests.contracts.conftest import small_params, synthetic_log

BATCH = [name for name in registry.names() if issubclass(registry.model_class(name), Recommender)]
K = 5


def _data(cls: type[Recommender], log: InteractionLog) -> Interactions:
    return Interactions.from_log(log, implicit=not cls.capabilities.explicit)


@cache
def fitted(name: str, seed: int = 0) -> Recommender:
    cls = registry.model_class(name)
    return cls(**small_params(cls.Params, seed)).fit(_data(cls, synthetic_log()))


def test_the_registry_has_batch_models() -> None:
    assert {"popularity", "als", "item-knn", "blend", "gru4rec"} <= set(BATCH)


@pytest.mark.parametrize("name", BATCH)
def test_shapes_and_finite_scores(name: str) -> None:
    model = fitted(name)
    users = model.users.ids[:7]
    ids, scores = model.recommend(users, k=K)
    assert ids.shape == (7, K) and scores.shape == (7, K)
    assert np.all(np.diff(scores, axis=1) <= 1e-9), "best first"
    dense = model.user_scores(model.users.index(users))
    assert dense.shape == (7, model.n_items)
    assert np.isfinite(dense).all()
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("name", BATCH)
def test_seen_items_are_never_recommended(name: str, log: InteractionLog) -> None:
    model = fitted(name)
    ids, _ = model.recommend(model.users.ids, k=K)
    seen: dict[str, set[str]] = {}
    for user, item in zip(log.user_id, log.item_id):
        seen.setdefault(user, set()).add(item)
    for user, row in zip(model.users.ids, ids):
        assert not seen[user] & set(row), f"{name} recommended an item {user} already had"


@pytest.mark.parametrize("name", BATCH)
def test_cold_users_and_items_are_answered(name: str) -> None:
    model = fitted(name)
    ids, scores = model.recommend(np.array(["never-seen user", "x" * 10_000], dtype=object), k=K)
    assert ids.shape == (2, K) and np.isfinite(scores).all()
    assert set(ids.ravel()) <= set(model.items.ids)
    known_user, known_item = model.users.ids[0], model.items.ids[0]
    pairs = model.score([known_user, "cold:user", known_user], [known_item, known_item, "cold:item"])
    assert pairs.shape == (3,) and np.isfinite(pairs).all()


@pytest.mark.parametrize("name", BATCH)
def test_same_seed_same_model(name: str) -> None:
    first = fitted(name)
    cls = registry.model_class(name)
    again = cls(**small_params(cls.Params, 0)).fit(_data(cls, synthetic_log()))
    users = first.users.index(first.users.ids)
    np.testing.assert_allclose(again.user_scores(users), first.user_scores(users), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BATCH)
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    model = fitted(name)
    restored = load(model.save(tmp_path / name))
    assert type(restored) is type(model) and restored.params == model.params
    users = np.array([*model.users.ids[:5], "cold"], dtype=object)
    np.testing.assert_array_equal(restored.recommend(users, K)[0], model.recommend(users, K)[0])
    np.testing.assert_allclose(restored.user_scores(model.users.index(users)),
                               model.user_scores(model.users.index(users)), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", BATCH)
def test_unknown_parameters_are_refused(name: str) -> None:
    cls = registry.model_class(name)
    with pytest.raises(ValueError, match="no_such_knob"):
        cls(no_such_knob=1)
