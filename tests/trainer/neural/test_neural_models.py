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
from streamrec.trainer import registry
from streamrec.trainer.evaluation.splits import distinct_pairs, leave_last_out
from streamrec.trainer.evaluation.topn import run_topn, validation_ndcg
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models import create, load

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
    """Training stops `patience` epochs after the best validation ndcg@10 of the ranking served
    (the raw scores under the popularity blend's best weight), and the weights kept are that epoch's: without the refit, the fitted model scores exactly the
    best figure on the validation events."""
    data = Interactions.from_log(log, implicit=True)
    patience, epochs = 2, 40
    # without the pooled history: after `fit` it holds every event, the validation ones included
    model = create("ncf-gmf", **fast_params("ncf-gmf", epochs=epochs, patience=patience, refit=False,
                                            user_history=False)).fit(data)
    val = [h["val_blend_ndcg@10"] for h in model.history]
    assert all(h["val_blend_ndcg@10"] >= h["val_ndcg@10"] for h in model.history)  # weight 0 is on the grid
    best = int(np.argmax(val))  # the first best: a later tie is not an improvement
    assert len(val) == best + 1 + patience < epochs  # stopped early, exactly `patience` epochs after the best
    assert val[-1] < val[best]  # the last epoch was worse: keeping the last weights would show below
    _, validation = leave_last_out(data)  # each user's last event (all of them: fewer users than val_users)
    assert validation_ndcg(model, data.user_idx[validation], data.item_idx[validation]).blended == val[best]


def test_the_refit_trains_a_fresh_network_on_every_event_for_the_best_epoch_count(log: InteractionLog) -> None:
    """After early stopping, `refit` trains again from the same initial weights on every event,
    the validation events included, for as many epochs as validated best; without it the
    network never learns from each user's latest event."""
    data = Interactions.from_log(log, implicit=True)
    params = fast_params("ncf-gmf", epochs=40, patience=2)
    refitted, kept = create("ncf-gmf", **params).fit(data), create("ncf-gmf", **params, refit=False).fit(data)
    validated = [h for h in refitted.history if "refit" not in h]
    timeless = [{k: v for k, v in h.items() if k != "seconds"} for h in (*validated, *kept.history)]
    assert timeless[: len(validated)] == timeless[len(validated) :]  # the same validation run
    best = int(np.argmax([h["val_blend_ndcg@10"] for h in validated])) + 1
    assert [h["epoch"] for h in refitted.history if "refit" in h] == list(range(1, best + 1))
    assert len(refitted.pos_users) == len(data.pair_view()[0]) > len(kept.pos_users)
    # each user's latest event: a positive of the refit, never seen by the kept weights
    _, latest = leave_last_out(data)
    users, items = data.user_idx[latest], data.item_idx[latest]

    def latest_rank(model: object) -> float:
        scores = model.user_scores(users, blended=False)
        return float(np.mean((scores > scores[np.arange(len(users)), items][:, None]).sum(axis=1)))

    assert latest_rank(refitted) < latest_rank(kept)


def test_training_goes_on_while_the_model_is_no_better_than_popularity() -> None:
    """On a log without structure (every event a draw from one Zipf law), the blend never beats
    popularity alone on validation, so the patience is three times as long: the fit goes on for
    three flat epochs where the raw scores alone stop after one."""
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 300, 4000), np.minimum(rng.zipf(1.5, 4000), 200)
    log = InteractionLog(np.char.add("u", users.astype(str)).astype(object), np.char.add("i", items.astype(str)).astype(object),
                         np.full(4000, np.nan), 1_000_000.0 + np.arange(4000.0))
    data = Interactions.from_log(distinct_pairs(log), implicit=True)
    model = create("ncf-gmf", **fast_params("ncf-gmf", epochs=8, patience=1, refit=False)).fit(data)
    flat = [h["val_blend_ndcg@10"] for h in model.history]
    assert len(flat) == 1 + 3 and len(set(flat)) == 1  # the first epoch, then three without a gain
    raw = create("ncf-gmf", **fast_params("ncf-gmf", epochs=8, patience=1, refit=False, popularity_blend=0)).fit(data)
    best = int(np.argmax([h["val_ndcg@10"] for h in raw.history]))
    assert len(raw.history) == best + 2 < 8
