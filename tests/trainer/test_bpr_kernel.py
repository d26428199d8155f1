"""The compiled BPR epoch (`bpr.bpr_epoch`) is mini-batch gradient descent on the paper's loss:
each step moves every table by the learning rate times autograd's gradient of the step's summed
per-triple loss, computed from the parameters as the step found them, with users and items that
repeat within a step; and the negative check (`SeenPairs`) matches a set lookup."""

import numpy as np
import scipy.sparse as sp
import torch

from streamrec.trainer.models.bpr import bpr_epoch
from streamrec.trainer.models.seen_pairs import SeenPairs

N_USERS, N_ITEMS, K, LR, REG = 5, 8, 3, 0.05, 0.01


def step_loss(P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor, u: torch.Tensor, i: torch.Tensor,
              j: torch.Tensor) -> torch.Tensor:
    """-ln sigma(x_uij) + reg/2 (|p_u|^2 + |q_i|^2 + |q_j|^2 + b_i^2 + b_j^2), summed over triples."""
    x = (P[u] * (Q[i] - Q[j])).sum(1) + b[i] - b[j]
    norms = (P[u] ** 2).sum(1) + (Q[i] ** 2).sum(1) + (Q[j] ** 2).sum(1) + b[i] ** 2 + b[j] ** 2
    return (-torch.nn.functional.logsigmoid(x) + REG / 2 * norms).sum()


def test_each_step_is_a_gradient_step_of_its_summed_loss() -> None:
    rng = np.random.default_rng(0)
    users = rng.integers(N_USERS, size=11)  # 11 triples in steps of 4, 4 and 3: repeats in each
    positives = rng.integers(N_ITEMS, size=11)
    negatives = (positives + 1 + rng.integers(N_ITEMS - 1, size=11)) % N_ITEMS
    P, Q = rng.normal(size=(N_USERS, K)), rng.normal(size=(N_ITEMS, K))
    b = rng.normal(size=N_ITEMS)
    before = P.copy()
    expected = [torch.tensor(a, requires_grad=True) for a in (P, Q, b)]
    for start in range(0, 11, 4):
        step = slice(start, start + 4)
        loss = step_loss(*expected, *(torch.from_numpy(a[step]) for a in (users, positives, negatives)))
        grads = torch.autograd.grad(loss, expected)
        with torch.no_grad():
            expected = [(t - LR * g).requires_grad_() for t, g in zip(expected, grads)]
    bpr_epoch(users, positives, negatives, P, Q, b, LR, REG, 4)
    for got, want in zip((P, Q, b), expected):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert not np.allclose(P, before)


def test_seen_pairs_finds_exactly_the_users_pairs() -> None:
    rng = np.random.default_rng(1)
    seen = sp.random(40, 30, density=0.2, format="csr", random_state=2)
    seen.indices = seen.indices.copy()  # rows out of order: the test must not rely on sorted input
    for r in range(seen.shape[0]):
        row = slice(seen.indptr[r], seen.indptr[r + 1])
        seen.indices[row], seen.data[row] = seen.indices[row][::-1], seen.data[row][::-1]
    seen.has_sorted_indices = False
    users, items = rng.integers(40, size=500), rng.integers(30, size=500)
    pairs = set(zip(*seen.nonzero()))
    want = np.array([(u, i) in pairs for u, i in zip(users, items)])
    assert want.any() and not want.all()
    np.testing.assert_array_equal(SeenPairs(seen).contains(users, items), want)
