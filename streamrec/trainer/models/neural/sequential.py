"""Sequence models: GRU4Rec (Hidasi et al. 2016) and Caser (Tang & Wang 2018).

Both predict the next item from the user's recent items; on the topn protocol that is the item after
the user's training history. GRU4Rec works on sessions cut from the log by an inactivity gap, with
session-parallel mini-batches (each lane of the batch walks one session; when it ends, the lane takes
the next session and its hidden state is reset) and one-step truncated backpropagation, as in the
paper. On a log without sessions it reads whole histories, and then trains as it scores: through
time over chunks of `history` items from a zero state. Caser convolves the embedding matrix of the
last L items horizontally (union-level patterns) and vertically (point-level patterns) and adds a
user embedding (long-term taste).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from streamrec.core.params import Choice, FloatRange, IntRange, space
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.neural.losses import (
    LogQSampler,
    bpr_loss,
    bpr_max_loss,
    cross_entropy_loss,
    top1_loss,
)
from streamrec.trainer.models.neural.training import (
    NeuralParams,
    NeuralRecommender,
    last_items,
    sample_negatives,
    sequences,
)
from streamrec.trainer.models.seen_pairs import SeenPairs


def sessions(data: Interactions, gap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Events in (user, time) order cut where the user changes or is idle longer than `gap`
    seconds: (items, session starts, session owner user)."""
    users, items, times, _ = sequences(data)
    cut = np.r_[True, (users[1:] != users[:-1]) | (np.diff(times) > gap)] if len(users) else np.zeros(0, bool)
    starts = np.flatnonzero(cut)
    return items, np.r_[starts, len(items)], users[starts]


MIN_SESSION_SHARE = 0.5  # events in sessions of two or more, below which GRU4Rec uses whole histories


def history_chunks(bounds: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of chunks of `length` + 1 events cut from each sequence `bounds[i]:bounds[i+1]`,
    consecutive chunks sharing one event so that every transition is in exactly one chunk;
    sequences of one event give none."""
    first, stop = bounds[:-1], bounds[1:]
    per_sequence = np.maximum(0, -(-(stop - first - 1) // length))
    owner = np.repeat(np.arange(len(first)), per_sequence)
    rank = np.arange(len(owner)) - np.repeat(np.cumsum(per_sequence) - per_sequence, per_sequence)
    starts = first[owner] + rank * length
    return starts, np.minimum(stop[owner], starts + length + 1)


class GRU4RecNet(nn.Module):
    """Item embedding -> GRU cell -> dot product with output item embeddings (+ bias)."""

    def __init__(self, n_items: int, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.pad = n_items
        self.embed = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.cell = nn.GRUCell(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Embedding(n_items, hidden)
        self.bias = nn.Parameter(torch.zeros(n_items))
        nn.init.normal_(self.embed.weight, std=0.05)
        nn.init.normal_(self.out.weight, std=0.05)

    def step(self, items: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.drop(self.cell(self.embed(items), h))

    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        """Hidden state after left-padded item windows (B, L); padding leaves the state at 0."""
        h = torch.zeros(len(windows), self.cell.hidden_size, device=windows.device)
        for t in range(windows.shape[1]):
            x = windows[:, t]
            h = torch.where((x != self.pad)[:, None], self.step(x, h), h)
        return h


class GRU4RecParams(NeuralParams):
    """Embedding and GRU widths, dropout, the ranking loss, popularity-sampled extra negatives
    (q ~ count^sample_alpha), the inactivity gap that ends a session (seconds), the history read
    at scoring time (and the chunk length of whole-history training)."""

    dim: int = 64
    hidden: int = 100
    dropout: float = 0.2
    loss: Literal["bpr", "top1", "bpr-max", "cross-entropy"] = "bpr"
    bpreg: float = Field(1.0, ge=0.0)  # BPR-max's score regularisation
    batch_size: int = 128
    negatives: int = 256
    sample_alpha: float = 0.5
    session_gap: float = 3600.0
    history: int = Field(50, ge=1)
    lr: float = 2e-3


class GRU4Rec(NeuralRecommender):
    """Session-based RNN with the published recipe's choices as parameters: session-parallel
    mini-batches, a ranking loss (BPR, TOP1, BPR-max or sampled softmax) over the in-batch targets
    plus shared popularity-sampled items (q ~ count^sample_alpha)."""

    name = "gru4rec"
    Params = GRU4RecParams
    search_space = space(**NeuralRecommender.search_space, loss=Choice(("bpr", "top1", "bpr-max", "cross-entropy")),
                         hidden=IntRange(32, 256, log=True), dropout=FloatRange(0.0, 0.5),
                         negatives=IntRange(32, 1024, log=True), sample_alpha=FloatRange(0.0, 1.0))

    def _prepare(self, train: Interactions, rng: np.random.Generator) -> None:
        gap = self._session_gap(train)
        self.items_seq, bounds, _ = sessions(train, gap)
        lengths = np.diff(bounds)
        self.sess_start, self.sess_end = bounds[:-1][lengths >= 2], bounds[1:][lengths >= 2]
        self.chunk_start, self.chunk_end = history_chunks(bounds, self.params["history"])
        counts = np.bincount(train.item_idx, minlength=train.n_items)
        self.sampler = LogQSampler(counts, self.params["sample_alpha"], self.params["seed"])
        self.dims = {"n_items": train.n_items, "session_gap": gap}

    @property
    def whole_histories(self) -> bool:
        return bool(np.isinf(self.dims["session_gap"]))

    def _session_gap(self, train: Interactions) -> float:
        """`session_gap`, unless it would leave most events in one-event sessions (a log whose
        users come back days apart has no sessions at that gap, and GRU4Rec would learn nothing):
        then each user's whole history is one sequence."""
        gap = float(self.params["session_gap"])
        _, bounds, _ = sessions(train, gap)
        lengths = np.diff(bounds)
        return gap if lengths[lengths >= 2].sum() >= MIN_SESSION_SHARE * len(train) else float("inf")

    def _build(self) -> nn.Module:
        p = self.params
        return GRU4RecNet(self.dims["n_items"], p["dim"], p["hidden"], p["dropout"])

    def _batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        return self._chunk_batches(rng) if self.whole_histories else self._session_batches(rng)

    def _chunk_batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        """Whole histories: shuffled chunks of `history` + 1 items, right-padded, as one (B, L+1)
        tensor per batch; `batch_size_for` keeps an epoch at its minimum of optimiser steps."""
        order = rng.permutation(len(self.chunk_start))
        width, pad = self.params["history"] + 1, self.dims["n_items"]
        per_batch = self.batch_size_for(len(order))
        for first in range(0, len(order), per_batch):
            chosen = order[first : first + per_batch]
            pos = self.chunk_start[chosen, None] + np.arange(width)[None, :]
            inside = pos < self.chunk_end[chosen, None]
            tokens = np.where(inside, self.items_seq[np.minimum(pos, len(self.items_seq) - 1)], pad)
            yield (torch.as_tensor(tokens, device=self.device),)

    def _session_batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        """Session-parallel: one step of every lane per batch, with lane bookkeeping for `_loss`."""
        order = rng.permutation(len(self.sess_start))
        lanes = order[: self.params["batch_size"]]
        upcoming = len(lanes)
        cursor, end = self.sess_start[lanes].copy(), self.sess_end[lanes].copy()
        keep, reset = np.arange(len(lanes)), np.ones(len(lanes), bool)
        self._state_h = torch.zeros(len(lanes), self.params["hidden"], device=self.device)
        while len(cursor):
            yield tuple(
                torch.as_tensor(a, device=self.device)
                for a in (self.items_seq[cursor], self.items_seq[cursor + 1], keep, reset)
            )
            cursor += 1
            done = np.flatnonzero(cursor + 1 >= end)
            refill = done[: max(0, min(len(done), len(order) - upcoming))]
            cursor[refill] = self.sess_start[order[upcoming : upcoming + len(refill)]]
            end[refill] = self.sess_end[order[upcoming : upcoming + len(refill)]]
            upcoming += len(refill)
            reset = np.zeros(len(cursor), bool)
            reset[refill] = True
            keep = np.setdiff1d(np.arange(len(cursor)), done[len(refill):])
            cursor, end, reset = cursor[keep], end[keep], reset[keep]

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self._chunk_loss(*batch) if self.whole_histories else self._session_loss(*batch)

    def _session_loss(self, inputs: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                      reset: torch.Tensor) -> torch.Tensor:
        """One step of every lane, the hidden state carried to the next batch without its graph
        (one-step truncated backpropagation); the batch's own targets are each other's negatives."""
        net: GRU4RecNet = self.module
        h = self._state_h[keep].masked_fill(reset[:, None], 0.0)
        h = net.step(inputs, h)
        self._state_h = h.detach()
        extra = self.sampler.sample(self.params["negatives"], self.device)
        candidates = torch.cat([targets, extra])
        scores = h @ net.out(candidates).T + net.bias[candidates]
        valid = (candidates[None, :] != targets[:, None]).float()
        return self._ranking_loss(scores.diagonal(), scores, valid)

    def _chunk_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Backpropagation through each chunk, from a zero state as at scoring time (`encode`), with
        a loss at every step: one-step truncation cannot learn to keep what a user's early items
        said, and on a log without sessions that is the signal (GRU4Rec on the weak-groups log of
        the never-below-popularity contract: +0.6 standard errors over popularity with it, +1.6
        this way). Negatives: `batch_size` of the batch's targets plus the sampled ones."""
        net: GRU4RecNet = self.module
        h = torch.zeros(len(tokens), self.params["hidden"], device=tokens.device)
        states, targets = [], []
        for t in range(tokens.shape[1] - 1):
            inputs, following = tokens[:, t], tokens[:, t + 1]
            live = following != net.pad
            if not bool(live.any()):  # chunks are left-aligned: nothing follows from here on
                break
            h = torch.where((inputs != net.pad)[:, None], net.cell(net.embed(inputs), h), h)
            states.append(net.drop(h)[live])
            targets.append(following[live])
        h, target = torch.cat(states), torch.cat(targets)
        shared = target[torch.randperm(len(target), device=target.device)[: self.params["batch_size"]]]
        candidates = torch.cat([shared, self.sampler.sample(self.params["negatives"], self.device)])
        pos = (h * net.out(target)).sum(-1) + net.bias[target]
        neg = h @ net.out(candidates).T + net.bias[candidates]
        return self._ranking_loss(pos, neg, (candidates[None, :] != target[:, None]).float())

    def _ranking_loss(self, pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        kind = self.params["loss"]
        if kind == "cross-entropy":
            return cross_entropy_loss(pos, neg, valid)
        if kind == "bpr-max":
            return bpr_max_loss(pos, neg, valid, self.params["bpreg"])
        return (bpr_loss if kind == "bpr" else top1_loss)(pos, neg, valid)

    def _use_history(self, data: Interactions) -> None:
        """Each user's last session (at most `history` items) is the input at scoring time."""
        items, bounds, owners = sessions(data, float(self.dims["session_gap"]))
        starts, ends = np.zeros(data.n_users, np.int64), np.zeros(data.n_users, np.int64)
        last = np.r_[owners[1:] != owners[:-1], True] if len(owners) else np.zeros(0, bool)
        starts[owners[last]], ends[owners[last]] = bounds[:-1][last], bounds[1:][last]
        self.user_windows = last_items(items, starts, ends, self.params["history"], self.n_items)

    def _scores(self, users: torch.Tensor) -> torch.Tensor:
        net: GRU4RecNet = self.module
        h = net.encode(torch.as_tensor(self.user_windows[users.cpu().numpy()], device=users.device))
        return h @ net.out.weight.T + net.bias

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {"user_windows": self.user_windows}

    def _load_extra_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.user_windows = arrays["user_windows"]


class CaserNet(nn.Module):
    """Horizontal convolutions (heights 1..L, max-pooled) and a vertical one over the last L
    item embeddings, a dense layer, then [z; user embedding] dotted with output item vectors."""

    def __init__(self, n_users: int, n_items: int, window: int, dim: int, n_h: int, n_v: int, dropout: float) -> None:
        super().__init__()
        self.pad = n_items
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.users = nn.Embedding(n_users, dim)
        self.vertical = nn.Conv2d(1, n_v, (window, 1))
        self.horizontal = nn.ModuleList(nn.Conv2d(1, n_h, (h, dim)) for h in range(1, window + 1))
        self.fc = nn.Linear(n_v * dim + n_h * window, dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Embedding(n_items, 2 * dim)
        self.bias = nn.Parameter(torch.zeros(n_items))
        for emb in (self.items, self.users, self.out):
            nn.init.normal_(emb.weight, std=1.0 / dim)

    def encode(self, users: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(B, 2 dim) sequence-and-user representation."""
        e = self.items(windows).unsqueeze(1)  # (B, 1, L, d)
        vertical = self.vertical(e).flatten(1)
        horizontal = [F.relu(conv(e).squeeze(3)).amax(dim=2) for conv in self.horizontal]
        z = F.relu(self.fc(self.drop(torch.cat([vertical, *horizontal], dim=1))))
        return torch.cat([z, self.users(users)], dim=1)


class CaserParams(NeuralParams):
    """The paper's: window L of recent items, T next items as targets, embedding width, n_h
    horizontal and n_v vertical filters, dropout, negatives per target, Adam's settings."""

    window: int = 5
    targets: int = 3
    dim: int = 50
    n_h: int = 16
    n_v: int = 4
    dropout: float = 0.5
    negatives: int = 3
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-6


class Caser(NeuralRecommender):
    """Convolutional sequence embedding; log loss on the next `targets` items and sampled negatives."""

    name = "caser"
    Params = CaserParams

    def _prepare(self, train: Interactions, rng: np.random.Generator) -> None:
        users, self.seq_items, _, indptr = sequences(train)
        self.seq_users = users
        self.seq_start, self.seq_end = indptr[users], indptr[users + 1]
        self.positions = np.flatnonzero(np.arange(len(users)) > self.seq_start)  # at least one item before
        self.seen_pairs = SeenPairs(train.binary())
        self.dims = {"n_users": train.n_users, "n_items": train.n_items}

    def _build(self) -> nn.Module:
        p = self.params
        return CaserNet(self.dims["n_users"], self.dims["n_items"], p["window"], p["dim"], p["n_h"], p["n_v"], p["dropout"])

    def _batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        p, pad = self.params, self.dims["n_items"]
        order = rng.permutation(self.positions)
        size = self.batch_size_for(len(order))
        for start in range(0, len(order), size):
            pos = order[start : start + size]
            users = self.seq_users[pos]
            windows = last_items(self.seq_items, self.seq_start[pos], pos, p["window"], pad)
            ahead = pos[:, None] + np.arange(p["targets"])[None, :]
            valid = ahead < self.seq_end[pos][:, None]
            targets = np.where(valid, self.seq_items[np.minimum(ahead, len(self.seq_items) - 1)], 0)
            negs = sample_negatives(rng, np.repeat(users, p["negatives"] * p["targets"]), self.seen_pairs, pad)
            yield tuple(
                torch.as_tensor(a, device=self.device)
                for a in (users, windows, targets, valid.astype(np.float32), negs.reshape(len(pos), -1))
            )

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        users, windows, targets, valid, negs = batch
        net: CaserNet = self.module
        x = net.encode(users, windows)[:, None, :]
        pos = (x * net.out(targets)).sum(-1) + net.bias[targets]
        neg = (x * net.out(negs)).sum(-1) + net.bias[negs]
        pos_loss = (F.softplus(-pos) * valid).sum() / valid.sum()
        return pos_loss + F.softplus(neg).mean() * self.params["targets"]

    def _use_history(self, data: Interactions) -> None:
        _, items, _, indptr = sequences(data)
        self.user_windows = last_items(items, indptr[:-1], indptr[1:], self.params["window"], self.n_items)

    def _scores(self, users: torch.Tensor) -> torch.Tensor:
        net: CaserNet = self.module
        x = net.encode(users, torch.as_tensor(self.user_windows[users.cpu().numpy()], device=users.device))
        return x @ net.out.weight.T + net.bias

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {"user_windows": self.user_windows}

    def _load_extra_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.user_windows = arrays["user_windows"]
