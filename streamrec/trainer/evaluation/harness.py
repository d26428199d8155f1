"""Runs one named model through one protocol and returns EVALUATION.md's JSON object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamrec.stream.loaders import load_log

PROTOCOLS = ("rating", "topn", "prequential")


def evaluate(
    protocol: str, model: str, params: list[str] | tuple[str, ...], data: str | Path,
    fmt: str = "ml-100k", seed: int = 0,
) -> dict[str, Any]:
    """Evaluate `model` with `--param` pairs on the log at `data`."""
    from streamrec.core.params import parse_params
    from streamrec.trainer.evaluation.prequential import run_prequential
    from streamrec.trainer import registry
    from streamrec.trainer.online.base import OnlineRecommender
    from streamrec.trainer.evaluation.rating import run_rating
    from streamrec.trainer.evaluation.topn import run_topn
    from streamrec.trainer.models.base import Recommender

    log = load_log(data, fmt)
    if protocol == "prequential":
        online = registry.model_class(model)
        if not issubclass(online, OnlineRecommender):
            raise ValueError(f"{model} is not an online model; the prequential protocol needs one "
                             f"({', '.join(registry.names('streamrec.trainer.online'))})")
        hyper = parse_params(online.Params, params, model).model_dump()
        result = run_prequential(online(**hyper), log)
        effective = hyper
    elif protocol in ("rating", "topn"):
        cls = registry.model_class(model)
        if not issubclass(cls, Recommender):
            raise ValueError(f"{model} is an online model; the {protocol} protocol needs a batch model")
        needed = "explicit" if protocol == "rating" else "implicit"
        if not getattr(cls.capabilities, needed):
            raise ValueError(f"{model} does not support {needed} feedback (protocol {protocol})")
        typed = parse_params(cls.Params, params, model)
        if "seed" in cls.Params.model_fields and "seed" not in typed.model_fields_set:
            typed = typed.model_copy(update={"seed": seed})  # --seed, unless `--param seed=` is given
        effective = typed.model_dump()
        make = lambda: cls(**effective)  # noqa: E731
        result = run_rating(make, log, data, fmt, seed) if protocol == "rating" else run_topn(make, log)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    return {
        "protocol": protocol, "model": model, "params": effective,
        "data": {
            "path": str(data), "format": fmt, "users": len(set(log.user_id)),
            "items": len(set(log.item_id)), "interactions": len(log),
        },
        "metrics": result["metrics"],
        "fit_seconds": result["fit_seconds"],
        "eval_seconds": result["eval_seconds"],
        "events_per_second": result.get("events_per_second"),
        "seed": seed,
    }
