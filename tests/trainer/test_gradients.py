"""The hand-written SVD++ / timeSVD++ / integrated-model gradients equal autograd's."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from streamrec.trainer.models.svdpp import batch_gradients, batch_loss, implicit_matrices

N_USERS, N_ITEMS, K, BINS, NB = 7, 9, 4, 3, 5
REG_B, REG_F = 0.005, 0.015
REG_T = {"au": 50.0, "Ap": 50.0, "but": 0.1, "bit": 0.1, "W": 0.015}


def _setup(time_aware: bool, neighbours: bool):
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    binary = sp.csr_matrix((rng.random((N_USERS, N_ITEMS)) < 0.5).astype(float))
    N, NT, BT = (t.to(torch.float64) for t in implicit_matrices(binary))
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    theta = {"bu": rand(N_USERS), "bi": rand(N_ITEMS), "P": rand(N_USERS, K), "Q": rand(N_ITEMS, K), "Y": rand(N_ITEMS, K)}
    u = torch.tensor([0, 1, 1, 3, 6, 0, 2])  # repeated users and items, as in a real mini-batch
    i = torch.tensor([2, 2, 5, 8, 0, 2, 4])
    batch = {"u": u, "i": i, "r": rand(len(u)) + 3.0, "mu": torch.tensor(3.5, dtype=torch.float64)}
    if time_aware:
        theta |= {"au": rand(N_USERS), "Ap": rand(N_USERS, K), "but": rand(N_USERS, BINS), "bit": rand(N_ITEMS, BINS)}
        batch |= {"dev": rand(len(u)), "bin": torch.tensor([0, 1, 1, 2, 0, 0, 2])}
    if neighbours:
        theta |= {"W": rand(N_ITEMS, NB), "C": rand(N_ITEMS, NB)}
        has = (torch.rand(len(u), NB, generator=gen) < 0.6).to(torch.float64)
        batch |= {"nb_res": rand(len(u), NB) * has, "nb_has": has, "nb_norm": 1 / torch.sqrt(has.sum(1).clamp(min=1))}
    return theta, batch, N, NT, BT


@pytest.mark.parametrize("time_aware,neighbours", [(False, False), (True, False), (False, True)],
                         ids=["svdpp", "timesvdpp", "integrated"])
def test_gradients_match_autograd(time_aware, neighbours):
    theta, batch, N, NT, BT = _setup(time_aware, neighbours)
    ours = batch_gradients(theta, batch, N, NT, BT, REG_B, REG_F, REG_T)
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    batch_loss(leaves, batch, N, REG_B, REG_F, REG_T).backward()
    assert set(ours) == set(leaves)
    for name, leaf in leaves.items():
        torch.testing.assert_close(ours[name], leaf.grad, rtol=1e-6, atol=1e-6, msg=name)
