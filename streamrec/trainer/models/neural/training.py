"""What every neural model shares: seeding and threads, the epoch loop with early stopping on a
validation split, progress on stderr, negative sampling, and persistence of torch weights as npz.

A model subclasses `NeuralRecommender` and writes `_prepare` (training structures from the
training part), `_build` (the `nn.Module`, from `self.dims` only, so `load` can rebuild it),
`_batches` (one epoch of tensors), `_loss` and `_scores` (all-item scores for a batch of users).
"""

from __future__ import annotations

import copy
import sys
import time
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from torch import nn

from streamrec.core.params import Choice, FloatRange, IntRange, SearchSpace, space
from streamrec.trainer.interactions import IdIndex, Interactions
from streamrec.trainer.models.base import (
    MIN_VALIDATION_USERS,
    Capabilities,
    Recommender,
)
from streamrec.trainer.models.neural import distributed
from streamrec.trainer.models.neural.distributed import parallel_loss
from streamrec.trainer.models.neural.history import HistoryPooling
from streamrec.trainer.models.popularity_blend import RankingParams
from streamrec.trainer.models.seen_pairs import SeenPairs
from streamrec.trainer.ranks import requested

SCORE_BATCH = 256  # users scored per forward pass
_console = Console(file=sys.stderr)


def configure(seed: int, threads: int, device: str) -> torch.device:
    """Seed torch, cap its threads (the machine is shared) and pick the device."""
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(threads)))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda requested but torch sees no GPU")
    return torch.device(device)


def to_numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    """A module's parameters and buffers as numpy arrays (what `save` writes, no pickle)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_numpy_state(module: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)


def int_list(text: str) -> list[int]:
    """'64,32,16' (or '64/32/16', which a comma-separated `--grid` of towers can hold) -> [64, 32,
    16]: list hyperparameters travel as strings through --param."""
    return [int(v) for v in str(text).replace(" ", "").replace("/", ",").split(",") if v]


def mlp(sizes: list[int], dropout: float = 0.0, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear + activation (+ dropout) per consecutive pair of `sizes`."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), activation()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def shuffled_batches(
    rng: np.random.Generator, arrays: list[np.ndarray], batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Equal-length arrays, shuffled together, as mini-batches of tensors on `device`."""
    order = rng.permutation(len(arrays[0]))
    tensors = [torch.as_tensor(a[order], device=device) for a in arrays]
    for start in range(0, len(order), batch_size):
        yield tuple(t[start : start + batch_size] for t in tensors)


def sample_negatives(
    rng: np.random.Generator, users: np.ndarray, seen: SeenPairs, n_items: int, rounds: int = 5
) -> np.ndarray:
    """One uniformly sampled unobserved item per entry of `users` (a few rejection rounds)."""
    items = rng.integers(0, n_items, len(users))
    for _ in range(rounds):
        bad = np.flatnonzero(seen.contains(users, items))
        if not len(bad):
            break
        items[bad] = rng.integers(0, n_items, len(bad))
    return items


def pointwise_batches(
    rng: np.random.Generator, pos_users: np.ndarray, pos_items: np.ndarray, seen: SeenPairs,
    n_items: int, negatives: int, batch_size: int, device: torch.device,
    shown: tuple[np.ndarray, np.ndarray] | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch of (user, item, label) batches: every positive plus `negatives` fresh samples
    each, plus every (user, item) pair of `shown` (shown to the user, never picked) as a negative."""
    neg_users = np.repeat(pos_users, negatives)
    neg_items = sample_negatives(rng, neg_users, seen, n_items)
    if shown is not None:
        neg_users, neg_items = np.concatenate([neg_users, shown[0]]), np.concatenate([neg_items, shown[1]])
    users = np.concatenate([pos_users, neg_users])
    items = np.concatenate([pos_items, neg_items])
    labels = np.r_[np.ones(len(pos_users), np.float32), np.zeros(len(neg_users), np.float32)]
    return shuffled_batches(rng, [users, items, labels], batch_size, device)


def sequences(data: Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Events sorted by (user, time, item): (users, items, timestamps, indptr per user)."""
    order = np.lexsort((data.item_idx, data.timestamps, data.user_idx))
    users = data.user_idx[order]
    indptr = np.zeros(data.n_users + 1, np.int64)
    np.add.at(indptr, users + 1, 1)
    return users, data.item_idx[order], data.timestamps[order], np.cumsum(indptr)


def last_items(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, length: int, pad: int) -> np.ndarray:
    """(len(ends), length) windows of `items[starts:ends]` (the latest `length` of each),
    right-aligned and left-padded with `pad`."""
    pos = ends[:, None] - length + np.arange(length)[None, :]
    valid = pos >= starts[:, None]
    return np.where(valid, items[np.clip(pos, 0, max(len(items) - 1, 0))], pad)


def history_windows(index: IdIndex, histories: Sequence[Sequence[str]], length: int, pad: int) -> np.ndarray:
    """Item-id histories (oldest first) of users unseen at fit -> padded index windows like
    `last_items` (ids unknown to the model are skipped)."""
    rows = np.full((len(histories), length), pad, np.int64)
    for n, items in enumerate(histories):
        known = index.index(list(items))
        known = known[known >= 0][-length:]
        if len(known):
            rows[n, -len(known):] = known
    return rows


class EmbeddingPenalty:
    """L2 on the embedding rows a training batch looks up, `weight` x the batch mean of each
    lookup's squared norm, summed over the model's embedding tables (BPR's per-sample
    regularisation, for any network). Adam's `weight_decay` is no substitute: it shrinks every row
    at every step, and Adam rescales that shrinkage, so rows a batch rarely touches (rare items,
    users with a few events) are wiped out."""

    def __init__(self, module: nn.Module, weight: float) -> None:
        self.weight, self.outputs = weight, []
        self.handles = [m.register_forward_hook(self._collect) for m in module.modules()
                        if isinstance(m, nn.Embedding)] if weight > 0 else []

    def _collect(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module.training:
            self.outputs.append(output)

    def take(self) -> torch.Tensor | float:
        """The penalty of the lookups since the last call (0 when off)."""
        penalty = sum((o.pow(2).sum(-1).mean() for o in self.outputs), torch.zeros(()))
        self.outputs = []
        return self.weight * penalty if self.handles else 0.0

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class NeuralParams(RankingParams):
    """What every neural family shares: Adam's settings, early stopping (`patience` epochs without
    a better validation ndcg@10 over `val_users` users; 0 = off) of the ranking served
    (`stop_on=blend`: the popularity blend's, see `_train_epochs`) or of the raw scores (`model`),
    `refit` (train again on every event, validation included, for the epoch count that validated
    best), seeding, torch threads and device, and `side_data`, the folder of MovieLens side files
    ("" = ids only)."""

    epochs: int = 30
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3
    val_users: int = 1000
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    side_data: str = ""
    embedding_reg: float = Field(0.0, ge=0.0)
    refit: bool = True
    stop_on: Literal["blend", "model"] = "blend"


UNLEARNED_PATIENCE = 3  # times `patience`, while the blend has not yet beaten popularity (see `_train_epochs`)
MIN_STEPS_PER_EPOCH, MIN_BATCH = 200, 32  # batches shrink on small logs (see `batch_size_for`)


class NeuralRecommender(Recommender):
    """Base of the torch models: fit with early stopping, all-item scoring, npz persistence."""

    capabilities: ClassVar[Capabilities] = Capabilities(implicit=True)
    Params: ClassVar[type[NeuralParams]] = NeuralParams
    data_parallel: ClassVar[bool] = False  # batches of independent examples: `--nproc` may slice them (distributed.py)
    # what every family shares; the budget (`tune --budget-seconds`) keeps this practical on 2 cores
    search_space: ClassVar[SearchSpace] = space(lr=FloatRange(1e-4, 1e-2, log=True), epochs=IntRange(5, 50),
                                           weight_decay=FloatRange(1e-8, 1e-3, log=True),
                                           embedding_reg=FloatRange(1e-4, 0.1, log=True))

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.module: nn.Module | None = None
        self.dims: dict[str, Any] = {}
        self.device = torch.device("cpu")
        self.history: list[dict[str, float]] = []

    # ---- hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _prepare(self, train: Interactions, rng: np.random.Generator) -> None:
        """Training structures from the training part; must set `self.dims`."""

    @abstractmethod
    def _build(self) -> nn.Module:
        """The network, from `self.dims` and `self.params` alone."""

    @abstractmethod
    def _batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch of mini-batches (already on `self.device`)."""

    @abstractmethod
    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean loss of one mini-batch."""

    @abstractmethod
    def _scores(self, users: torch.Tensor) -> torch.Tensor:
        """(len(users), n_items) scores from the current weights (called under no_grad)."""

    def _pretrain(self, interactions: Interactions) -> None:
        """Initialise the fresh module from other fitted models (NeuMF from GMF and MLP); the
        refit starts from the same initial weights."""

    def _use_history(self, data: Interactions) -> None:
        """Keep what scoring needs from `data` (sequence models: each user's recent items)."""

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {}

    def _load_extra_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what `_extra_state` returned."""

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.module.parameters(), lr=self.params["lr"], weight_decay=self.params["weight_decay"]
        )

    def batch_size_for(self, examples: int) -> int:
        """`batch_size`, shrunk on small data so that an epoch of `examples` still takes
        `MIN_STEPS_PER_EPOCH` optimiser steps: with batches of 512-2,048 a log of a few thousand
        events gives a network a few steps per epoch, early stopping ends it before it learns, and
        the family stays at popularity's hit rate (NCF, the CTR families, Caser and YouTube DNN on
        small logs with planted groups or short sessions). DSSM does not use it: its batch is its
        in-batch negatives (halving it cost MovieLens 0.0095 hr@10). On MovieLens 100K the others
        keep their defaults or nearly (YouTube DNN 495 instead of 512, Caser the same)."""
        return int(min(self.params["batch_size"], max(MIN_BATCH, examples // MIN_STEPS_PER_EPOCH)))

    # ---- training ----------------------------------------------------------------------------
    def _fit(self, interactions: Interactions) -> None:
        """Hold out each user's last training event for early stopping and the popularity blend's
        weight, train, then (`refit`) train a fresh network on every event for the epoch count that
        validated best. Without the refit the network never learns from each user's latest event:
        on short sessions that is a third of the log and the most telling click (ncf-gmf on
        anonymous sessions: hr@10 0.30 without it, 0.39 with it)."""
        from streamrec.trainer.evaluation.splits import leave_last_out

        p = self.params
        self.device = configure(p["seed"], p["threads"], p["device"])
        if requested():
            if not self.data_parallel:
                raise ValueError(f"{self.name} cannot be trained data-parallel (--nproc): its batches are not "
                                 "independent examples (see streamrec.trainer.models.neural.distributed)")
            distributed.join(self.device)
        rng = np.random.default_rng(p["seed"])
        train_mask, val = leave_last_out(interactions)
        if p["patience"] <= 0 or not len(val):
            train_mask, val = np.ones(len(interactions), bool), val[:0]
        if len(val) > p["val_users"]:
            val = np.sort(rng.choice(val, p["val_users"], replace=False))
        train = interactions.subset(train_mask)
        self._prepare(train, rng)
        self.module = self._build().to(self.device)
        self._pretrain(interactions)
        initial = copy.deepcopy(self.module.state_dict())
        self.history = []
        self._use_history(train)
        epochs = self._train_epochs(rng, interactions.user_idx[val], interactions.item_idx[val], p["epochs"])
        if p["popularity_blend"] == "auto" and len(val) >= MIN_VALIDATION_USERS:  # the early-stopping split
            self._validated_blend = self.validated_blend(interactions.user_idx[val], interactions.item_idx[val])
        if p["refit"] and len(val):
            self._prepare(interactions, rng)
            self.module.load_state_dict(initial)
            self._train_epochs(rng, val[:0], val[:0], epochs, refit=True)
        self._use_history(interactions)

    def _train_epochs(self, rng: np.random.Generator, val_users: np.ndarray, val_items: np.ndarray,
                      epochs: int, refit: bool = False) -> int:
        """Train up to `epochs` epochs (`refit`: the second pass of `_fit`, on every event); with
        validation pairs, stop after `patience` epochs without a better validation ndcg@10 and keep
        the best weights. What is judged is the ranking the model will serve: with
        `popularity_blend=auto` and `stop_on=blend` the raw scores under the blend's best weight
        (`validation_ndcg`), and until that has once beaten popularity alone significantly the
        patience is `UNLEARNED_PATIENCE` times as long (a network that has not yet learned anything
        beyond the floor is not done after a few flat epochs: GRU4Rec on anonymous sessions sat at
        popularity's exact figure for eight, then rose; a log without signal still ends).
        Returns the number of epochs of the weights kept."""
        from streamrec.trainer.evaluation.topn import validation_ndcg

        p = self.params
        optimizer = self._optimizer()
        penalty = EmbeddingPenalty(self.module, p["embedding_reg"])
        loss_of = parallel_loss(self.module, self._loss)  # `_loss` itself in a single process
        judge_blend = p["stop_on"] == "blend" and p["popularity_blend"] == "auto"
        best, best_state, best_epochs, waited = -np.inf, None, epochs, 0
        learned = not len(val_users) or not judge_blend
        phase = f"{self.name} {'refit epoch' if refit else 'epoch'}"
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=_console, transient=True, disable=not _console.is_terminal) as bar:
            task = bar.add_task(f"{phase} 1", total=epochs)
            for epoch in range(epochs):
                start, total, count = time.perf_counter(), 0.0, 0
                self.module.train()
                for batch in self._batches(rng):
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_of(batch)
                    if loss is None:  # fewer rows than ranks: skipped by every rank
                        continue
                    (loss + penalty.take()).backward()
                    optimizer.step()
                    total += float(loss.detach())
                    count += 1
                report = {"epoch": epoch + 1, "loss": total / max(count, 1), "seconds": time.perf_counter() - start}
                if refit:
                    report["refit"] = 1.0
                if len(val_users):
                    scored = validation_ndcg(self, val_users, val_items)
                    report["val_ndcg@10"] = scored.raw
                    if judge_blend:
                        report["val_blend_ndcg@10"] = scored.blended
                    learned = learned or scored.beats_popularity
                self.history.append(report)
                shown = " ".join(f"{k} {v:.4f}" for k, v in report.items() if k not in ("epoch", "seconds"))
                bar.update(task, advance=1, description=f"{phase} {epoch + 1} {shown}")
                if not len(val_users):
                    continue
                judged = report.get("val_blend_ndcg@10", report["val_ndcg@10"])
                if judged > best:
                    best, best_epochs, waited = judged, epoch + 1, 0
                    best_state = copy.deepcopy(self.module.state_dict())
                else:
                    waited += 1
                    if waited >= p["patience"] * (1 if learned else UNLEARNED_PATIENCE):
                        break
        penalty.close()
        if best_state is not None:
            self.module.load_state_dict(best_state)
        self.module.eval()
        return best_epochs

    # ---- scoring -----------------------------------------------------------------------------
    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        self.module.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(users), SCORE_BATCH):
                block = torch.as_tensor(users[start : start + SCORE_BATCH], device=self.device)
                out.append(self._scores(block).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.n_items))

    # ---- persistence -------------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        state = {f"w.{k}": v for k, v in to_numpy_state(self.module).items()}
        state.update({f"dims.{k}": np.asarray(v) for k, v in self.dims.items()})
        state.update({f"x.{k}": v for k, v in self._extra_state().items()})
        return state

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.device = torch.device("cpu")
        self.dims = {k[5:]: v.tolist() for k, v in arrays.items() if k.startswith("dims.")}
        self.module = self._build()
        load_numpy_state(self.module, {k[2:]: v for k, v in arrays.items() if k.startswith("w.")})
        self.module.eval()
        self._load_extra_state({k[2:]: v for k, v in arrays.items() if k.startswith("x.")})


class PointwiseParams(NeuralParams):
    """What the pointwise families add: `user_history`, a user known by the items they
    interacted with as well as by an id embedding (`HistoryPooling`, SVD++'s implicit term). Off
    unless a family's study says otherwise (those of ncf-gmf, neumf and the CTR heads do; NCF's
    MLP tower does not learn from it, docs/models.md)."""

    user_history: bool = False
    # every pair serving showed and the user never picked is a negative in each epoch, beside the
    # sampled ones: needs a log with impressions (`streamrec refit --impressions`)
    impression_negatives: bool = False


class PointwiseRecommender(NeuralRecommender):
    """Models trained as binary classifiers of (user, item) pairs: every positive plus sampled
    negatives, binary cross-entropy on `module(users, items, holdout)` logits (NCF and the CTR
    families). Subclasses call `_positives` and set `dims["n_items"]` in `_prepare`; their modules'
    history poolings get the training pairs (`seen_pairs`) for each epoch and every user's items for
    scoring. With `impression_negatives`, what serving showed and the user never picked joins the
    negatives (`Interactions.shown`)."""

    Params: ClassVar[type[NeuralParams]] = PointwiseParams
    search_space: ClassVar[SearchSpace] = space(**NeuralRecommender.search_space, user_history=Choice((False, True)))
    data_parallel = True

    def _poolings(self) -> list[HistoryPooling]:
        return [m for m in self.module.modules() if isinstance(m, HistoryPooling)] if self.module is not None else []

    shown_pairs: tuple[np.ndarray, np.ndarray] | None = None  # (users, items) shown and never picked

    def _positives(self, train: Interactions) -> None:
        """The training pairs (one per distinct user and item), the seen pairs that sampling
        avoids, and with `impression_negatives` the pairs shown but not picked in this split."""
        users, items, _, _ = train.pair_view()
        self.pos_users, self.pos_items = users, items
        self.seen_pairs = SeenPairs(train.binary())
        if not self.params["impression_negatives"]:
            self.shown_pairs = None
        elif train.shown is None:
            raise ValueError(f"{self.name}: impression_negatives needs a log with impressions "
                             "(streamrec refit --impressions)")
        else:
            shown = train.shown.tocoo()  # with_shown left out every pair picked anywhere in the log
            self.shown_pairs = (shown.row.astype(np.int64), shown.col.astype(np.int64))

    def _batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        p = self.params
        for pooling in self._poolings():  # the refit trains on more events than the first pass
            pooling.attach(self.seen_pairs.matrix, self.device)
        extra = len(self.shown_pairs[0]) if self.shown_pairs is not None else 0
        return pointwise_batches(
            rng, self.pos_users, self.pos_items, self.seen_pairs, self.dims["n_items"], p["negatives"],
            self.batch_size_for(len(self.pos_users) * (1 + p["negatives"]) + extra), self.device, self.shown_pairs,
        )

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        users, items, labels = batch
        holdout = torch.where(labels > 0, items, -1)  # a positive's item is in its user's history
        return F.binary_cross_entropy_with_logits(self.module(users, items, holdout), labels)

    def _use_history(self, data: Interactions) -> None:
        for pooling in self._poolings():
            pooling.attach(data.binary(), self.device)

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """The user lists are the saved `seen` matrix. Models saved before `user_history` existed
        have no pooling weights: they load without it."""
        if not any(k.startswith("w.") and "history." in k for k in arrays):
            self.params["user_history"] = False
        super()._load_state(arrays)
        for pooling in self._poolings():
            pooling.attach(self.seen, self.device)
