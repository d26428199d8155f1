"""rating protocol: predict held-out explicit ratings; RMSE and MAE averaged over five folds."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.core.progress import track
from streamrec.stream.loaders import InteractionLog
from streamrec.trainer.evaluation.metrics import mae, rmse
from streamrec.trainer.evaluation.splits import rating_folds
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.base import Recommender
from streamrec.trainer.models.blend import Blend


def fold_predictions(model: Recommender, test: InteractionLog) -> np.ndarray:
    """Clipped predictions for a test log; unseen users/items get the model's fallback."""
    low, high = model.rating_scale
    predicted = model.score(test.user_id, test.item_id, test.timestamp)
    return np.clip(predicted, low, high)


def member_rmses(model: Recommender, test: InteractionLog) -> dict[str, float]:
    """Per-member RMSE of a blend; {} for other models."""
    if not isinstance(model, Blend):
        return {}
    low, high = model.rating_scale
    scores = model.member_scores(
        model.users.index(test.user_id), model.items.index(test.item_id), test.timestamp
    )
    return {name: rmse(np.clip(s, low, high), test.rating) for name, s in scores.items()}


def run_rating(
    make_model: Callable[[], Recommender], log: InteractionLog, path: str | Path, fmt: str, seed: int
) -> dict[str, Any]:
    """Fit a fresh model per fold on the train part, score the test part."""
    return score_folds(make_model, rating_folds(log, path, fmt, seed))


def score_folds(make_model: Callable[[], Recommender], folds: Sequence[tuple[InteractionLog, InteractionLog]],
                ) -> dict[str, Any]:
    """The rating protocol's figures over `folds` (all five of `rating_folds`, or the ones a
    search never saw: streamrec.trainer.tuning)."""
    errors, fit_times, eval_times, members, member_fits, combiners = [], [], [], {}, {}, []
    for fold, (train_log, test_log) in enumerate(track(folds, "rating folds", len(folds))):
        model = make_model()
        start = time.perf_counter()
        model.fit(Interactions.from_log(train_log))
        fit_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        predicted = fold_predictions(model, test_log)
        if not np.isfinite(predicted).all():  # a NaN mean would print as null under exit status 0
            low, high = model.rating_scale
            raise ValueError(f"{model.name}: the fit on fold {fold} diverged (its predictions are not finite; "
                             f"ratings from {low:g} to {high:g}); try a smaller lr")
        eval_times.append(time.perf_counter() - start)
        errors.append((rmse(predicted, test_log.rating), mae(predicted, test_log.rating)))
        if not np.isfinite(errors[-1]).all():  # errors beyond float64 (ratings near 1e308): null under exit 0
            raise ValueError(f"{model.name}: the errors on fold {fold} are beyond floating point "
                             f"(RMSE {errors[-1][0]:g}): rescale the ratings")
        for name, rmse_value in member_rmses(model, test_log).items():
            members.setdefault(name, []).append(rmse_value)
        if isinstance(model, Blend):
            combiners.append(model.combiner)
            for name, seconds in model.member_fit_seconds.items():
                member_fits.setdefault(name, []).append(seconds)
    rmses, maes = np.array(errors).T
    return {
        "metrics": {
            "rmse": float(rmses.mean()), "mae": float(maes.mean()),
            "rmse_per_fold": [float(v) for v in rmses],
            **({"members_rmse": {k: float(np.mean(v)) for k, v in members.items()}} if members else {}),
            **({"members_fit_seconds": {k: float(np.mean(v)) for k, v in member_fits.items()},
                "fit_over_slowest_member": float(np.mean(fit_times) / max(max(np.mean(v) for v in member_fits.values()),
                                                                          1e-9))}
               if member_fits else {}),
        },
        "fit_seconds": float(np.mean(fit_times)),
        "eval_seconds": float(np.mean(eval_times)),
        **({"blend_combiner_per_fold": combiners} if combiners else {}),
    }

