"""Never below popularity: a ranking model's scores blended with popularity, the weight chosen on
validation data carved from the training part.

On data a model's defaults do not fit (sparse sessions, short histories, a different domain), a
neural or factor model can rank worse than the plain popularity list (issue 15 measured GRU4Rec,
YouTube DNN, Caser and BPR below it). Each ranking model therefore standardises its scores per user
and adds `weight` times the standardised log-popularity of the items:

    s'(u, i) = z_u(s(u, i)) + weight * z(log(1 + pop(i)))

`weight` 0 is the model alone, infinity is popularity alone. With `popularity_blend=auto` (the
default) the weight is chosen on the model's own validation split (each training user's last
training item, the topn protocol one level down): the model fitted without those items scores them
under each weight of `GRID` (see `choose_weight`: a model clearly better than popularity keeps its
own ranking; any other takes the best weight). A number sets the weight; 0 turns the blend off.
`auto` on explicit data (a fit that predicts ratings) is off: the weight changes rankings only.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from streamrec.core.params import ModelParams
from streamrec.trainer.evaluation.metrics import expected_hit, rank_counts

GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, np.inf)
K = 10
MARGIN = 2.0  # standard errors by which a model must beat popularity on validation to rank on its own


class RankingParams(ModelParams):
    """Hyper-parameters every ranking model shares."""

    popularity_blend: Literal["auto"] | float = Field(
        "auto", description="weight of popularity in the ranking; auto: chosen on validation, 0: off")


def standardise(scores: np.ndarray) -> np.ndarray:
    """Per row: (s - mean) / std over the finite entries; non-finite entries become -inf."""
    finite = np.isfinite(scores)
    counts = np.maximum(finite.sum(axis=1, keepdims=True), 1)
    values = np.where(finite, scores, 0.0)
    mean = values.sum(axis=1, keepdims=True) / counts
    spread = np.sqrt((np.where(finite, values - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / counts)
    return np.where(finite, (values - mean) / np.maximum(spread, 1e-12), -np.inf)


def popularity_prior(popularity: np.ndarray) -> np.ndarray:
    """The standardised log-popularity row every user's scores are blended with."""
    return standardise(np.log1p(popularity.astype(np.float64))[None, :])[0]


def blend(scores: np.ndarray, prior: np.ndarray, weight: float) -> np.ndarray:
    """Blended scores of `scores` rows (see the module doc); `weight` inf ranks by popularity
    alone, keeping the model's -inf (masked) entries."""
    if weight == 0.0:
        return scores
    z = standardise(scores)
    if np.isinf(weight):
        return np.where(np.isfinite(z), prior[None, :], -np.inf)
    return z + weight * prior[None, :]


def significant(gain: np.ndarray) -> bool:
    """True when the mean per-user gain exceeds `MARGIN` standard errors."""
    if len(gain) < 2:
        return False
    return bool(gain.mean() > MARGIN * gain.std(ddof=1) / np.sqrt(len(gain)))


def choose_weight(scores: np.ndarray, targets: np.ndarray, prior: np.ndarray) -> float:
    """The popularity weight for rows of `scores` (seen items already at -inf, each row's target a
    candidate), judged by validation hr@10. The blend is a safety net, not a tuner: a model clearly
    better than popularity alone (by `MARGIN` standard errors of the per-user difference) keeps its
    own ranking; any other takes the best weight of `GRID` (ties: more popularity), since its own
    ranking has not shown it is worth more than the baseline."""
    hits = {}
    for weight in GRID:
        greater, ties = rank_counts(blend(scores, prior, weight), targets)
        hits[weight] = expected_hit(greater, ties, K)
    if significant(hits[0.0] - hits[np.inf]):
        return 0.0
    return float(max(GRID, key=lambda w: (hits[w].mean(), w)))
