"""Feature-interaction models over one field encoder: Wide & Deep, DeepFM, DCN and DCN-v2.

Fields: user id, item id, then the side features when there are any (age bucket, gender,
occupation, zip region; release decade; genres as one multi-valued field, the mean of its genre
embeddings). Without side files the models see ids only (and Wide & Deep's wide part keeps just its
user id x genre cross when genres exist, else the first-order terms).

Trained pointwise (log loss, positives = interactions, sampled unobserved items as negatives), so
the same weights serve as a ranking stage: `export()` gives a JSON header plus numpy arrays,
and `load_ranker` rebuilds a scorer from them without pickle or this class.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from streamrec.trainer.features import load_side_features
from streamrec.trainer.interactions import IdIndex, Interactions
from streamrec.trainer.models.base import Capabilities
from streamrec.trainer.models.export import Export, RankerBlob
from streamrec.trainer.models.neural.history import HistoryPooling
from streamrec.trainer.models.neural.training import (
    PointwiseParams,
    PointwiseRecommender,
    int_list,
    load_numpy_state,
    mlp,
    to_numpy_state,
)

RANKER_FORMAT = "streamrec-ranker/1"
ARCH_PARAMS = ("dim", "hidden", "cross_layers", "dropout", "user_history")


def fm_second_order(fields: torch.Tensor) -> torch.Tensor:
    """Sum over field pairs of <v_i, v_j> in O(fields x dim): 0.5 * ((sum v)^2 - sum v^2)."""
    return 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(1)


class FieldTables(nn.Module):
    """One embedding table per field (width `dim`); genres pooled as the mean of their rows."""

    def __init__(self, n_users: int, n_items: int, user_cards: list[int], item_cards: list[int], n_genres: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users + 1, dim)
        self.item = nn.Embedding(n_items + 1, dim)
        self.user_fields = nn.ModuleList(nn.Embedding(c, dim) for c in user_cards)
        self.item_fields = nn.ModuleList(nn.Embedding(c, dim) for c in item_cards)
        self.genre = nn.Parameter(torch.randn(n_genres, dim) * 0.01) if n_genres else None
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, users: torch.Tensor, items: torch.Tensor, ucodes: torch.Tensor,
                icodes: torch.Tensor, genres: torch.Tensor) -> torch.Tensor:
        """(B, n_fields, dim): the user id, the item id, the user's fields, then the item's."""
        user, item = self.user_side(users, ucodes), self.item_side(items, icodes, genres)
        return torch.cat([user[:, :1], item[:, :1], user[:, 1:], item[:, 1:]], dim=1)

    def user_side(self, users: torch.Tensor, ucodes: torch.Tensor) -> torch.Tensor:
        """(B, 1 + user fields, dim): the user id's row, then the user's fields."""
        return torch.stack([self.user(users), *(emb(ucodes[:, f]) for f, emb in enumerate(self.user_fields))], dim=1)

    def item_side(self, items: torch.Tensor, icodes: torch.Tensor, genres: torch.Tensor) -> torch.Tensor:
        """(N, 1 + item fields (+ genres), dim): the item id's row, then the item's fields."""
        parts = [self.item(items), *(emb(icodes[:, f]) for f, emb in enumerate(self.item_fields))]
        if self.genre is not None:
            share = genres / genres.sum(1, keepdim=True).clamp(min=1)
            parts.append(share @ self.genre)
        return torch.stack(parts, dim=1)


class HistoryCross(nn.Module):
    """The cross of the user's items with the candidate item, `<p_u, q_i>` with `p_u` the pooled
    items (`HistoryPooling`): Wide & Deep's wide part crossed installed apps with the impression app;
    over a catalogue the full item x item weight matrix does not fit, so it is factorised, as FM
    factorises pairwise weights. It has its own tables: fed into the fields instead, the deep part
    (which shares the field embeddings) pulls every item vector to the popularity direction and the
    pooled history is not learned from (docs/models.md, "A user as their items").

    An exported ranker gets no user lists: there the pooled vectors are a plain table (`table`),
    filled with each known user's at export, zero for the unknown row; the item vectors `y` stay
    (`live`), so that serving can pool the user's items as they are now (Redis's seen set) instead
    of as they were at export. Rankers exported before `live` existed have the table only."""

    def __init__(self, n_users: int, n_items: int, dim: int, table: bool, live: bool) -> None:
        super().__init__()
        self.item = nn.Embedding(n_items + 1, dim)
        nn.init.normal_(self.item.weight, std=0.01)
        self.pooling = HistoryPooling(n_items, dim) if live or not table else None
        self.user = nn.Embedding(n_users + 1, dim) if table else None

    def forward(self, users: torch.Tensor, items: torch.Tensor, holdout: torch.Tensor | None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """`pooled` (B, dim), when given, replaces the users' pooled vectors."""
        if pooled is None:
            pooled = self.user(users) if self.user is not None else self.pooling(users, holdout)
        return (pooled * self.item(items)).sum(-1)


class CTRNet(nn.Module):
    """The field encoder with one of four interaction heads (`kind`); forward gives logits.

    Feature tables are buffers with one extra "unknown" row at index n_users / n_items, so the
    exported weights are self-contained and unknown ids score from the other fields only.
    """

    def __init__(self, kind: str, dims: dict[str, Any], params: dict[str, Any]) -> None:
        super().__init__()
        self.kind = kind
        n_users, n_items, dim = dims["n_users"], dims["n_items"], params["dim"]
        user_cards, item_cards, n_genres = dims["user_cards"], dims["item_cards"], dims["n_genres"]
        self.register_buffer("ucodes", torch.zeros(n_users + 1, len(user_cards), dtype=torch.long))
        self.register_buffer("icodes", torch.zeros(n_items + 1, len(item_cards), dtype=torch.long))
        self.register_buffer("genres", torch.zeros(n_items + 1, n_genres))
        self.embed = FieldTables(n_users, n_items, user_cards, item_cards, n_genres, dim)
        self.linear = FieldTables(n_users, n_items, user_cards, item_cards, n_genres, 1)
        # absent from the params of rankers exported before it existed
        self.history = (HistoryCross(n_users, n_items, dim, params.get("history_table", False),
                                     params.get("history_live", False))
                        if params.get("user_history", False) else None)
        self.bias = nn.Parameter(torch.zeros(1))
        width = (2 + len(user_cards) + len(item_cards) + (1 if n_genres else 0)) * dim
        hidden = int_list(params["hidden"])
        self.deep = mlp([width, *hidden], params["dropout"])
        deep_out = hidden[-1] if hidden else width
        if kind in ("dcn", "dcn-v2"):
            layers = params["cross_layers"]
            shape = (layers, width, width) if kind == "dcn-v2" else (layers, width)
            self.cross_w = nn.Parameter(torch.randn(*shape) * (width**-0.5 if kind == "dcn-v2" else 0.01))
            self.cross_b = nn.Parameter(torch.zeros(layers, width))
            self.head = nn.Linear(width + deep_out, 1)
        else:
            self.head = nn.Linear(deep_out, 1)
        if kind == "wide-deep" and n_genres:
            # wide cross-product features: (user id, each user field) x genre, one weight per pair
            self.wide = nn.ParameterList(nn.Parameter(torch.zeros(c, n_genres)) for c in [n_users + 1, *user_cards])

    def cross(self, x0: torch.Tensor) -> torch.Tensor:
        """x_{l+1} = x0 * (W_l x_l + b_l) + x_l (DCN-v2); DCN: x0 * (x_l . w_l) + b_l + x_l."""
        x = x0
        for w, b in zip(self.cross_w, self.cross_b):
            x = x0 * (x @ w.T + b) + x if self.kind == "dcn-v2" else x0 * (x @ w)[:, None] + b + x
        return x

    def columns(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the user's and the item's fields sit in a pair's flat input (`forward`'s x0)."""
        device = self.bias.device
        fields = torch.arange(2 + len(self.embed.user_fields) + len(self.embed.item_fields)
                              + (self.embed.genre is not None), device=device)
        user = torch.cat([fields[:1], fields[2 : 2 + len(self.embed.user_fields)]])
        item = torch.cat([fields[1:2], fields[2 + len(self.embed.user_fields) :]])
        offsets = torch.arange(dim, device=device)
        return (user[:, None] * dim + offsets).flatten(), (item[:, None] * dim + offsets).flatten()

    def all_item_logits(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        """(len(users), n_items) logits, the same function as `forward` over every pair, from each
        side's fields computed once: the first-order terms, the history cross, FM's pairwise term
        and Wide & Deep's crosses are sums of a user part, an item part and one user x item matrix
        product; the deep tower's first layer splits into its user and item columns, summed by
        broadcasting; DCN's cross layers keep every x_l on the line x0 * p_l + q_l, so they reduce
        to (users, items) scalars. Only DCN-v2's full-matrix crosses need each pair's input.
        Scoring every item per pair cost 70 % of a CTR fit (each epoch's validation)."""
        items = torch.arange(n_items, device=users.device)
        ucodes, icodes, genres = self.ucodes[users], self.icodes[items], self.genres[items]
        user, item = self.embed.user_side(users, ucodes), self.embed.item_side(items, icodes, genres)
        logits = (self.linear.user_side(users, ucodes).sum((1, 2))[:, None]
                  + self.linear.item_side(items, icodes, genres).sum((1, 2))[None, :] + self.bias)
        if self.history is not None:
            h = self.history
            pooled = h.user(users) if h.user is not None else h.pooling(users, None)
            logits = logits + pooled @ h.item(items).T
        xu, xi = user.flatten(1), item.flatten(1)
        ucols, icols = self.columns(user.shape[-1])

        def x0_dot(v: torch.Tensor) -> torch.Tensor:
            """(users, items) of each pair's input x0 times `v`."""
            return (xu @ v[ucols])[:, None] + (xi @ v[icols])[None, :]

        head, width = self.head.weight[0], len(ucols) + len(icols)
        crosses = self.kind in ("dcn", "dcn-v2")
        deep_head = head[width:] if crosses else head
        if len(self.deep):
            first, rest = self.deep[0], self.deep[1:]
            tower = rest((xu @ first.weight[:, ucols].T)[:, None, :] + (xi @ first.weight[:, icols].T + first.bias)[None])
            logits = logits + tower @ deep_head + self.head.bias
        else:  # no tower: the head reads x0 itself
            logits = logits + x0_dot(deep_head) + self.head.bias
        if self.kind == "dcn":
            p, q = xu.new_ones(()), xu.new_zeros(width)
            for w, b in zip(self.cross_w, self.cross_b):
                p, q = p * x0_dot(w) + q @ w + p, q + b
            return logits + p * x0_dot(head[:width]) + q @ head[:width]
        if self.kind == "dcn-v2":
            x0 = xu.new_empty(len(users), n_items, width)
            x0[..., ucols], x0[..., icols] = xu[:, None, :].expand(-1, n_items, -1), xi[None].expand(len(users), -1, -1)
            return logits + self.cross(x0.flatten(0, 1)).view(len(users), n_items, width) @ head[:width]
        if self.kind == "deepfm":
            logits = logits + (fm_second_order(user)[:, None] + fm_second_order(item)[None, :]
                               + user.sum(1) @ item.sum(1).T)
        elif self.kind == "wide-deep" and hasattr(self, "wide"):
            codes = torch.cat([users[:, None], ucodes], dim=1)
            logits = logits + sum(w[codes[:, f]] for f, w in enumerate(self.wide)) @ genres.T
        return logits

    def forward(self, users: torch.Tensor, items: torch.Tensor, holdout: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of (user, item) pairs; `holdout` as `HistoryPooling`'s, `pooled` as `HistoryCross`'s."""
        ucodes, icodes, genres = self.ucodes[users], self.icodes[items], self.genres[items]
        fields = self.embed(users, items, ucodes, icodes, genres)
        first = self.linear(users, items, ucodes, icodes, genres).sum((1, 2))
        if self.history is not None:
            first = first + self.history(users, items, holdout, pooled)
        x0 = fields.flatten(1)
        if self.kind in ("dcn", "dcn-v2"):
            return self.head(torch.cat([self.cross(x0), self.deep(x0)], dim=1)).squeeze(1) + first + self.bias
        logit = self.head(self.deep(x0)).squeeze(1) + first + self.bias
        if self.kind == "deepfm":
            logit = logit + fm_second_order(fields)
        elif self.kind == "wide-deep" and hasattr(self, "wide"):
            codes = torch.cat([users[:, None], ucodes], dim=1)
            logit = logit + sum((w[codes[:, f]] * genres).sum(1) for f, w in enumerate(self.wide))
        return logit


class CTRParams(PointwiseParams):
    """Field embedding width, deep tower widths, cross layers (DCN), dropout, sampled negatives
    per positive, a smaller validation sample (scoring every item per user is costly), and the
    cross of the user's items with the candidate (`user_history`, `HistoryCross`): on by default
    after `streamrec study-defaults --model wide-deep --model deepfm --model dcn --model dcn-v2
    --grid user_history=true` ranked it first on all five synthetic logs for all four heads, and
    for dcn-v2 also over MovieLens's three time splits (docs/models.md)."""

    dim: int = 16
    hidden: str = "128,64"
    cross_layers: int = 3
    dropout: float = 0.0
    negatives: int = 4
    batch_size: int = 2048
    lr: float = 5e-3
    weight_decay: float = 0.0
    val_users: int = 500
    user_history: bool = True


class DCNv2Params(CTRParams):
    """Full-matrix cross layers need room: at dim 16, hr@10 0.066; at dim 32, 0.091 (MovieLens 100K)."""

    dim: int = 32


class CTRRecommender(PointwiseRecommender):
    """Shared fit/score/export of the four heads; subclasses only name their `kind`."""

    Params = CTRParams
    capabilities: ClassVar[Capabilities] = Capabilities(implicit=True, side_features=True)

    @property
    @abstractmethod
    def kind(self) -> str:
        """Which head (`CTRNet` builds it and the published ranker records it)."""

    def _prepare(self, train: Interactions, rng: np.random.Generator) -> None:
        side = load_side_features(self.params["side_data"], train.users, train.items)
        self.side = side
        self._positives(train)
        self.dims = {
            "n_users": train.n_users, "n_items": train.n_items, "user_cards": list(side.user_cards),
            "item_cards": list(side.item_cards), "n_genres": int(side.genres.shape[1]),
        }

    def _exported_state(self) -> dict[str, np.ndarray]:
        """The weights plus a table of each known user's pooled vector (`HistoryCross`,
        `history_table`): serving pools a user's current items when it has them, else the table."""
        state = to_numpy_state(self.module)
        net: CTRNet = self.module
        if net.history is None:
            return state
        with torch.no_grad():
            pooled = net.history.pooling(torch.arange(len(self.users) + 1, device=self.device)).cpu().numpy()
        return state | {"history.user.weight": pooled}

    def _build(self) -> nn.Module:
        net = CTRNet(self.kind, self.dims, self.params)
        side = getattr(self, "side", None)
        if side is not None and side.has_any:
            with torch.no_grad():
                net.ucodes[:-1] = torch.tensor(side.user_codes)
                net.icodes[:-1] = torch.tensor(side.item_codes)
                net.genres[:-1] = torch.tensor(side.genres)
        return net

    def _scores(self, users: torch.Tensor) -> torch.Tensor:
        net: CTRNet = self.module
        return net.all_item_logits(users, self.n_items)

    def _export(self) -> Export:
        """The network as serving's rescoring stage (a JSON header plus arrays; see `load_ranker`)."""
        self._require_fitted()
        header = {
            "format": RANKER_FORMAT, "model": self.name, "kind": self.kind, "dims": self.dims,
            "params": {k: self.params[k] for k in ARCH_PARAMS} | {"history_table": True, "history_live": True},
        }
        arrays = {f"w.{k}": v for k, v in self._exported_state().items()}
        arrays.update(self.users.to_arrays("users"))
        arrays.update(self.items.to_arrays("items"))
        return Export(ranker=RankerBlob(header, arrays))


class Ranker:
    """A loaded ranking-stage model: `score(user_ids, item_ids)` -> click probabilities."""

    def __init__(self, net: CTRNet, users: IdIndex, items: IdIndex) -> None:
        self.net, self.users, self.items = net.eval(), users, items

    @property
    def uses_history(self) -> bool:
        """True when `score` can pool a user's current items (`history`)."""
        return self.net.history is not None and self.net.history.pooling is not None

    def score(self, user_ids: list[str] | np.ndarray, item_ids: list[str] | np.ndarray,
              context: dict[str, Any] | None = None, history: Collection[str] | None = None) -> np.ndarray:
        """Probability per (user, item) pair; unknown ids use the reserved unknown rows.
        `history`: every item the (one) user has interacted with, as of now; its known items are
        pooled instead of the user's row of the table filled at export (which stays the answer
        when it is None, empty or all unknown). `context` is accepted for interface stability;
        these models use no request context."""
        users = self.users.index(user_ids)
        items = self.items.index(item_ids)
        users[users < 0], items[items < 0] = len(self.users), len(self.items)
        with torch.no_grad():
            pooled = self._pooled(history, len(items))
            logits = self.net(torch.as_tensor(users), torch.as_tensor(items), pooled=pooled)
        return torch.sigmoid(logits).double().numpy()

    def _pooled(self, history: Collection[str] | None, pairs: int) -> torch.Tensor | None:
        if not history or not self.uses_history:
            return None
        known = self.items.index(list(history))
        known = known[known >= 0]
        if not len(known):
            return None
        return self.net.history.pooling.pool(torch.as_tensor(known)).expand(pairs, -1)


def load_ranker(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Ranker:
    """Rebuild a ranker published by `CTRRecommender.export` (weights only, no code objects)."""
    if header.get("format") != RANKER_FORMAT:
        raise ValueError(f"not a {RANKER_FORMAT} blob: {header.get('format')!r}")
    weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w.")}
    with torch.device("meta"):  # shapes only: a header may ask for any size, the arrays are what was sent
        shapes = {name: tuple(t.shape) for name, t in CTRNet(header["kind"], header["dims"], header["params"])
                  .state_dict().items()}
    sent = {name: tuple(np.shape(v)) for name, v in weights.items()}
    if shapes != sent:
        wrong = sorted(set(shapes) ^ set(sent)) or sorted(n for n in shapes if shapes[n] != sent[n])
        raise ValueError(f"ranker header and weights disagree ({', '.join(wrong[:5])}): not built")
    net = CTRNet(header["kind"], header["dims"], header["params"])
    load_numpy_state(net, weights)
    return Ranker(net, IdIndex.from_arrays(arrays, "users"), IdIndex.from_arrays(arrays, "items"))


class WideDeep(CTRRecommender):
    name = "wide-deep"
    kind = "wide-deep"


class DeepFM(CTRRecommender):
    name = "deepfm"
    kind = "deepfm"


class DCN(CTRRecommender):
    name = "dcn"
    kind = "dcn"


class DCNv2(CTRRecommender):
    name = "dcn-v2"
    kind = "dcn-v2"
    Params = DCNv2Params
