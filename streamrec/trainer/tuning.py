"""`streamrec tune`: hyper-parameter search without peeking at the test split (Optuna, TPE).

The rule (issue 15, and the survey's lesson on leakage): the test split of a protocol is looked at
ONCE, at the end. The search runs the same protocol one level down, on the training part only:

- topn: the training part's own temporal leave-last-out (each user's last TRAINING item is the
  validation item); the winner is refitted on the whole training part and scored on the test items.
- rating: the first fold's training part split 80/20 (seeded), twice (two inner folds); a trial
  whose first inner fold is below the median of earlier trials is pruned before the second fit.
  The winner and the defaults are then scored on the first fold's test part only (`test_folds`:
  [1]): the other four folds' test ratings lie inside the first fold's training part, which the
  search fitted and validated on (about 40 % of them were its validation targets), so their mean
  flattered the winner. Searching inside each fold's own training part instead (nested) would be
  honest over all five folds, at five times the cost of a search that already takes minutes on
  two cores; one fold's figure is noisier, and says so.
- prequential: the first half of the stream, scored on its own second half (stream positions
  25-50%); the winner then runs the whole stream, whose reported half (50-100%) the search never
  saw. The whole-stream means (`hr@10_all`, `ndcg@10_all`) include the first half, the very events
  the winner was chosen on: they are neither search metrics nor in the test figures.

Each model declares where to look (`search_space`, next to its `Params`). The model's defaults are
scored on the same validation data first; the winner is the best trial only if it beats them
there (else the defaults stay), and the test figures of both are reported side by side.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.core.params import (
    Choice,
    FloatRange,
    IntRange,
    SearchSpace,
    parse_params,
)
from streamrec.stream.loaders import InteractionLog, load_log
from streamrec.trainer.engines import Engine
from streamrec.trainer.evaluation.harness import check_weights, fit_failures, protocol_model
from streamrec.trainer.evaluation.metrics import mae, rmse
from streamrec.trainer.evaluation.prequential import run_prequential
from streamrec.trainer.evaluation.rating import fold_predictions, score_folds
from streamrec.trainer.evaluation.splits import (
    distinct_pairs,
    leave_last_out,
    protocol_log,
    rating_folds,
)
from streamrec.trainer.evaluation.topn import ranking_metrics, run_topn
from streamrec.trainer.features import with_side_data
from streamrec.trainer.interactions import Interactions, Weighting, weight_values
from streamrec.trainer.models.base import Recommender
from streamrec.trainer.online.base import OnlineRecommender

Objective = Callable[[dict[str, object], Callable[[float, int], bool]], float]  # params, report -> value
DEFAULT_METRIC = {"topn": "hr@10", "prequential": "hr@10_second_half", "rating": "rmse"}
# what each protocol measures and a search can optimise (its first is the default); lower is better
# for the rating errors only. Not prequential's whole-stream means: their first half is the search's
METRICS = {"topn": ("hr@10", "ndcg@10", "mrr", "recall@20"), "rating": ("rmse", "mae"),
           "prequential": ("hr@10_second_half", "ndcg@10_second_half")}
RATING_TEST_FOLDS = (1,)  # the rating folds whose test part the search never saw (1-based, as u1..u5)
ERRORS = {"rmse": rmse, "mae": mae}


class Pruned(Exception):
    """A trial stopped early because its intermediate value was already worse than the median."""


def suggest(trial: Any, space: SearchSpace) -> dict[str, object]:
    """Optuna values for a declared search space (the models never import optuna)."""
    values: dict[str, object] = {}
    for name, dim in space.items():
        if isinstance(dim, IntRange):
            values[name] = trial.suggest_int(name, dim.low, dim.high, log=dim.log)
        elif isinstance(dim, FloatRange):
            values[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        elif isinstance(dim, Choice):
            values[name] = trial.suggest_categorical(name, list(dim.options))
        else:
            raise TypeError(f"unknown search dimension for {name}: {dim!r}")
    return values


def _topn(cls: type[Recommender], log: InteractionLog, weighting: Weighting, fixed: dict[str, object],
          metric: str) -> tuple[Objective, Callable[[dict[str, object]], dict[str, Any]]]:
    weight_values(log.rating, weighting)
    data = Interactions.from_log(distinct_pairs(log), implicit=True, weighting=weighting)
    train_mask, _ = leave_last_out(data)
    train = data.subset(train_mask)
    inner_mask, valid = leave_last_out(train)
    if not len(valid):  # ranking_metrics of nobody failed with "need at least one array to concatenate"
        raise ValueError("no user (or session) has three distinct items, so none has a validation item: the "
                         "search leaves each user's last item out for the test and the one before for validation")
    inner = train.subset(inner_mask)

    def objective(params: dict[str, object], report: Callable[[float, int], bool]) -> float:
        model = cls(**fixed, **params).fit(inner)
        return ranking_metrics(model, train.user_idx[valid], train.item_idx[valid])[metric]

    def final(params: dict[str, object]) -> dict[str, Any]:  # the same split, fit and figures as `evaluate`
        return run_topn(lambda: cls(**fixed, **params), log, weighting)

    return objective, final


def _rating(cls: type[Recommender], log: InteractionLog, data: str | Path, fmt: str, seed: int,
            fixed: dict[str, object], metric: str) -> tuple[Objective, Callable[[dict[str, object]], dict[str, Any]]]:
    error = ERRORS[metric]
    folds = rating_folds(log, data, fmt, seed)
    train_log, _ = folds[0]
    parts = np.array_split(np.random.default_rng(seed).permutation(len(train_log)), 5)
    inner_folds = [(train_log.take(np.sort(np.concatenate(parts[:n] + parts[n + 1:]))), train_log.take(np.sort(parts[n])))
                   for n in range(2)]

    def objective(params: dict[str, object], report: Callable[[float, int], bool]) -> float:
        errors = []
        for step, (fit_part, valid_part) in enumerate(inner_folds):
            model = cls(**fixed, **params).fit(Interactions.from_log(fit_part))
            errors.append(error(fold_predictions(model, valid_part), valid_part.rating))
            if report(float(np.mean(errors)), step):
                raise Pruned
        return float(np.mean(errors))

    def final(params: dict[str, object]) -> dict[str, Any]:
        tested = [folds[n - 1] for n in RATING_TEST_FOLDS]
        return {**score_folds(lambda: cls(**fixed, **params), tested), "test_folds": list(RATING_TEST_FOLDS)}

    return objective, final


def _prequential(cls: type[OnlineRecommender], log: InteractionLog, fixed: dict[str, object], metric: str,
                 ) -> tuple[Objective, Callable[[dict[str, object]], dict[str, Any]]]:
    first_half = log.take(slice(0, len(log) // 2))

    def objective(params: dict[str, object], report: Callable[[float, int], bool]) -> float:
        value = run_prequential(cls(**fixed, **params), first_half)["metrics"][metric]
        if value is None:  # nothing of the first half was evaluated: no search can tell settings apart
            raise ValueError(f"the prequential protocol evaluated no event of the log's first half for {metric}; "
                             "there is nothing to tune on")
        return value

    def final(params: dict[str, object]) -> dict[str, Any]:
        result = run_prequential(cls(**fixed, **params), log)
        metrics = {name: value for name, value in result["metrics"].items() if not name.endswith("_all")}
        return {**result, "metrics": metrics}

    return objective, final


def tune(protocol: str, model: str, params: list[str] | tuple[str, ...], data: str | Path, fmt: str = "ml-100k",
         trials: int = 30, budget_seconds: float | None = None, seed: int = 0, weights: Weighting = "binary",
         metric: str | None = None, log: InteractionLog | None = None, space: SearchSpace | None = None,
         engine: Engine = "local") -> dict[str, Any]:
    """Search `model`'s declared space (or `space`) on validation data carved from the training
    part, then score the defaults and the winner once on the protocol's test data. `params` are fixed.
    The model and `weights` pass `evaluate`'s checks (streamrec.trainer.evaluation.harness)."""
    import optuna

    check_weights(protocol, weights)
    cls = protocol_model(protocol, model, engine)
    space = dict(cls.search_space if space is None else space)
    fixed_typed = parse_params(cls.Params, params, model)
    fixed = with_side_data(cls, fixed_typed.model_dump(exclude_unset=True), fixed_typed.model_fields_set,
                           data, fmt)
    if "seed" in cls.Params.model_fields and "seed" not in fixed:
        fixed["seed"] = seed
    space = {name: dim for name, dim in space.items() if name not in fixed}
    if not space:
        raise ValueError(f"{model} has nothing to tune (no search space, or every dimension fixed by --param)")
    metric = metric or DEFAULT_METRIC[protocol]
    if metric not in METRICS[protocol]:  # a KeyError after the first fit, or (rating) rmse under its name
        raise ValueError(f"the {protocol} protocol measures {', '.join(METRICS[protocol])}; not {metric!r}")
    log = protocol_log(log if log is not None else load_log(data, fmt), protocol, fmt)
    weights_used = weights == "binary" or bool(cls.capabilities.weights)  # as `evaluate` decides (binary but in topn)
    if protocol == "topn":
        if not weights_used:
            print(f"note: {model} cannot use --weights {weights}; it trains on one per interaction", file=sys.stderr)
        objective, final = _topn(cls, log, weights if weights_used else "binary", fixed, metric)
    elif protocol == "rating":
        objective, final = _rating(cls, log, data, fmt, seed, fixed, metric)
    else:
        objective, final = _prequential(cls, log, fixed, metric)
    direction = "minimize" if metric in ("rmse", "mae") else "maximize"

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    started = time.perf_counter()
    with fit_failures(model, params):
        default_value = objective({}, lambda value, step: False)  # the defaults, outside the search space's bounds too
    defaults_seconds = time.perf_counter() - started
    print(f"tune {model}: defaults {metric}={default_value:.4f}", file=sys.stderr)

    failures: list[str] = []

    def run_trial(trial: optuna.Trial) -> float:
        values = suggest(trial, space)

        def report(value: float, step: int) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        try:
            value = objective(values, report)
        except Pruned:
            raise optuna.TrialPruned from None
        except (ArithmeticError, ValueError) as exc:  # failed, and the search goes on: kept to say why if all fail
            failures.append(f"{type(exc).__name__}: {exc} (trial {trial.number}: {values})")
            raise
        print(f"tune {model}: trial {trial.number} {metric}={value:.4f} {values}", file=sys.stderr)
        return value

    # a trial that diverges (NaN gradients refused by the store, overflow) fails and the search goes on
    study.optimize(run_trial, n_trials=trials, timeout=budget_seconds, catch=(ArithmeticError, ValueError))
    search_seconds = time.perf_counter() - started
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:  # pruning needs completed trials: every trial failed (the budget ends a search after one)
        raise ValueError(f"none of the {len(study.trials)} trials of {model} completed: {len(failures)} failed, "
                         f"the first with {failures[0]}")
    improved = study.best_value < default_value if direction == "minimize" else study.best_value > default_value
    winner = study.best_params if improved else {}
    defaults = cls.Params().model_dump()  # the defaults stay when no trial beat them on validation
    with fit_failures(model, [*params, *(f"{name}={value}" for name, value in winner.items())]):
        tuned_test = final(winner)
    with fit_failures(model, params):
        default_test = final({})
    return {
        "protocol": protocol, "model": model, "metric": metric, "direction": direction,
        "data": {"path": str(data), "format": fmt, "interactions": len(log)},
        "search_space": {name: repr(dim) for name, dim in space.items()},
        "fixed_params": fixed,
        "best_params": {**fixed, **{name: defaults[name] for name in space}, **winner},
        "best_trial_params": study.best_params,
        "improved_on_defaults": improved,
        "validation": {"best": study.best_value if improved else default_value, "default": default_value,
                       "best_trial": study.best_value},
        "test": {"tuned": tuned_test, "default": default_test},
        "trials": {"completed": len(complete), "total": len(study.trials),
                   "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
                   "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials),
                   # a budget stops new trials only: the search overruns it by up to the longest one
                   "longest_seconds": max((t.duration.total_seconds() for t in study.trials if t.duration), default=0.0)},
        "search_seconds": search_seconds, "defaults_seconds": defaults_seconds, "budget_seconds": budget_seconds,
        "seed": seed,
        **({"weights": weights, "weights_used": weights_used} if protocol == "topn" else {}),
    }
