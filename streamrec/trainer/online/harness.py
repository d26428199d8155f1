"""`online-bpr` and `online-mf` for the prequential protocol: the live trainer's learning code on a
file, with the parameter server's tables in-process (`LocalStore`) instead of over the network."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamrec.trainer.evaluation.prequential import Catalogue, StreamBatch, register_online_model
from streamrec.trainer.online.batch import TrainBatch
from streamrec.trainer.online.learner import OnlineLearner
from streamrec.param_server.local_store import LocalStore
from streamrec.trainer.online.models import OnlineBPR, OnlineMF, OnlineModel


class PrequentialAdapter:
    """The harness's learner protocol (dense catalogue indices) over an `OnlineLearner` (ids)."""

    def __init__(self, catalogue: Catalogue, model: OnlineModel) -> None:
        self.catalogue = catalogue
        self.learner = OnlineLearner(LocalStore(), [model])
        self._catalogue_position = np.zeros(0, np.int64)  # mirror row -> catalogue index

    def learn_many(self, batch: StreamBatch) -> None:
        types = np.where(np.isfinite(batch.rating), "rating", "view").astype(object)
        self.learner.learn(TrainBatch(np.asarray(batch.user_id, dtype=object), np.asarray(batch.item_id, dtype=object),
                                      types, batch.rating, batch.timestamp))

    def score_users(self, users: np.ndarray) -> np.ndarray:
        scores = self.learner.item_scores(self.catalogue.users.ids[users], sync=True)
        item_ids = self.learner.ranker.items.index
        known = len(self._catalogue_position)
        if len(item_ids) > known:  # the mirror only appends: map the new rows once
            self._catalogue_position = np.concatenate(
                [self._catalogue_position, self.catalogue.items.index(item_ids[known:])])
        out = np.full((len(users), self.catalogue.n_items), -np.inf)
        out[:, self._catalogue_position] = scores
        return out


def _factory(cls: type[OnlineModel]):
    def build(catalogue: Catalogue, params: dict[str, Any]) -> PrequentialAdapter:
        return PrequentialAdapter(catalogue, cls(**params))

    return build


register_online_model(OnlineBPR.name)(_factory(OnlineBPR))
register_online_model(OnlineMF.name)(_factory(OnlineMF))
