"""Building blocks of the neural families: FM term, log-Q correction, sessions, side features,
ranker export and two-tower vectors."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.features import load_side_features, trigram_bags
from streamrec.trainer.interactions import IdIndex, Interactions
from streamrec.trainer.models import create, load
from streamrec.trainer.models.neural.ctr import CTRNet, fm_second_order, load_ranker
from streamrec.trainer.models.neural.history import HistoryPooling
from streamrec.trainer.models.neural.losses import LogQSampler, sampled_softmax
from streamrec.trainer.models.neural.ncf import NCFNet
from streamrec.trainer.models.neural.sequential import sessions
from streamrec.trainer.models.neural.training import int_list
from tests.trainer.neural.test_neural_models import fast_params, planted_sequences


def test_fm_second_order_equals_pairwise_sum() -> None:
    fields = torch.randn(5, 7, 4, dtype=torch.float64)
    explicit = sum((fields[:, i] * fields[:, j]).sum(1) for i, j in itertools.combinations(range(7), 2))
    torch.testing.assert_close(fm_second_order(fields), explicit)


def random_weights(net: torch.nn.Module) -> None:
    """Weights far from their initial near-zero scale, so that every term of a logit counts."""
    torch.manual_seed(0)
    for weight in net.parameters():
        torch.nn.init.normal_(weight, std=0.3)


@pytest.mark.parametrize(("gmf", "use_mlp", "history", "tower"),
                         [(True, False, True, "16,8,4"), (False, True, False, "16,8,4"), (False, True, True, "16,8,4"),
                          (True, True, True, "16,8,4"), (False, True, True, "16"), (True, True, False, "16")])
def test_ncf_scores_every_item_as_its_pairs_would_be_scored(gmf: bool, use_mlp: bool, history: bool,
                                                            tower: str) -> None:
    """The factorised all-item scoring (first tower layer split by side) is the pairwise forward,
    with a tower and with none (one width: the output layer reads the concatenation)."""
    net = NCFNet(50, 300, 8, int_list(tower), gmf, use_mlp, history).eval()
    random_weights(net)
    for pooling in (net.gmf_history if gmf else None, net.mlp_history if use_mlp else None):
        if pooling is not None:
            pooling.attach(sp.random(50, 300, density=0.05, format="csr", random_state=0), torch.device("cpu"))
    users = torch.arange(50)
    with torch.no_grad():
        pairs = net(users[:, None].expand(-1, 300), torch.arange(300)[None, :].expand(50, -1))
        torch.testing.assert_close(net.all_item_logits(users), pairs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "side", "hidden", "history"),
                         list(itertools.product(["dcn", "dcn-v2", "deepfm", "wide-deep"], [False, True], ["16,8", ""],
                                                [False, True])))
def test_ctr_heads_score_every_item_as_their_pairs_would_be_scored(kind: str, side: bool, hidden: str,
                                                                   history: bool) -> None:
    """Each head's factorised all-item scoring (sides computed once, DCN's crosses as scalars) is
    the pairwise forward, with and without side fields, a deep tower and the history cross."""
    dims = {"n_users": 30, "n_items": 40, "user_cards": [3, 4] if side else [], "item_cards": [5] if side else [],
            "n_genres": 6 if side else 0}
    net = CTRNet(kind, dims, {"dim": 4, "hidden": hidden, "cross_layers": 3, "dropout": 0.0,
                              "user_history": history}).eval()
    random_weights(net)
    if side:
        net.ucodes[:] = torch.randint(0, 3, net.ucodes.shape)
        net.icodes[:] = torch.randint(0, 5, net.icodes.shape)
        net.genres[:] = (torch.rand(net.genres.shape) < 0.3).float()
    if history:
        net.history.pooling.attach(sp.random(30, 40, density=0.1, format="csr", random_state=0), torch.device("cpu"))
    users = torch.arange(30)
    with torch.no_grad():
        pairs = net(users[:, None].expand(-1, 40).reshape(-1), torch.arange(40).repeat(30)).view(30, 40)
        torch.testing.assert_close(net.all_item_logits(users, 40), pairs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("correct", [True, False])
def test_log_q_correction_recovers_the_full_softmax(correct: bool) -> None:
    """Fit free logits with sampled softmax (negatives from a skewed q) to labels drawn from p:
    with log-Q the learned softmax matches p; without it, q's favourites are pushed down."""
    torch.manual_seed(0)
    n = 20
    p = np.linspace(1, 3, n) / np.linspace(1, 3, n).sum()
    counts = np.arange(1, n + 1) ** 2.0  # proposal q heavily favours the last items
    sampler = LogQSampler(counts, 1.0, seed=0)
    logits = torch.zeros(n, requires_grad=True)
    one = torch.ones(1, 1)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    rng = np.random.default_rng(0)
    for _ in range(400):
        labels = torch.as_tensor(rng.choice(n, size=256, p=p))
        optimizer.zero_grad()
        loss = sampled_softmax(
            one.expand(len(labels), 1), labels, sampler.sample(64, torch.device("cpu")),
            torch.zeros(n, 1), logits, sampler.log_q if correct else None,
        )
        loss.backward()
        optimizer.step()
    learned = torch.softmax(logits.detach(), 0).numpy()
    error = np.abs(learned - p).sum()
    if correct:
        assert error < 0.2, error
    else:
        assert error > 0.8 and learned[-1] < p[-1] / 2, error


def test_history_pooling_is_the_scaled_sum_of_the_users_items_without_the_held_out_one() -> None:
    pooling = HistoryPooling(n_items=5, dim=3)
    rows = pooling.items.weight.detach()
    pooling.attach(sp.csr_matrix(np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])), torch.device("cpu"))
    users, holdout = torch.tensor([0, 0, 1, 2, 2, 7]), torch.tensor([-1, 3, -1, -1, 1, -1])
    pooled = pooling(users, holdout).detach()
    torch.testing.assert_close(pooled[0], (rows[0] + rows[2] + rows[3]) / 3**0.5)
    torch.testing.assert_close(pooled[1], (rows[0] + rows[2]) / 2**0.5)  # the positive's own item is out
    torch.testing.assert_close(pooled[3], rows[1])
    assert not pooled[2].any() and not pooled[4].any() and not pooled[5].any()  # empty, emptied, unknown
    grid = pooling(torch.tensor([[0, 0], [2, 2]])).detach()  # all-item scoring passes users as a grid
    assert grid.shape == (2, 2, 3)
    torch.testing.assert_close(grid[1, 1], rows[1])


def test_a_model_saved_before_user_history_existed_loads_without_it(tmp_path) -> None:
    data = Interactions.from_log(planted_sequences(), implicit=True)
    model = create("ncf-gmf", **fast_params("ncf-gmf", epochs=2, user_history=False)).fit(data)
    path = model.save(tmp_path / "gmf")
    meta = json.loads((path / "meta.json").read_text())
    del meta["params"]["user_history"]  # as written by earlier versions; the class default is on
    (path / "meta.json").write_text(json.dumps(meta))
    restored = load(path)
    assert restored.params["user_history"] is False
    np.testing.assert_allclose(restored.user_scores(np.arange(5)), model.user_scores(np.arange(5)), rtol=1e-5)


def test_a_tower_written_with_slashes_is_the_same_tower() -> None:
    """`--grid mlp_layers=128/64/32,128/64` compares two towers: a comma there separates values."""
    assert int_list("128/64/32") == int_list("128,64,32") == int_list(" 128, 64 ,32") == [128, 64, 32]
    assert int_list("") == []


def test_sessions_cut_at_inactivity_gaps() -> None:
    log = InteractionLog(
        np.array(["a", "a", "a", "a", "b", "b"], object), np.array(["x", "y", "z", "x", "y", "z"], object),
        np.full(6, np.nan), np.array([0.0, 10, 5000, 5010, 0, 20]),
    )
    data = Interactions.from_log(log, implicit=True)  # users a, b -> 0, 1; items x, y, z -> 0, 1, 2
    seq, bounds, owners = sessions(data, gap=3600)
    assert bounds.tolist() == [0, 2, 4, 6] and owners.tolist() == [0, 0, 1]
    assert seq.tolist() == [0, 1, 2, 0, 1, 2]


def test_gru4rec_session_parallel_batches_visit_every_transition_once() -> None:
    data = Interactions.from_log(planted_sequences(), implicit=True)
    model = create("gru4rec", **fast_params("gru4rec"))
    model.users, model.items, model.device = data.users, data.items, torch.device("cpu")
    model._prepare(data, np.random.default_rng(0))
    seen = []
    for inputs, targets, keep, reset in model._batches(np.random.default_rng(0)):
        model._state_h = torch.zeros(len(inputs), 1)  # lanes only; the loss is not needed here
        seen += list(zip(inputs.tolist(), targets.tolist()))
    expected = sum(int(e - s) - 1 for s, e in zip(model.sess_start, model.sess_end))
    assert len(seen) == expected


def write_side_files(folder, n_users: int, n_items: int) -> None:
    occupations = ["artist", "doctor", "student"]
    (folder / "u.user").write_text(
        "".join(f"u{u}|{18 + u % 50}|{'MF'[u % 2]}|{occupations[u % 3]}|{10000 + u}\n" for u in range(n_users))
    )
    genres = lambda i: "|".join("1" if g == i % 4 else "0" for g in range(19))  # noqa: E731
    (folder / "u.item").write_text(
        "".join(f"i{i}|Movie number {i} ({1950 + i})|01-Jan-{1950 + i}||http://x|{genres(i)}\n" for i in range(n_items))
    )


def test_side_features_load_and_degrade(tmp_path) -> None:
    users = IdIndex.from_ids(np.array(["u1", "u2", "nobody"]))
    items = IdIndex.from_ids(np.array(["i1", "i3", "unknown"]))
    none = load_side_features(tmp_path, users, items)
    assert not none.has_any and "none" in none.source
    write_side_files(tmp_path, 5, 5)
    side = load_side_features(tmp_path, users, items)
    assert len(side.user_cards) == 4 and side.genres.shape == (3, 19)
    assert (side.user_codes[users.index(["nobody"])[0]] == 0).all()  # unknown user -> code 0
    assert side.titles[items.index(["i3"])[0]] == "Movie number 3 (1953)"
    assert side.genres[items.index(["i3"])[0]].tolist() == [1.0 if g == 3 else 0.0 for g in range(19)]
    assert side.item_codes[items.index(["i1"])[0], 0] == side.item_codes[items.index(["i3"])[0], 0] == 1  # 1950s
    assert (side.genres[items.index(["unknown"])[0]] == 0).all() and side.item_codes[items.index(["unknown"])[0], 0] == 0
    indices, offsets = trigram_bags(["ab", ""], 64)
    assert len(indices) == 2 and offsets.tolist() == [0, 2]  # '#ab#' -> '#ab', 'ab#'


def test_side_features_read_a_title_holding_a_pipe_whole(tmp_path) -> None:
    """The side features read u.item with the catalogue's reader: pandas split a title holding
    `|` into an extra column and refused the whole file."""
    flags = "|".join("1" if g == 2 else "0" for g in range(19))
    (tmp_path / "u.item").write_text(f"i1|Tom | Jerry (1992)|01-Jan-1992||http://x|{flags}\n", encoding="latin-1")
    items = IdIndex.from_ids(np.array(["i1"]))
    side = load_side_features(tmp_path, IdIndex.from_ids(np.array(["u1"])), items)
    assert side.titles == ("Tom | Jerry (1992)",)
    assert side.genres.tolist() == [[1.0 if g == 2 else 0.0 for g in range(19)]]
    assert side.item_cards == (2,) and side.item_codes.tolist() == [[1]]  # one decade, the 1990s


@pytest.mark.parametrize(("name", "history"), [("deepfm", False), ("dcn", False), ("dcn-v2", False),
                                               ("wide-deep", False), ("deepfm", True)])
def test_exported_ranker_scores_like_the_model(name: str, history: bool, tmp_path) -> None:
    """Serving's ranker gets ids only: with `user_history` it carries each user's pooled items as
    a table."""
    log = planted_sequences()
    write_side_files(tmp_path, 160, 60)
    data = Interactions.from_log(log, implicit=True)
    model = create(name, **fast_params(name, epochs=2, side_data=str(tmp_path), user_history=history)).fit(data)
    export = model.export()
    assert export.ranker is not None and export.item_vectors is None and export.neighbours is None
    blob = io.BytesIO()
    np.savez(blob, **export.ranker.arrays)  # what serving receives: npz bytes + a JSON header
    loaded = np.load(io.BytesIO(blob.getvalue()), allow_pickle=False)
    ranker = load_ranker(json.loads(json.dumps(export.ranker.header)), {k: loaded[k] for k in loaded.files})
    users, items = np.array(["u1", "u5", "u9", "stranger"]), np.array(["i3", "i7", "i40", "i2"])
    scores = ranker.score(users, items)
    expected = 1 / (1 + np.exp(-model.score(users[:3], items[:3])))
    np.testing.assert_allclose(scores[:3], expected, rtol=1e-5)
    assert np.isfinite(scores[3])  # unknown user: scored from the unknown row
    assert ranker.uses_history is history
    if history:  # serving passes the user's items as they are now (Redis): pooled live, not the table
        catalogue = data.items.ids.astype(str)
        own = {str(i) for i in data.items.ids[data.item_idx[data.user_idx == data.users.index(["u1"])[0]]]}
        now = ranker.score(["u1"] * len(catalogue), catalogue, history=own)  # the same items: the same scores
        np.testing.assert_allclose(now, 1 / (1 + np.exp(-model.score(["u1"] * len(catalogue), catalogue))), rtol=1e-5)
        other = {str(i) for i in data.items.ids[data.item_idx[data.user_idx == data.users.index(["u2"])[0]]]}
        moved = ranker.score(["u1"] * len(catalogue), catalogue, history=own | other | {"never-seen"})
        assert not np.allclose(moved, now, rtol=1e-4)  # a new event moves the ranking at once
        np.testing.assert_array_equal(ranker.score(["u1"] * 4, catalogue[:4], history={"never-seen"}),
                                      ranker.score(["u1"] * 4, catalogue[:4]))  # no known item: the table
        header = json.loads(json.dumps(export.ranker.header))
        del header["params"]["history_live"]  # published before the live pooling: the table alone
        older = load_ranker(header, {k: loaded[k] for k in loaded.files if k != "w.history.pooling.items.weight"})
        assert not older.uses_history
        np.testing.assert_array_equal(older.score(users, items, history=own), scores)


def test_a_ranker_header_that_asks_for_more_than_its_weights_is_refused_before_anything_is_built() -> None:
    """Serving builds the network a published header describes: a 254-byte blob asking for a
    billion users made every worker try to allocate 256 GB at every poll. The header's shapes
    are now checked against the weights sent, on torch's meta device, before any allocation."""
    data = Interactions.from_log(planted_sequences(), implicit=True)
    export = create("deepfm", **fast_params("deepfm", epochs=1)).fit(data).export()
    header, arrays = json.loads(json.dumps(export.ranker.header)), dict(export.ranker.arrays)
    assert load_ranker(header, arrays).score(["u1"], ["i3"]).shape == (1,)
    bomb = {**header, "dims": {**header["dims"], "n_users": 10**9}}
    with pytest.raises(ValueError, match="header and weights disagree .*embed.user.weight"):
        load_ranker(bomb, arrays)
    with pytest.raises(ValueError, match="header and weights disagree"):
        load_ranker(header, {k: v for k, v in arrays.items() if k != "w.head.bias"})


@pytest.mark.parametrize("name", ["youtube-dnn", "dssm"])
def test_two_tower_vectors_reproduce_scores(name: str) -> None:
    data = Interactions.from_log(planted_sequences(), implicit=True)
    model = create(name, **fast_params(name, epochs=2)).fit(data)
    items, users = model.item_vectors(), model.user_vectors()
    assert items.shape[0] == data.n_items and users.shape == (data.n_users, items.shape[1])
    np.testing.assert_allclose(users[:5] @ items.T, model.user_scores(np.arange(5)), rtol=1e-4, atol=1e-5)
    history = data.items.ids[data.item_idx[data.user_idx == 3]]
    order = np.argsort(data.timestamps[data.user_idx == 3], kind="stable")
    fresh = model.history_vectors([list(history[order]), ["never-seen"]])
    if name == "dssm":  # no demographics: a known user's history reproduces their vector
        np.testing.assert_allclose(fresh[0], users[3], rtol=1e-4, atol=1e-5)
    assert fresh.shape == (2, items.shape[1]) and np.isfinite(fresh).all()


def test_embedding_penalty_counts_the_rows_a_training_batch_looks_up() -> None:
    """weight x batch mean of each lookup's squared norm, in training mode only; off at weight 0;
    its hooks are gone once closed."""
    from streamrec.trainer.models.neural.training import EmbeddingPenalty

    table = torch.nn.Embedding(10, 3)
    with torch.no_grad():
        table.weight.copy_(torch.arange(30, dtype=torch.float32).reshape(10, 3))
    penalty = EmbeddingPenalty(table, 0.5)
    rows = torch.tensor([1, 2, 2])
    table.train()
    table(rows)
    expected = 0.5 * table.weight[rows].pow(2).sum(-1).mean()
    torch.testing.assert_close(penalty.take(), expected)
    assert float(penalty.take()) == 0.0  # taken: nothing collected since
    table.eval()
    table(rows)
    assert float(penalty.take()) == 0.0  # scoring is not penalised
    penalty.close()
    table.train()
    table(rows)
    assert penalty.outputs == [] and EmbeddingPenalty(table, 0.0).take() == 0.0


def test_embedding_reg_shrinks_the_learned_rows() -> None:
    log = planted_sequences()
    data = Interactions.from_log(log, implicit=True)
    norms = []
    for reg in (0.0, 0.1):
        model = create("ncf-gmf", **fast_params("ncf-gmf"), embedding_reg=reg, popularity_blend=0).fit(data)
        norms.append(float(model.module.gmf_user.weight.norm() + model.module.gmf_item.weight.norm()))
    assert norms[1] < 0.8 * norms[0]
