"""YouTube DNN candidate generation (Covington et al. 2016): a user tower over the average of the
watch-history embeddings plus demographics and the example age, a softmax over items.

Each training example is one event: the label is the item, the input is the user's history strictly
before it (predicting the next watch, not a random held-out one: the paper's lesson) and its
example age (how old the event is at the end of the training window), which is 0 at serving so
the model scores "now". The softmax is sampled from q ~ count^sample_alpha with the log-Q
correction. Serving gets `item_vectors()` for FAISS and user vectors from `user_vectors()` or
`history_vectors()`; both carry the item bias as one extra coordinate (dot product = score).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from streamrec.trainer.features import load_side_features
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities
from streamrec.trainer.models.neural.losses import LogQSampler, sampled_softmax
from streamrec.trainer.models.neural.training import (
    NeuralParams,
    NeuralRecommender,
    history_windows,
    int_list,
    last_items,
    mlp,
    sequences,
)


class YouTubeNet(nn.Module):
    """User tower (history average, demographic embeddings, example age) and item output table."""

    def __init__(self, n_items: int, user_codes: np.ndarray, user_cards: list[int], dim: int,
                 side_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.pad = n_items
        self.history = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.register_buffer("user_codes", torch.as_tensor(user_codes, dtype=torch.long))
        self.side = nn.ModuleList(nn.Embedding(card, side_dim) for card in user_cards)
        self.tower = mlp([dim + side_dim * len(user_cards) + 3, *hidden])
        self.project = nn.Linear(hidden[-1] if hidden else dim + side_dim * len(user_cards) + 3, dim)
        self.items = nn.Embedding(n_items, dim)
        self.bias = nn.Parameter(torch.zeros(n_items))
        nn.init.normal_(self.history.weight, std=0.05)
        nn.init.normal_(self.items.weight, std=0.05)
        with torch.no_grad():
            self.history.weight[n_items].zero_()

    def user_vectors(self, history: torch.Tensor, codes: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """history (B, H) padded item indices, codes (B, F) side codes, age (B,) example age."""
        mask = (history != self.pad).float()
        watched = self.history(history).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        parts = [watched, *(emb(codes[:, f]) for f, emb in enumerate(self.side))]
        parts.append(torch.stack([age, age**2, age.clamp(min=0).sqrt()], dim=1))
        return self.project(self.tower(torch.cat(parts, dim=1)))


class YouTubeDNNParams(NeuralParams):
    """Embedding width, demographic embedding width, tower widths, watch-history length, sampled
    softmax size, the sampling exponent of q ~ count^alpha and the log-Q correction. One hidden
    layer of 128 (the paper's tower was deeper): `streamrec study-defaults --model youtube-dnn
    --grid hidden=,128 --data ml-100k` ranks it first on validation, 1.875 against 2.06 for
    "256,128" and for none, over five synthetic logs and three time splits of MovieLens 100K's
    training part (docs/models.md)."""

    dim: int = 64
    side_dim: int = 8
    hidden: str = "128"
    history: int = 50
    negatives: int = 512
    sample_alpha: float = 0.75
    logq: bool = True
    batch_size: int = 512
    lr: float = 2e-3


class YouTubeDNN(NeuralRecommender):
    """Candidate generation by softmax over items; exposes item/user vectors for retrieval."""

    name = "youtube-dnn"
    Params = YouTubeDNNParams
    capabilities: ClassVar[Capabilities] = Capabilities(implicit=True, side_features=True)
    data_parallel = True  # one example per row; the sampled negatives are shared by the batch

    def _prepare(self, train: Interactions, rng: np.random.Generator) -> None:
        side = load_side_features(self.params["side_data"], train.users, train.items)
        self.side_source = side.source
        self.user_codes = side.user_codes
        _, self.seq_items, times, self.seq_indptr = sequences(train)
        self.seq_users = np.repeat(np.arange(train.n_users), np.diff(self.seq_indptr))
        span = max(float(times.max() - times.min()), 1.0) if len(times) else 1.0
        self.example_age = ((times.max() - times) / span).astype(np.float32) if len(times) else times
        counts = np.bincount(train.item_idx, minlength=train.n_items)
        self.sampler = LogQSampler(counts, self.params["sample_alpha"], self.params["seed"])
        self.dims = {"n_items": train.n_items, "n_users": train.n_users, "user_cards": list(side.user_cards)}

    def _build(self) -> nn.Module:
        p = self.params
        codes = getattr(self, "user_codes", np.zeros((self.dims["n_users"], len(self.dims["user_cards"])), np.int64))
        return YouTubeNet(self.dims["n_items"], codes, self.dims["user_cards"], p["dim"], p["side_dim"], int_list(p["hidden"]))

    def _batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        order = rng.permutation(len(self.seq_items))
        size = self.batch_size_for(len(order))
        for start in range(0, len(order), size):
            pos = order[start : start + size]
            starts = self.seq_indptr[self.seq_users[pos]]
            history = last_items(self.seq_items, starts, pos, self.params["history"], self.dims["n_items"])
            yield tuple(
                torch.as_tensor(a, device=self.device)
                for a in (history, self.seq_users[pos], self.example_age[pos], self.seq_items[pos])
            )

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        history, users, age, targets = batch
        net: YouTubeNet = self.module
        vecs = net.user_vectors(history, net.user_codes[users], age)
        sampled = self.sampler.sample(self.params["negatives"], self.device)
        log_q = self.sampler.log_q if self.params["logq"] else None
        return sampled_softmax(vecs, targets, sampled, net.items.weight, net.bias, log_q)

    # ---- serving -----------------------------------------------------------------------------
    def _use_history(self, data: Interactions) -> None:
        _, items, _, indptr = sequences(data)
        self.user_history = last_items(items, indptr[:-1], indptr[1:], self.params["history"], self.n_items)

    def _tower(self, history: np.ndarray, codes: torch.Tensor) -> torch.Tensor:
        """User vectors at serving time: example age 0."""
        net: YouTubeNet = self.module
        history = torch.as_tensor(history, device=codes.device)
        return net.user_vectors(history, codes, torch.zeros(len(history), device=codes.device))

    def _scores(self, users: torch.Tensor) -> torch.Tensor:
        net: YouTubeNet = self.module
        vecs = self._tower(self.user_history[users.cpu().numpy()], net.user_codes[users])
        return vecs @ net.items.weight.T + net.bias

    def item_vectors(self) -> np.ndarray:
        """(n_items, dim + 1): output embeddings with the bias appended."""
        net: YouTubeNet = self.module
        return torch.cat([net.items.weight, net.bias[:, None]], dim=1).detach().cpu().numpy()

    def _with_one(self, vecs: torch.Tensor) -> np.ndarray:
        return torch.cat([vecs, torch.ones(len(vecs), 1, device=vecs.device)], dim=1).cpu().numpy()

    def user_vectors(self) -> np.ndarray:
        """(n_users, dim + 1) for the users of the fit (history = their latest items)."""
        net: YouTubeNet = self.module
        net.eval()
        with torch.no_grad():
            return self._with_one(self._tower(self.user_history, net.user_codes))

    def history_vectors(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """(len(histories), dim + 1) for users unseen at fit: item ids oldest first (unknown
        ids are skipped); demographics unknown."""
        net: YouTubeNet = self.module
        rows = history_windows(self.items, histories, self.params["history"], self.n_items)
        net.eval()
        with torch.no_grad():
            codes = torch.zeros(len(histories), len(net.side), dtype=torch.long, device=self.device)
            return self._with_one(self._tower(rows, codes))

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {"user_history": self.user_history}

    def _load_extra_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.user_history = arrays["user_history"]
