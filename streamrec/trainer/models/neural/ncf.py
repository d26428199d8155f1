"""Neural Collaborative Filtering (He et al. 2017): GMF, MLP and NeuMF.

Pointwise log loss on observed pairs plus `negatives` uniformly sampled unobserved items per
positive, resampled every epoch (the paper's setting). NeuMF can start from a fitted GMF and MLP
(`pretrain`), with the output layer `[alpha * h_gmf, (1 - alpha) * h_mlp]` and plain SGD after,
as in the paper (Adam's moments are not part of the pretrained state).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.neural.history import HistoryPooling
from streamrec.trainer.models.neural.training import (
    PointwiseParams,
    PointwiseRecommender,
    int_list,
    mlp,
)


class NCFNet(nn.Module):
    """GMF and/or MLP branches over separate embeddings, one linear output on their concat."""

    def __init__(self, n_users: int, n_items: int, factors: int, layers: list[int], gmf: bool, use_mlp: bool,
                 history: bool = False) -> None:
        super().__init__()
        self.gmf, self.use_mlp = gmf, use_mlp
        width = 0
        if gmf:
            self.gmf_user, self.gmf_item = nn.Embedding(n_users, factors), nn.Embedding(n_items, factors)
            self.gmf_history = HistoryPooling(n_items, factors) if history else None
            width += factors
        if use_mlp:
            self.mlp_user = nn.Embedding(n_users, layers[0] // 2)
            self.mlp_item = nn.Embedding(n_items, layers[0] - layers[0] // 2)
            self.mlp_history = HistoryPooling(n_items, layers[0] // 2) if history else None
            self.mlp = mlp(layers)
            width += layers[-1]
        self.out = nn.Linear(width, 1)
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.01)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def user_vectors(table: nn.Embedding, pooling: HistoryPooling | None, users: torch.Tensor,
                     holdout: torch.Tensor | None) -> torch.Tensor:
        """A branch's user vectors: the id row, plus the pooled items when the branch has them."""
        return table(users) if pooling is None else table(users) + pooling(users, holdout)

    def branches(self, users: torch.Tensor, items: torch.Tensor, holdout: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if self.gmf:
            parts.append(self.user_vectors(self.gmf_user, self.gmf_history, users, holdout) * self.gmf_item(items))
        if self.use_mlp:
            user = self.user_vectors(self.mlp_user, self.mlp_history, users, holdout)
            parts.append(self.mlp(torch.cat([user, self.mlp_item(items)], dim=-1)))
        return torch.cat(parts, dim=-1)

    def forward(self, users: torch.Tensor, items: torch.Tensor, holdout: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of (user, item) pairs (any matching shapes); `holdout` as `HistoryPooling`'s."""
        return self.out(self.branches(users, items, holdout)).squeeze(-1)

    def all_item_logits(self, users: torch.Tensor) -> torch.Tensor:
        """(len(users), n_items) logits, the same function as `forward` over every pair, without
        building a pair's inputs: the output layer is linear, so GMF's share is one matrix product,
        and the tower's first layer splits into its user and item columns, computed once per user
        and once per item and summed by broadcasting. Scoring every item (each epoch's validation,
        evaluation, serving's candidates) cost a lookup, a concatenation and a first-layer product
        per pair: 70 % of an NCF-MLP fit on 6,000 sessions."""
        weight, logits = self.out.weight[0], self.out.bias
        width = 0
        if self.gmf:
            width = self.gmf_item.embedding_dim
            user = self.user_vectors(self.gmf_user, self.gmf_history, users, None)
            logits = logits + user @ (self.gmf_item.weight * weight[:width]).T
        if self.use_mlp:
            split = self.mlp_user.embedding_dim
            user = self.user_vectors(self.mlp_user, self.mlp_history, users, None)
            if len(self.mlp):
                first, rest = self.mlp[0], self.mlp[1:]
                item = self.mlp_item.weight @ first.weight[:, split:].T + first.bias
                logits = logits + rest((user @ first.weight[:, :split].T)[:, None, :] + item[None, :, :]) @ weight[width:]
            else:  # a one-width tower is no layer: the output reads the concatenation itself
                logits = (logits + (user @ weight[width : width + split])[:, None]
                          + (self.mlp_item.weight @ weight[width + split :])[None, :])
        return logits


class NCFParams(PointwiseParams):
    """The paper's setting: GMF factors, MLP tower widths (the first is the concatenated
    embedding), 4 sampled negatives per positive."""

    factors: int = 32
    mlp_layers: str = "64,32,16"
    negatives: int = 4
    lr: float = 5e-3
    batch_size: int = 2048


class GMFParams(NCFParams):
    """NCF's, with L2 on the embedding rows each batch looks up (`embedding_reg`) and users known
    by their items too (`user_history`): chosen by `streamrec study-defaults --model ncf-gmf
    --grid embedding_reg=0.01 --data ml-100k` (mean rank 1.19 against 1.81 for none) and then
    `--grid user_history=true` (1.125 against 1.875) on the validation splits of five synthetic
    logs and three time splits of MovieLens 100K's training part (docs/models.md)."""

    embedding_reg: float = Field(0.01, ge=0.0)
    user_history: bool = True


class MLPParams(NCFParams):
    """NCF's, with a wider, shorter tower (128 -> 64, so 64-wide user and item embeddings):
    `streamrec study-defaults --model ncf-mlp --grid mlp_layers=128/64/32,128/64 --data ml-100k`
    on validation splits of five synthetic logs and three time splits of MovieLens 100K's training
    part. Both beat the paper's 64/32/16 (mean rank 1.81 and 2.06 against 2.13); 128/64/32 ranks
    first but is below popularity on short histories, where 128/64 is 0.175 against popularity's
    0.140, and a default must never be below popularity (the report's `best_never_below_popularity`;
    docs/models.md). NeuMF keeps the paper's tower: its pretraining passes its own."""

    mlp_layers: str = "128,64"


class NeuMFParams(NCFParams):
    """NCF's, plus pretraining from GMF and MLP, the mix `alpha` of their output layers and the
    learning rate of the plain SGD that follows (the paper). It keeps the early stopping it had
    before the refit and the blend-judged stopping (`refit=false stop_on=model`): `streamrec
    study-defaults --model neumf --grid refit=true,false --grid stop_on=blend,model --data ml-100k`
    ranks it first on validation (2.81, against 2.94 for the common loop; docs/models.md). Users
    are known by their items too (`user_history`, in both branches and in the pretrained GMF and
    MLP): `streamrec study-defaults --model neumf --grid user_history=true --data ml-100k` ranks
    it 1.125 against 1.875."""

    user_history: bool = True
    refit: bool = False
    stop_on: Literal["blend", "model"] = "model"

    pretrain: bool = True
    alpha: float = 0.5
    pretrain_lr: float = 0.05


class GMF(PointwiseRecommender):
    """Generalised MF: a learned weighting of the element-wise product of embeddings."""

    name = "ncf-gmf"
    Params = GMFParams
    branches: ClassVar[tuple[bool, bool]] = (True, False)

    def _prepare(self, train: Interactions, rng: np.random.Generator) -> None:
        self._positives(train)
        self.dims = {"n_users": train.n_users, "n_items": train.n_items}

    def _build(self) -> nn.Module:
        gmf, use_mlp = self.branches
        return NCFNet(
            self.dims["n_users"], self.dims["n_items"], self.params["factors"],
            int_list(self.params["mlp_layers"]), gmf, use_mlp, self.params["user_history"],
        )

    def _scores(self, users: torch.Tensor) -> torch.Tensor:
        net: NCFNet = self.module
        return net.all_item_logits(users)


class MLPRecommender(GMF):
    """NCF's MLP branch alone: a tower over the concatenated user and item embeddings."""

    name = "ncf-mlp"
    Params = MLPParams
    branches = (False, True)


class NeuMF(GMF):
    """GMF and MLP fused under one output layer; optionally pretrained from both (the paper)."""

    name = "neumf"
    Params = NeuMFParams
    branches = (True, True)

    def _pretrain(self, interactions: Interactions) -> None:
        if not self.params["pretrain"]:
            return
        # without their refits: each branch then never learns the events NeuMF validates on
        # (each user's last), as NeuMF's own split holds them out too
        shared = {k: v for k, v in self.params.items() if k in NCFParams.model_fields} | {"refit": False}
        gmf = GMF(**shared).fit(interactions).module
        mlp_net = MLPRecommender(**shared).fit(interactions).module
        alpha = self.params["alpha"]
        net: NCFNet = self.module
        with torch.no_grad():
            for name in ("gmf_user", "gmf_item", "gmf_history"):
                if getattr(net, name) is not None:
                    getattr(net, name).load_state_dict(getattr(gmf, name).state_dict())
            for name in ("mlp_user", "mlp_item", "mlp_history", "mlp"):
                if getattr(net, name) is not None:
                    getattr(net, name).load_state_dict(getattr(mlp_net, name).state_dict())
            net.out.weight.copy_(torch.cat([alpha * gmf.out.weight, (1 - alpha) * mlp_net.out.weight], dim=1))
            net.out.bias.copy_(alpha * gmf.out.bias + (1 - alpha) * mlp_net.out.bias)

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.params["pretrain"]:
            return torch.optim.SGD(self.module.parameters(), lr=self.params["pretrain_lr"])
        return super()._optimizer()
