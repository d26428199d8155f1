"""Neural families: they learn planted structure, gradients flow, persistence and export round-trip.

Synthetic data: users and items in 4 groups; each user walks 10 consecutive steps of their group's
item cycle (one minute apart), so the next item is predictable from group (collaborative models)
and from order (sequence models), while popularity is flat.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from streamrec.stream.loaders import InteractionLog, time_order
from streamrec.trainer.evaluation.splits import leave_last_out
from streamrec.trainer.evaluation.topn import ranking_metrics, run_topn
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models import create, load
from streamrec.trainer import registry

NEURAL_MODELS = registry.names("streamrec.trainer.models.neural")

GROUPS, PER_GROUP, USERS, STEPS = 4, 15, 160, 10
FAST = {"epochs": 12, "batch_size": 64, "patience": 0, "seed": 0, "threads": 1}
PER_MODEL = {
    "ncf-gmf": {"lr": 0.01}, "ncf-mlp": {"lr": 0.01}, "neumf": {"lr": 0.01, "pretrain_lr": 0.05},
    "wide-deep": {"lr": 0.01}, "deepfm": {"lr": 0.01}, "dcn": {"lr": 0.01}, "dcn-v2": {"lr": 0.01},
    "youtube-dnn": {"negatives": 32, "lr": 0.005, "hidden": "32"}, "dssm": {"hidden": "64,32", "buckets": 512, "lr": 0.005},
    "gru4rec": {"batch_size": 16, "negatives": 16, "hidden": 32, "dim": 32, "lr": 0.01},
    "caser": {"lr": 0.005, "dim": 16},
}


def planted_sequences(seed: int = 0) -> InteractionLog:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(USERS):
        group, start = u % GROUPS, rng.integers(PER_GROUP)
        for step in range(STEPS):
            item = group * PER_GROUP + (start + step) % PER_GROUP
            rows.append((f"u{u}", f"i{item}", np.nan, 1_000_000.0 + 7200.0 * u + 60.0 * step))
    users, items, ratings, stamps = (np.array(c) for c in zip(*rows))
    log = InteractionLog(users.astype(object), items.astype(object), ratings.astype(float), stamps.astype(float))
    return log.take(time_order(log))


def fast_params(name: str, **extra: object) -> dict:
    return {**FAST, **PER_MODEL[name], **extra}


@pytest.fixture(scope="module")
def log() -> InteractionLog:
    return planted_sequences()


@pytest.fixture(scope="module")
def popularity_hr(log: InteractionLog) -> float:
    return run_topn(lambda: create("popularity"), log)["metrics"]["hr@10"]


@pytest.mark.parametrize("name", sorted(NEURAL_MODELS))
def test_beats_popularity_on_planted_data(name: str, log: InteractionLog, popularity_hr: float) -> None:
    hr = run_topn(lambda: create(name, **fast_params(name)), log)["metrics"]["hr@10"]
    assert hr > popularity_hr + 0.2, (name, hr, popularity_hr)


@pytest.fixture(scope="module")
def fitted(log: InteractionLog) -> dict:
    """Every model after two epochs on the planted data (persistence and API checks)."""
    data = Interactions.from_log(log, implicit=True)
    return {name: create(name, **fast_params(name, epochs=2)).fit(data) for name in sorted(NEURAL_MODELS)}


@pytest.mark.parametrize("name", sorted(NEURAL_MODELS))
def test_save_load_round_trip(name: str, fitted: dict, tmp_path) -> None:
    model = fitted[name]
    users = model.users.ids[:7]
    restored = load(model.save(tmp_path / name))
    np.testing.assert_allclose(restored.user_scores(np.arange(7)), model.user_scores(np.arange(7)), rtol=1e-5, atol=1e-6)
    assert (restored.recommend(users, 5)[0] == model.recommend(users, 5)[0]).all()


@pytest.mark.parametrize("name", sorted(NEURAL_MODELS))
def test_shapes_and_gradients_flow(name: str, log: InteractionLog) -> None:
    """One mini-batch: finite loss, a gradient on every parameter, (users x items) scores."""
    data = Interactions.from_log(log, implicit=True)
    model = create(name, **fast_params(name, epochs=1))
    model.fit(data)
    model.module.train()
    batch = next(iter(model._batches(np.random.default_rng(1))))
    loss = model._loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.module.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.user_scores(np.arange(5)).shape == (5, data.n_items)


def test_same_seed_same_model(log: InteractionLog) -> None:
    data = Interactions.from_log(log, implicit=True)
    for name in ("gru4rec", "deepfm"):
        a = create(name, **fast_params(name, epochs=2)).fit(data).user_scores(np.arange(10))
        b = create(name, **fast_params(name, epochs=2)).fit(data).user_scores(np.arange(10))
        np.testing.assert_array_equal(a, b)


def test_early_stopping_keeps_best_epoch(log: InteractionLog) -> None:
    """Training stops `patience` epochs after the best validation ndcg@10, and the weights kept
    are that epoch's: the fitted model scores exactly the best ndcg@10 on the validation events."""
    data = Interactions.from_log(log, implicit=True)
    patience, epochs = 2, 40
    model = create("ncf-gmf", **fast_params("ncf-gmf", epochs=epochs, patience=patience)).fit(data)
    val = [h["val_ndcg@10"] for h in model.history]
    best = int(np.argmax(val))  # the first best: a later tie is not an improvement
    assert len(val) == best + 1 + patience < epochs  # stopped early, exactly `patience` epochs after the best
    assert val[-1] < val[best]  # the last epoch was worse: keeping the last weights would show below
    _, validation = leave_last_out(data)  # each user's last event (all of them: fewer users than val_users)
    kept = ranking_metrics(model, data.user_idx[validation], data.item_idx[validation])["ndcg@10"]
    assert kept == val[best]
