"""Implicit-feedback ALS (Hu, Koren, Volinsky 2008) solved by conjugate gradient.

Confidence c_ui = 1 + alpha * r_ui, preference p_ui = 1 for observed pairs. Each half-step solves
(Y^T Y + Y^T (C_u - I) Y + reg I) x_u = Y^T C_u p_u for all users at once: the (C_u - I) term is
applied through the sparse matrix (only observed pairs), so no dense per-user matrices are built;
a few CG steps per half-step, warm-started from the previous factors (as in `implicit`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from trainer.interactions import Interactions
from trainer.models.base import Capabilities, Recommender


def conjugate_gradient(
    X: np.ndarray, Y: np.ndarray, confidence: sp.csr_matrix, reg: float, steps: int
) -> np.ndarray:
    """A few batched CG steps on every row's normal equations; returns the updated X."""
    gram = Y.T @ Y + reg * np.eye(Y.shape[1], dtype=Y.dtype)
    cols = confidence.indices
    extra = (confidence.data - 1.0).astype(Y.dtype)
    Y_at_pairs = Y[cols]  # fixed during the solve: gathered once

    def matvec(V: np.ndarray) -> np.ndarray:
        weights = extra * np.einsum("nk,nk->n", np.repeat(V, np.diff(confidence.indptr), axis=0), Y_at_pairs)
        return V @ gram + sp.csr_matrix((weights, cols, confidence.indptr), shape=confidence.shape) @ Y

    b = sp.csr_matrix((confidence.data.astype(Y.dtype), cols, confidence.indptr), shape=confidence.shape) @ Y
    residual = b - matvec(X)
    direction = residual.copy()
    rs = np.einsum("nk,nk->n", residual, residual)
    for _ in range(steps):
        Ad = matvec(direction)
        denom = np.einsum("nk,nk->n", direction, Ad)
        alpha = np.divide(rs, denom, out=np.zeros_like(rs), where=denom > 0)
        X = X + alpha[:, None] * direction
        residual -= alpha[:, None] * Ad
        rs_new = np.einsum("nk,nk->n", residual, residual)
        beta = np.divide(rs_new, rs, out=np.zeros_like(rs), where=rs > 0)
        direction = residual + beta[:, None] * direction
        rs = rs_new
    return X


class ImplicitALS(Recommender):
    """Weighted matrix factorisation for implicit feedback; scores are x_u . y_i."""

    name = "als"
    capabilities = Capabilities(implicit=True)
    defaults = {
        "factors": 64, "reg": 0.05, "iterations": 15, "alpha": 40.0, "cg_steps": 3, "seed": 0,
    }

    def _fit(self, interactions: Interactions) -> None:
        p = self.params
        rng = np.random.default_rng(p["seed"])
        counts = interactions.counts()
        confidence = counts.copy()
        confidence.data = 1.0 + p["alpha"] * confidence.data
        confidence_t = confidence.T.tocsr()
        k = p["factors"]
        X = (rng.standard_normal((interactions.n_users, k)) * 0.01).astype(np.float32)
        Y = (rng.standard_normal((interactions.n_items, k)) * 0.01).astype(np.float32)
        for _ in range(p["iterations"]):
            X = conjugate_gradient(X, Y, confidence, p["reg"], p["cg_steps"])
            Y = conjugate_gradient(Y, X, confidence_t, p["reg"], p["cg_steps"])
        self.X, self.Y = X, Y

    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        return self.X[users] @ self.Y.T

    def item_vectors(self) -> np.ndarray:
        return self.Y

    def user_vectors(self) -> np.ndarray:
        return self.X

    def _state(self) -> dict[str, np.ndarray]:
        return {"X": self.X, "Y": self.Y}

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.X, self.Y = arrays["X"], arrays["Y"]
