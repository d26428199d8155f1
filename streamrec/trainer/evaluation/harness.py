"""Runs one named model through one protocol and returns EVALUATION.md's JSON object."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.stream.loaders import InteractionLog, load_log
from streamrec.trainer.engines import Engine
from streamrec.trainer.evaluation.splits import protocol_log
from streamrec.trainer.interactions import WEIGHTINGS, Weighting

PROTOCOLS = ("rating", "topn", "prequential")


def evaluate(
    protocol: str, model: str, params: list[str] | tuple[str, ...], data: str | Path,
    fmt: str = "ml-100k", seed: int = 0, weights: Weighting = "binary", seeds: int = 1, engine: Engine = "local",
) -> dict[str, Any]:
    """Evaluate `model` with `--param` pairs on the log at `data`, fitted on `engine`.

    With `seeds` > 1 the model is fitted and scored once per seed (`seed`, `seed` + 1, ...):
    `metrics` holds the means, `metrics_stderr` their standard errors, `per_seed` every run. A
    single seed's figure of a stochastic model misleads (ALS on MovieLens: 0.0976 at seed 0, 0.0895
    as the mean of seeds 0-4)."""
    check_weights(protocol, weights)
    if seeds < 1:
        raise ValueError("--seeds must be at least 1")
    params, tuned = _without_tuned(params)
    if seeds > 1 and tuned:  # the search ran once, at --seed, and the other seeds were dropped without a word
        raise ValueError(f"--seeds {seeds} with --param tuned=true: the search runs once; evaluate its winner's "
                         "parameters with --seeds instead")
    if seeds > 1 and any(pair.partition("=")[0].strip() == "seed" for pair in params):
        raise ValueError(f"--param seed fixes the seed of every fit: --seeds {seeds} would report {seeds} identical "
                         "fits as different seeds; drop one of them")
    log = protocol_log(load_log(data, fmt), protocol, fmt)
    if tuned:
        return _tuned(protocol, model, params, log, data, fmt, seed, weights, engine)
    with fit_failures(model, params):
        runs = [_evaluate_once(protocol, model, params, log, data, fmt, seed + n, weights, engine)
                for n in range(seeds)]
    first = runs[0]
    result: dict[str, Any] = {
        "protocol": protocol, "model": model, "params": first["params"],
        "data": {
            "path": str(data), "format": fmt, "users": len(set(log.user_id)),
            "items": len(set(log.item_id)), "interactions": len(log),
        },
        "metrics": first["metrics"],
        "fit_seconds": first["fit_seconds"],
        "eval_seconds": first["eval_seconds"],
        "events_per_second": first.get("events_per_second"),
        "seed": seed,
        "engine": engine,
    }
    if "blend_combiner_per_fold" in first:  # which combiner a blend's `auto` chose on each fold
        result["blend_combiner_per_fold"] = first["blend_combiner_per_fold"]
    if protocol == "topn":
        result["weights"] = weights
        result["weights_used"] = first["weights_used"]
    if seeds > 1:
        result.update(_over_seeds(runs, seed))
    return result


TUNED_TRIALS, TUNED_BUDGET_SECONDS = 20, 120.0  # `--param tuned=true`: a small search inside the fit


def check_weights(protocol: str, weights: str) -> None:
    """`--weights` is known and applies to the protocol: the one rule of `evaluate` and `tune`."""
    if weights not in WEIGHTINGS:
        raise ValueError(f"unknown weights {weights!r}; expected one of {WEIGHTINGS}")
    if weights != "binary" and protocol != "topn":
        raise ValueError(f"--weights {weights} applies to the topn protocol only (EVALUATION.md)")


def protocol_model(protocol: str, model: str, engine: Engine) -> type:
    """The class that runs `model` under `protocol` on `engine`, or a ValueError saying why none
    can: one check for `evaluate` and `tune` (tune skipped it, and failed with an AttributeError
    after loading the log, or searched a rating model that evaluate refuses)."""
    from streamrec.trainer import registry
    from streamrec.trainer.engines import model_class
    from streamrec.trainer.models.base import Recommender
    from streamrec.trainer.online.base import OnlineRecommender

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if protocol == "prequential":
        if engine != "local":
            raise ValueError(f"the prequential protocol learns online, in this process: --engine {engine} does not apply")
        online = registry.model_class(model)
        if not issubclass(online, OnlineRecommender):
            raise ValueError(f"{model} is not an online model; the prequential protocol needs one "
                             f"({', '.join(registry.names('streamrec.trainer.online'))})")
        return online
    cls = model_class(model, engine)
    if not issubclass(cls, Recommender):
        raise ValueError(f"{model} is an online model; the {protocol} protocol needs a batch model")
    needed = "explicit" if protocol == "rating" else "implicit"
    if not getattr(cls.capabilities, needed):
        raise ValueError(f"{model} does not support {needed} feedback (protocol {protocol})")
    return cls


@contextmanager
def fit_failures(model: str, params: Sequence[str]) -> Iterator[None]:
    """An arithmetic failure of a fit (a ZeroDivisionError in a numba kernel, an overflow) as a
    ValueError naming the model and its parameters, which the commands report as a usage error:
    it escaped as a traceback (`--param lr=1e30`)."""
    try:
        yield
    except ArithmeticError as exc:
        given = f"--param {' '.join(params)}" if params else "its default parameters"
        raise ValueError(f"{model} failed with {given}: {type(exc).__name__} ({exc}); the fit diverged, "
                         "try values nearer the defaults") from exc


def _without_tuned(params: list[str] | tuple[str, ...]) -> tuple[list[str], bool]:
    """`--param tuned=true` is not a model hyper-parameter: it asks for a search inside the fit."""
    kept, tuned = [], False
    for pair in params:
        key, _, value = pair.partition("=")
        if key.strip() == "tuned":
            if value.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--param tuned={value}: expected true or false")
            tuned = value.strip().lower() in ("true", "1")
        else:
            kept.append(pair)
    return kept, tuned


def _tuned(protocol: str, model: str, params: list[str], log: InteractionLog, data: str | Path, fmt: str,
           seed: int, weights: Weighting, engine: Engine) -> dict[str, Any]:
    """The protocol's figures for hyper-parameters searched on the training part (a small budget);
    the search never sees the test split (streamrec.trainer.tuning)."""
    from streamrec.trainer.tuning import tune

    search = tune(protocol, model, params, data, fmt, TUNED_TRIALS, TUNED_BUDGET_SECONDS, seed, weights, log=log,
                  engine=engine)
    result = search["test"]["tuned"]
    return {
        "protocol": protocol, "model": model, "params": search["best_params"],
        "data": {"path": str(data), "format": fmt, "users": len(set(log.user_id)), "items": len(set(log.item_id)),
                 "interactions": len(log)},
        "metrics": result["metrics"], "fit_seconds": result["fit_seconds"],
        "eval_seconds": result.get("eval_seconds"), "events_per_second": result.get("events_per_second"),
        "seed": seed, "engine": engine,
        "tuned": {key: search[key] for key in ("validation", "trials", "search_seconds", "improved_on_defaults",
                                               "metric")},
        **({"test_folds": result["test_folds"]} if "test_folds" in result else {}),
        **({key: search[key] for key in ("weights", "weights_used")} if protocol == "topn" else {}),
    }


def _mean_over_runs(values: list[Any]) -> Any:
    """One figure for a metric's values over the runs: the mean of floats (element by element for
    lists such as `rmse_per_fold`, key by key for dicts such as `members_rmse`); null where any
    run has none (nothing evaluated: a mean would hide that); a count or any other value as is
    where all runs agree. Dropping nulls and lists, and averaging counts into floats, changed the
    output's shape with `--seeds`. Counts that differ are averaged; other values that differ are
    listed, one per run."""
    first = values[0]
    if any(value is None for value in values):
        return None
    if all(isinstance(value, float) for value in values):
        return float(np.mean(values))
    if all(isinstance(value, list) and len(value) == len(first) for value in values):
        return [_mean_over_runs(list(column)) for column in zip(*values)]
    if all(isinstance(value, dict) and value.keys() == first.keys() for value in values):
        return {key: _mean_over_runs([value[key] for value in values]) for key in first}
    if all(value == first for value in values):
        return first
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        return float(np.mean(values))
    return values


def _over_seeds(runs: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Means and standard errors of every metric over the runs (`_mean_over_runs`; standard errors
    of the float ones, null where the metric is), and each run's figures."""
    metrics = {name: _mean_over_runs([run["metrics"][name] for run in runs]) for name in runs[0]["metrics"]}
    stderr = {name: None if metrics[name] is None else
              float(np.std([run["metrics"][name] for run in runs], ddof=1) / np.sqrt(len(runs)))
              for name, value in runs[0]["metrics"].items() if value is None or isinstance(value, float)}
    return {
        "metrics": metrics,
        "metrics_stderr": stderr,
        "fit_seconds": float(np.mean([run["fit_seconds"] for run in runs])),
        "eval_seconds": float(np.mean([run["eval_seconds"] for run in runs])),
        "seeds": [seed + n for n in range(len(runs))],
        "per_seed": [{"seed": seed + n, "metrics": run["metrics"], "fit_seconds": run["fit_seconds"]}
                     for n, run in enumerate(runs)],
        f"seed_{seed}_metrics": runs[0]["metrics"],
    }


def _evaluate_once(protocol: str, model: str, params: list[str] | tuple[str, ...], log: InteractionLog,
                   data: str | Path, fmt: str, seed: int, weights: Weighting, engine: Engine) -> dict[str, Any]:
    from streamrec.core.params import parse_params
    from streamrec.trainer.evaluation.prequential import run_prequential
    from streamrec.trainer.evaluation.rating import run_rating
    from streamrec.trainer.evaluation.topn import run_topn
    from streamrec.trainer.features import with_side_data

    cls = protocol_model(protocol, model, engine)
    typed = parse_params(cls.Params, params, model)
    if "seed" in cls.Params.model_fields and "seed" not in typed.model_fields_set:
        typed = typed.model_copy(update={"seed": seed})  # --seed, unless `--param seed=` is given
    effective = with_side_data(cls, typed.model_dump(), typed.model_fields_set, data, fmt)
    if protocol == "prequential":
        return {**run_prequential(cls(**effective), log), "params": effective}
    make = lambda: cls(**effective)
    if protocol == "rating":
        return {**run_rating(make, log, data, fmt, seed), "params": effective}
    used = weights == "binary" or cls.capabilities.weights
    if not used:
        print(f"note: {model} cannot use --weights {weights}; it trains on one per interaction", file=sys.stderr)
    return {**run_topn(make, log, weights if used else "binary"), "params": effective, "weights_used": used}
