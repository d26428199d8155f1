"""One step of the compiled SGD epoch (`sgd_kernels.factor_epoch`) moves every table by its learning
rate times autograd's gradient of the step's summed loss: biased MF, SVD++, timeSVD++ and the
integrated model, on a mini-batch with repeated users and items."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from streamrec.trainer.models.sgd_kernels import (
    RatingRows,
    implicit_rows,
    run_epoch,
    run_user_epoch,
    user_grouped_order,
)

N_USERS, N_ITEMS, K, BINS, NB = 7, 9, 4, 3, 5
RATES = np.array([0.01, 0.02, 0.003, 0.004, 0.005])  # bias, factor, drift, time bin, neighbour weight
REGS = np.array([0.005, 0.015, 50.0, 0.1, 0.015])
MU = 3.5


def step_loss(theta: dict[str, torch.Tensor], rows: RatingRows, binary: np.ndarray, implicit: bool) -> torch.Tensor:
    """The survey's per-rating loss summed over the step: 1/2 e^2 + the regularisation of every
    parameter the rating touches (y_j for j in I_u, time and neighbour terms when present)."""
    u, i = torch.from_numpy(rows.users), torch.from_numpy(rows.items)
    pu = theta["P"][u]
    bias = theta["bu"][u] + theta["bi"][i]
    reg_b, reg_f, reg_a, reg_bin, reg_w = REGS
    loss = 0.5 * reg_b * ((theta["bu"][u] ** 2) + (theta["bi"][i] ** 2)).sum()
    loss = loss + 0.5 * reg_f * ((theta["P"][u] ** 2).sum() + (theta["Q"][i] ** 2).sum())
    if len(rows.dev):
        dev, b = torch.from_numpy(rows.dev), torch.from_numpy(rows.bins)
        pu = pu + theta["Ap"][u] * dev[:, None]
        bias = bias + theta["au"][u] * dev + theta["but"][u, b] + theta["bit"][i, b]
        loss = loss + 0.5 * (reg_a * ((theta["au"][u] ** 2).sum() + (theta["Ap"][u] ** 2).sum())
                             + reg_bin * ((theta["but"][u, b] ** 2).sum() + (theta["bit"][i, b] ** 2).sum()))
    if len(rows.nb_res):
        res, has, norm = (torch.from_numpy(a) for a in (rows.nb_res, rows.nb_has, rows.nb_norm))
        bias = bias + norm * (res * theta["W"][i] + has * theta["C"][i]).sum(1)
        loss = loss + 0.5 * reg_w * ((theta["W"][i] ** 2 + theta["C"][i] ** 2) * has).sum()
    user = pu
    if implicit:
        member = torch.from_numpy(binary)[u]  # (ratings, items): j in I_u
        scale = 1 / torch.sqrt(member.sum(1, keepdim=True))
        user = user + scale * (member @ theta["Y"])
        loss = loss + 0.5 * reg_f * (member * (theta["Y"] ** 2).sum(1)[None, :]).sum()
    pred = MU + bias + (theta["Q"][i] * user).sum(1)
    return loss + 0.5 * ((torch.from_numpy(rows.ratings) - pred) ** 2).sum()


@pytest.mark.parametrize("implicit,time_aware,neighbours",
                         [(False, False, False), (True, False, False), (True, True, False), (True, False, True)],
                         ids=["biased-mf", "svdpp", "timesvdpp", "integrated"])
def test_a_step_moves_each_table_by_its_rate_times_the_autograd_gradient(implicit, time_aware, neighbours):
    rng = np.random.default_rng(0)
    binary = (rng.random((N_USERS, N_ITEMS)) < 0.5).astype(np.float64)
    binary[np.arange(N_USERS), np.arange(N_USERS)] = 1.0  # every user rated something
    users = np.array([0, 1, 1, 3, 6, 0, 2])  # repeated users and items, as in a real mini-batch
    items = np.array([2, 2, 5, 8, 0, 2, 4])
    rows = RatingRows(users, items, rng.normal(3.0, 1.0, len(users)))
    theta = {"bu": rng.normal(size=N_USERS), "bi": rng.normal(size=N_ITEMS),
             "P": rng.normal(size=(N_USERS, K)), "Q": rng.normal(size=(N_ITEMS, K))}
    if implicit:
        theta["Y"] = rng.normal(size=(N_ITEMS, K))
    if time_aware:
        theta |= {"au": rng.normal(size=N_USERS), "Ap": rng.normal(size=(N_USERS, K)),
                  "but": rng.normal(size=(N_USERS, BINS)), "bit": rng.normal(size=(N_ITEMS, BINS))}
        rows = RatingRows(users, items, rows.ratings, dev=rng.normal(size=len(users)),
                          bins=np.array([0, 1, 1, 2, 0, 0, 2]))
    if neighbours:
        theta |= {"W": rng.normal(size=(N_ITEMS, NB)), "C": rng.normal(size=(N_ITEMS, NB))}
        has = (rng.random((len(users), NB)) < 0.6).astype(np.float64)
        rows = RatingRows(users, items, rows.ratings, nb_res=rng.normal(size=(len(users), NB)) * has, nb_has=has,
                          nb_norm=1 / np.sqrt(np.maximum(has.sum(1), 1)))
    leaves = {name: torch.tensor(value, requires_grad=True) for name, value in theta.items()}
    step_loss(leaves, rows, binary, implicit).backward()
    rate = {"bu": 0, "bi": 0, "P": 1, "Q": 1, "Y": 1, "au": 2, "Ap": 2, "but": 3, "bit": 3, "W": 4, "C": 4}
    expected = {name: value - RATES[rate[name]] * leaves[name].grad.numpy() for name, value in theta.items()}

    moved = {name: value.copy() for name, value in theta.items()}
    lists = None
    if implicit:  # the kernel's lists, with |I_u|^-1/2 in double precision as the test's tables
        indptr, indices, _ = implicit_rows(sp.csr_matrix(binary))
        lists = (indptr, indices, 1 / np.sqrt(binary.sum(1)))
    run_epoch(np.arange(len(users)), len(users), rows, MU, moved, lists, RATES, REGS)

    for name in theta:
        np.testing.assert_allclose(moved[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
        assert not np.allclose(moved[name], theta[name]), f"{name} did not move"


@pytest.mark.parametrize("time_aware,neighbours", [(False, False), (True, False), (False, True)],
                         ids=["svdpp", "timesvdpp", "integrated"])
def test_the_user_wise_epoch_is_per_sample_sgd_with_each_users_y_moved_once(time_aware, neighbours):
    """`schedule=users` (Koren's loop): each rating moves its rows by rate x autograd's gradient of
    its own loss, one after the other, with z_u held from the user's start; after the user's
    ratings y_j decays by (1 - rate reg)^n and moves by the summed gradient of their errors."""
    rng = np.random.default_rng(1)
    binary = (rng.random((N_USERS, N_ITEMS)) < 0.5).astype(np.float64)
    binary[np.arange(N_USERS), np.arange(N_USERS)] = 1.0
    users = np.array([3, 3, 3, 1, 1])  # two users, their ratings adjacent (user_grouped_order's output)
    items = np.array([3, 7, 3, 1, 4])
    binary[users, items] = 1.0
    rows = RatingRows(users, items, rng.normal(3.0, 1.0, len(users)))
    theta = {"bu": rng.normal(size=N_USERS), "bi": rng.normal(size=N_ITEMS), "P": rng.normal(size=(N_USERS, K)),
             "Q": rng.normal(size=(N_ITEMS, K)), "Y": rng.normal(size=(N_ITEMS, K))}
    if time_aware:
        theta |= {"au": rng.normal(size=N_USERS), "Ap": rng.normal(size=(N_USERS, K)),
                  "but": rng.normal(size=(N_USERS, BINS)), "bit": rng.normal(size=(N_ITEMS, BINS))}
        rows = RatingRows(users, items, rows.ratings, dev=rng.normal(size=len(users)), bins=np.array([0, 1, 2, 0, 2]))
    if neighbours:
        theta |= {"W": rng.normal(size=(N_ITEMS, NB)), "C": rng.normal(size=(N_ITEMS, NB))}
        has = (rng.random((len(users), NB)) < 0.6).astype(np.float64)
        rows = RatingRows(users, items, rows.ratings, nb_res=rng.normal(size=(len(users), NB)) * has, nb_has=has,
                          nb_norm=1 / np.sqrt(np.maximum(has.sum(1), 1)))
    rate = {"bu": 0, "bi": 0, "P": 1, "Q": 1, "au": 2, "Ap": 2, "but": 3, "bit": 3, "W": 4, "C": 4}

    expected = {name: value.copy() for name, value in theta.items()}
    for user in (3, 1):
        mine = np.flatnonzero(users == user)
        y_start, y_move = expected["Y"].copy(), np.zeros_like(expected["Y"])
        for s in mine:
            one = RatingRows(*(getattr(rows, f)[s:s + 1] if len(getattr(rows, f)) else getattr(rows, f)
                               for f in ("users", "items", "ratings", "dev", "bins", "nb_res", "nb_has", "nb_norm")))
            leaves = {name: torch.tensor(value, requires_grad=True) for name, value in expected.items()}
            leaves["Y"] = torch.tensor(y_start, requires_grad=True)
            step_loss(leaves, one, binary, implicit=True).backward()
            y_move -= RATES[1] * (leaves["Y"].grad.numpy() - REGS[1] * binary[user][:, None] * y_start)
            for name in rate:
                if name in expected:
                    expected[name] = expected[name] - RATES[rate[name]] * leaves[name].grad.numpy()
        member = binary[user].astype(bool)
        expected["Y"][member] = y_start[member] * (1 - RATES[1] * REGS[1]) ** len(mine) + y_move[member]

    moved = {name: value.copy() for name, value in theta.items()}
    indptr, indices, _ = implicit_rows(sp.csr_matrix(binary))
    run_user_epoch(np.arange(len(users)), rows, MU, moved, (indptr, indices, 1 / np.sqrt(binary.sum(1))), RATES, REGS)
    for name in theta:
        np.testing.assert_allclose(moved[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
        assert not np.allclose(moved[name], theta[name]), f"{name} did not move"


def test_the_user_grouped_order_keeps_each_users_ratings_adjacent_and_covers_every_rating():
    users = np.random.default_rng(0).integers(0, 50, 2000)
    order = user_grouped_order(users, 60, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(users)))
    runs = [users[order][0]] + [u for a, u in zip(users[order], users[order][1:]) if u != a]
    assert sorted(runs) == sorted(set(users))  # one run per user
    gen = torch.Generator().manual_seed(0)  # the same draws, sorted the slow way
    rank, within = torch.randperm(60, generator=gen).numpy(), torch.rand(len(users), generator=gen).numpy()
    np.testing.assert_array_equal(order, np.lexsort((within, rank[users])))
