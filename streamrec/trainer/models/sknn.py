"""Session-based kNN (Jannach & Ludewig 2017; Ludewig & Jannach 2018): SKNN and V-SKNN.

The strong simple baselines of session-based recommendation, often ahead of GRU4Rec on sparse
logs. A "user" here is whatever groups events into a history: a browsing session in the
`sessions` format (EVALUATION.md), a user elsewhere.

For a query session s (the history the model saw in training):
- neighbour pool: past sessions sharing at least one item with s; of those only the `sample` most
  recent (by their last event) are kept, so an old long tail of sessions does not dilute the
  neighbourhood and cost stays bounded;
- similarity: cosine of binary item vectors (SKNN) or, for V-SKNN (`decay` linear or div), of the
  query's item vector weighted by position, so the session's last items count most;
- the `k` most similar pool sessions vote: score(i) = sum_n sim(s, n) [i in n].
Users the model has never seen, and items no neighbour holds, fall back to popularity at a tiny
weight (`popularity_weight`), so a short history never ranks worse than the baseline it extends.

Everything is sparse linear algebra plus vectorised per-row selection (no loop per session).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from streamrec.core.params import Choice, IntRange, space
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities, Recommender
from streamrec.trainer.models.popularity_blend import RankingParams

Decay = Literal["none", "linear", "div"]
MATRICES = ("sessions", "voters", "query")  # what a saved model keeps (CSR parts)


class SessionKNNParams(RankingParams):
    k: int = Field(100, ge=1, description="neighbour sessions that vote")
    sample: int = Field(500, ge=1, description="most recent overlapping sessions considered")
    decay: Decay = Field("none", description="position weight of the query's items: V-SKNN uses linear")
    popularity_weight: float = Field(1e-6, ge=0.0, description="popularity prior added to the votes")


class VSKNNParams(SessionKNNParams):
    decay: Decay = "linear"


def _keep_first_per_row(rows: np.ndarray, order_key: np.ndarray, limit: int) -> np.ndarray:
    """Mask of entries kept when, within each row, entries are sorted by `order_key` (ascending)
    and only the first `limit` survive."""
    order = np.lexsort((order_key, rows))
    sorted_rows = rows[order]
    starts = np.r_[0, np.flatnonzero(sorted_rows[1:] != sorted_rows[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    keep = np.zeros(len(rows), bool)
    keep[order[np.arange(len(rows)) - run_start < limit]] = True
    return keep


class SessionKNN(Recommender):
    """SKNN: sessions vote for their items, weighted by their cosine similarity to the query."""

    name = "sknn"
    capabilities = Capabilities(implicit=True)
    Params = SessionKNNParams
    search_space = space(k=IntRange(20, 500, log=True), sample=IntRange(100, 5000, log=True),
                    decay=Choice(("none", "linear", "div")))

    def _fit(self, interactions: Interactions) -> None:
        binary = interactions.binary()
        norms = np.sqrt(np.asarray(binary.sum(axis=1)).ravel())
        self.sessions = sp.csr_matrix(sp.diags(1.0 / np.maximum(norms, 1e-12)) @ binary)  # row-normalised
        self.voters = binary  # sessions x items, 1 where the session holds the item
        last = np.full(interactions.n_users, -np.inf)
        np.maximum.at(last, interactions.user_idx, interactions.timestamps)
        self.recency = last  # a session's last event time: the sample keeps the most recent
        self.query = self._query_vectors(interactions)
        total = float(self.popularity.max()) if len(self.popularity) else 1.0
        self.prior = self.popularity / max(total, 1.0)

    def _query_vectors(self, interactions: Interactions) -> sp.csr_matrix:
        """Each session's own items weighted by position (1 for all with no decay; V-SKNN: the
        last item 1, earlier ones less), L2-normalised."""
        decay = self.params["decay"]
        users, items = interactions.user_idx, interactions.item_idx
        order = np.lexsort((interactions.timestamps, users))
        u_sorted = users[order]
        starts = np.r_[0, np.flatnonzero(u_sorted[1:] != u_sorted[:-1]) + 1]
        lengths = np.diff(np.r_[starts, len(u_sorted)])
        position = np.arange(len(u_sorted)) - np.repeat(starts, lengths) + 1  # 1 = the first event
        length = np.repeat(lengths, lengths)
        if decay == "linear":
            weight = position / length
        elif decay == "div":
            weight = 1.0 / (length - position + 1)
        else:
            weight = np.ones(len(u_sorted))
        q = sp.csr_matrix((weight, (u_sorted, items[order])), shape=(interactions.n_users, interactions.n_items))
        q.sum_duplicates()  # an item seen twice in a session: its positions' weights add, capped at 1
        q.data = np.minimum(q.data, 1.0)
        norms = np.sqrt(np.asarray(q.multiply(q).sum(axis=1)).ravel())
        return sp.csr_matrix(sp.diags(1.0 / np.maximum(norms, 1e-12)) @ q)

    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        p = self.params
        sims = (self.query[users] @ self.sessions.T).tocoo()  # queries x sessions, overlapping only
        rows, cols, values = sims.row, sims.col, sims.data
        own = cols == users[rows]
        rows, cols, values = rows[~own], cols[~own], values[~own]
        recent = _keep_first_per_row(rows, -self.recency[cols], int(p["sample"]))
        rows, cols, values = rows[recent], cols[recent], values[recent]
        nearest = _keep_first_per_row(rows, -values, int(p["k"]))
        neighbours = sp.csr_matrix((values[nearest], (rows[nearest], cols[nearest])),
                                   shape=(len(users), self.voters.shape[0]))
        votes = (neighbours @ self.voters).toarray()
        return votes + p["popularity_weight"] * self.prior[None, :]

    def _state(self) -> dict[str, np.ndarray]:
        arrays = {"recency": self.recency, "prior": self.prior}
        for m in MATRICES:
            matrix = getattr(self, m)
            arrays |= {f"{m}_data": matrix.data, f"{m}_indices": matrix.indices, f"{m}_indptr": matrix.indptr,
                       f"{m}_shape": np.array(matrix.shape)}
        return arrays

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for m in MATRICES:
            setattr(self, m, sp.csr_matrix((arrays[f"{m}_data"], arrays[f"{m}_indices"], arrays[f"{m}_indptr"]),
                                           shape=tuple(arrays[f"{m}_shape"])))
        self.recency, self.prior = arrays["recency"], arrays["prior"]


class VSKNN(SessionKNN):
    """V-SKNN: SKNN whose query weights the session's later items more (linear decay)."""

    name = "vsknn"
    Params = VSKNNParams
