"""Every batch model through the one interface, on small synthetic data with planted groups."""

from pathlib import Path

import numpy as np
import pytest

from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.interactions import IdIndex, Interactions
from streamrec.trainer.models import ModelFileError, create, load
from streamrec.trainer.registry import names as registered_names
from tests.trainer.synthetic import group_of, planted_log

# Small settings so the suite stays quick; defaults are exercised on MovieLens (slow). The ranking
# models run without the popularity blend: planted_log's last event per user is always an off-group
# item, so their validation split (rightly) prefers popularity, and these tests are about what the
# models themselves learn (the blend has its own contract: tests/contracts/test_never_below_popularity.py).
FAST = {
    "popularity": {},
    "user-knn": {"k": 10, "popularity_blend": 0},
    "item-knn": {"k": 10, "popularity_blend": 0},
    "amazon-i2i": {"k": 10, "popularity_blend": 0},
    "sknn": {"k": 20, "popularity_blend": 0},
    "vsknn": {"k": 20, "popularity_blend": 0},
    "mf-sgd": {"factors": 8, "epochs": 30, "lr": 0.02, "batch_size": 32},
    "svdpp": {"factors": 8, "epochs": 30, "lr": 0.02, "lr_bias": 0.02, "lr_decay": 1.0, "batch_size": 32},
    "timesvdpp": {"factors": 8, "epochs": 30, "lr": 0.02, "lr_bias": 0.02, "lr_decay": 1.0, "batch_size": 32, "bins": 4},
    "neighborhood-factor": {"factors": 8, "epochs": 30, "lr": 0.02, "lr_bias": 0.02, "lr_decay": 1.0, "batch_size": 32, "neighbors": 10},
    "als": {"factors": 3, "iterations": 8, "alpha": 5.0, "popularity_blend": 0},
    "bpr": {"factors": 8, "epochs": 40, "lr": 0.05, "batch_size": 64, "popularity_blend": 0},
    "rbm": {"hidden": 16, "epochs": 30, "batch_size": 8, "lr": 0.05},
    "blend": {"members": "mf-sgd,item-knn"},
}
IMPLICIT = ["popularity", "user-knn", "item-knn", "amazon-i2i", "sknn", "vsknn", "als", "bpr"]
EXPLICIT = ["user-knn", "item-knn", "mf-sgd", "svdpp", "timesvdpp", "neighborhood-factor", "rbm", "blend"]


@pytest.fixture(scope="module")
def log():
    return planted_log()


def _fit(name, log, implicit, seed=0):
    params = dict(FAST[name])
    model = create(name, **params)
    if "seed" in model.params:
        model = create(name, **params, seed=seed)
    return model.fit(Interactions.from_log(log, implicit=implicit))


def test_every_registered_classical_family_is_covered_here():
    """Every registered batch model outside the neural package has FAST settings (so each one is
    exercised below), and FAST names no model that is not registered."""
    classical = set(registered_names("streamrec.trainer.models")) - set(registered_names("streamrec.trainer.models.neural"))
    assert set(FAST) == classical


@pytest.mark.parametrize("name", [n for n in IMPLICIT if n != "popularity"])
def test_implicit_models_recover_groups(name, log):
    model = _fit(name, log, implicit=True)
    users = np.unique(log.user_id)
    recommended, _ = model.recommend(users, 5)
    same_group = group_of(recommended) == group_of(users)[:, None]
    assert same_group.mean() > 0.8, f"{name}: {same_group.mean():.2f}"


@pytest.mark.parametrize("name", EXPLICIT)
def test_explicit_models_recover_ratings(name, log):
    model = _fit(name, log, implicit=False)
    users = np.unique(log.user_id)
    items = np.unique(log.item_id)
    grid_u, grid_i = np.repeat(users, len(items)), np.tile(items, len(users))
    scores = model.score(grid_u, grid_i, np.full(len(grid_u), 1_200_000.0))
    same = group_of(grid_u) == group_of(grid_i)
    assert scores[same].mean() - scores[~same].mean() > 1.0, name


@pytest.mark.parametrize("name", sorted(FAST))
def test_save_load_round_trip_and_determinism(name, log, tmp_path: Path):
    implicit = not create(name).capabilities.explicit
    model = _fit(name, log, implicit=implicit)
    users = np.r_[np.unique(log.user_id)[:5], ["never-seen-user"]]
    items = np.r_[np.unique(log.item_id)[:5], ["never-seen-item"]]
    stamps = np.full(len(users), 1_100_000.0)
    loaded = load(model.save(tmp_path / name))
    np.testing.assert_array_equal(model.score(users, items, stamps), loaded.score(users, items, stamps))
    ids, scores = model.recommend(users, 4)
    ids2, scores2 = loaded.recommend(users, 4)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(scores, scores2)
    again = _fit(name, log, implicit=implicit)
    np.testing.assert_array_equal(model.score(users, items, stamps), again.score(users, items, stamps))
    assert np.isfinite(model.score(users, items, stamps)).all()


@pytest.mark.parametrize("name", ["popularity", "als", "item-knn"])
def test_unseen_users_get_fallback_and_seen_items_are_excluded(name, log):
    model = _fit(name, log, implicit=True)
    ids, _ = model.recommend(["never-seen-user", "user-001"], 5)
    assert len(set(ids[0])) == 5
    seen = set(log.item_id[log.user_id == "user-001"])
    assert not seen & set(ids[1])


def test_similar_items_and_because(log):
    model = _fit("amazon-i2i", log, implicit=True)
    similar, sims = model.similar_items(["item-000x"], 5)
    assert (group_of(similar) == 0).mean() >= 0.8 and (np.diff(sims[0]) <= 0).all()
    recommended, _ = model.recommend(["user-000"], 3)
    reasons = model.because("user-000", recommended[0])
    history = set(log.item_id[log.user_id == "user-000"])
    assert all(r in history for r in reasons if r is not None) and any(reasons)
    als = _fit("als", log, implicit=True)
    assert als.similar_items(["item-001x"], 3)[0].shape == (1, 3)


def test_bpr_floors_the_draws_of_short_histories_only_where_histories_are_short() -> None:
    """`min_user_samples`: a user with n < floor pairs has each drawn ceil(floor / n) times per
    epoch; `auto` sets the floor (20) only when the median user has fewer than 4 pairs."""
    from streamrec.trainer.models.bpr import user_repeats

    sessions = np.repeat(np.arange(4), [2, 3, 3, 25])  # median 3 pairs: floor on
    assert user_repeats(sessions, 4, "auto").tolist() == [10] * 2 + [7] * 6 + [1] * 25
    histories = np.repeat(np.arange(3), [4, 30, 30])  # median 30: floor off
    assert user_repeats(histories, 3, "auto").tolist() == [1] * 64
    assert user_repeats(histories, 3, 8).tolist() == [2] * 4 + [1] * 60
    assert user_repeats(histories, 3, 0).tolist() == [1] * 64


def _resave(source: Path, target: Path, change) -> Path:
    """A copy of the saved model at `source` with its arrays changed by `change(arrays)`."""
    target.mkdir(parents=True)
    (target / "meta.json").write_text((source / "meta.json").read_text())
    with np.load(source / "arrays.npz") as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(target / "arrays.npz", **arrays)
    return target


@pytest.mark.parametrize(("name", "array"), [("als", "model.Y"), ("bpr", "model.Q"), ("mf-sgd", "model.P"),
                                             ("item-knn", "model.sim_indptr"), ("svdpp", "model.bi"),
                                             ("blend", "model.gbt.left")])
def test_a_saved_model_whose_arrays_do_not_fit_together_is_refused_at_load(name, array, log, tmp_path: Path):
    """`load` used to check only that each array existed: a model folder with one array from
    another fit loaded, then failed or answered garbage at its first query, far from the cause."""
    model = _fit(name, log, implicit=not create(name).capabilities.explicit)
    saved = model.save(tmp_path / "good")
    assert load(saved).n_items == model.n_items
    with np.load(saved / "arrays.npz") as data:
        assert array in data.files, sorted(data.files)

    def drop_last_row(arrays: dict[str, np.ndarray]) -> None:
        arrays[array] = arrays[array][:-1]

    with pytest.raises(ModelFileError, match="do not fit together|scores"):
        load(_resave(saved, tmp_path / "short", drop_last_row))


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.update(popularity=a["popularity"][:-1]), "popularity has"),
    (lambda a: a.update(seen_indices=a["seen_indices"] + 1000), "outside the"),
    (lambda a: a.update(seen_indptr=a["seen_indptr"][::-1].copy()), "does not cover"),
    (lambda a: a.update(_ids_with_a_repeat(a, "items")), "appears twice"),
    (lambda a: a.pop("users_bytes"), "no users ids"),
    (lambda a: a.update(items_offsets=a["items_offsets"][::-1].copy()), "do not split"),
    (lambda a: a.update(users_bytes=np.full(len(a["users_bytes"]), 0xFF, np.uint8)), "not UTF-8"),
])
def test_the_arrays_every_model_saves_are_checked_against_each_other(change, message, log, tmp_path: Path):
    saved = _fit("als", log, implicit=True).save(tmp_path / "good")
    with pytest.raises(ModelFileError, match=message):
        load(_resave(saved, tmp_path / "bad", change))


def _ids_with_a_repeat(arrays: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    ids = IdIndex.from_arrays(arrays, name).ids
    return IdIndex.from_ordered(np.r_[ids[:-1], ids[:1]]).to_arrays(name)


def test_ids_are_saved_as_they_are_and_as_small_as_they_are(tmp_path: Path):
    """Ids were saved as numpy string arrays: each row as wide as the longest id, so one id of
    10,000 characters made this 200-user model's file 8 MB; and an id's trailing NUL characters
    were cut, so "u1" and "u1\\0" were indexed as one user (their events merged)."""
    users = ["u1", "u1\x00", "a:b", "ü" * 3, "x" * 10_000] + [f"u{n}" for n in range(2, 200)]
    rng = np.random.default_rng(0)
    user = np.repeat(np.array(users, dtype=object), 5)
    item = np.array([f"i{n}" for n in rng.integers(0, 50, len(user))], dtype=object)
    log = InteractionLog(user, item, np.full(len(user), np.nan), np.arange(len(user), dtype=np.float64))
    model = create("popularity").fit(Interactions.from_log(log, implicit=True))
    assert len(model.users) == len(users) and {"u1", "u1\x00"} <= set(model.users.ids)
    saved = model.save(tmp_path / "model")
    assert (saved / "arrays.npz").stat().st_size < 100_000
    back = load(saved)
    assert list(back.users.ids) == list(model.users.ids) and list(back.items.ids) == list(model.items.ids)


def test_a_model_saved_with_string_arrays_of_ids_still_loads(log, tmp_path: Path):
    """Model folders from before the ids were bytes and offsets carry them as `users`/`items`."""
    model = _fit("als", log, implicit=True)

    def legacy(arrays: dict[str, np.ndarray]) -> None:
        for name, index in (("users", model.users), ("items", model.items)):
            del arrays[f"{name}_bytes"], arrays[f"{name}_offsets"]
            arrays[name] = index.ids.astype(str)

    back = load(_resave(model.save(tmp_path / "new"), tmp_path / "old", legacy))
    assert list(back.users.ids) == list(model.users.ids)
    assert np.allclose(back.user_scores(np.arange(3)), model.user_scores(np.arange(3)))


def test_a_folder_that_is_not_a_saved_model_is_refused_with_its_path(log, tmp_path: Path):
    saved = _fit("popularity", log, implicit=True).save(tmp_path / "good")
    (saved / "arrays.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelFileError, match="not a saved model"):
        load(saved)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text('{"format_version": 1, "model": "no-such-model"}')
    (tmp_path / "other" / "arrays.npz").write_bytes((tmp_path / "good" / "meta.json").read_bytes())
    with pytest.raises(ModelFileError, match="not a saved model"):
        load(tmp_path / "other")
    np.savez(tmp_path / "other" / "arrays.npz", users=np.array(["u"]))
    with pytest.raises(ModelFileError, match="unknown model 'no-such-model'"):
        load(tmp_path / "other")
