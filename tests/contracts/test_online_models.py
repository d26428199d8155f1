"""The contract every registered online model keeps: learn, then score, then a state round trip.

Discovered from the registry, like the batch contract: registering a model is all it takes.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamrec.param_server.local_store import LocalStore
from streamrec.stream.events import EventBatch
from streamrec.stream.loaders import InteractionLog
from streamrec.trainer import registry
from streamrec.trainer.online.base import OnlineRecommender
from tests.contracts.conftest import small_params

ONLINE = [name for name in registry.names() if issubclass(registry.model_class(name), OnlineRecommender)]


def learned(name: str, log: InteractionLog, seed: int = 0, store: LocalStore | None = None) -> OnlineRecommender:
    """A model that has learned the log in batches of 50 events."""
    cls = registry.model_class(name)
    model = cls(store=store, **small_params(cls.Params, seed))
    events = EventBatch.from_log(log)
    for start in range(0, len(events), 50):
        model.learn_many(events.take(slice(start, start + 50)))
    return model


def test_the_registry_has_online_models() -> None:
    assert {"online-bpr", "online-mf", "online-popularity"} <= set(ONLINE)


@pytest.mark.parametrize("name", ONLINE)
def test_learn_then_score(name: str, log: InteractionLog) -> None:
    model = learned(name, log)
    users = np.array([*np.unique(log.user_id)[:5], "cold:user"], dtype=object)
    result = model.score_users(users)
    assert result.scores.shape == (len(users), len(result.item_ids))
    assert set(result.item_ids) == set(log.item_id), "every item of the stream is known, nothing else"
    assert np.isfinite(result.scores).all(), "known items score finitely, for cold users too"


@pytest.mark.parametrize("name", ONLINE)
def test_learning_changes_scores(name: str, log: InteractionLog) -> None:
    half = log.take(np.arange(len(log) // 2))
    early, late = learned(name, half), learned(name, log)
    users = np.unique(half.user_id)[:5]
    before, after = early.score_users(users), late.score_users(users)
    columns = after.item_ids.get_indexer(before.item_ids)
    assert not np.allclose(before.scores, after.scores[:, columns])


@pytest.mark.parametrize("name", ONLINE)
def test_same_seed_same_scores(name: str, log: InteractionLog) -> None:
    users = np.unique(log.user_id)[:8]
    first, second = learned(name, log).score_users(users), learned(name, log).score_users(users)
    assert list(first.item_ids) == list(second.item_ids)
    np.testing.assert_allclose(first.scores, second.scores, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ONLINE)
def test_state_round_trip(name: str, log: InteractionLog) -> None:
    """A restarted model (a new instance on the same tables, given the state saved beside the
    offsets) scores exactly like the one that learned."""
    model = learned(name, log)
    cls = registry.model_class(name)
    restarted = cls(store=model.store, **small_params(cls.Params))
    restarted.restore(model.state())
    users = np.array([*np.unique(log.user_id)[:8], "cold:user"], dtype=object)
    original, again = model.score_users(users), restarted.score_users(users)
    np.testing.assert_array_equal(np.sort(np.asarray(again.item_ids)), np.sort(np.asarray(original.item_ids)))
    columns = again.item_ids.get_indexer(original.item_ids)
    np.testing.assert_allclose(again.scores[:, columns], original.scores, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ONLINE)
def test_unknown_parameters_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="no_such_knob"):
        registry.model_class(name)(no_such_knob=1)
