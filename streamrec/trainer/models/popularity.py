"""Popularity: every user gets the most-interacted items. The baseline every model must beat."""

from __future__ import annotations

import numpy as np

from streamrec.core.params import ModelParams
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Capabilities, Recommender


class PopularityParams(ModelParams):
    """Popularity has no hyperparameters."""


class Popularity(Recommender):
    """Score of an item = its number of distinct training users (same for every user)."""

    name = "popularity"
    capabilities = Capabilities(implicit=True)
    Params = PopularityParams

    def _fit(self, interactions: Interactions) -> None:
        """Nothing beyond the counts `Recommender.fit` keeps."""

    def _user_scores(self, users: np.ndarray) -> np.ndarray:
        return self._cold_user_scores(len(users))

    def _state(self) -> dict[str, np.ndarray]:
        return {}

    def _load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Popularity is restored by the base class."""
