"""Runs one named model through one protocol and returns EVALUATION.md's JSON object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamrec.stream.loaders import load_log

PROTOCOLS = ("rating", "topn", "prequential")


def literal(raw: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, anything else stays a string."""
    lowered = raw.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            continue
    return raw.strip()


def evaluate(
    protocol: str, model: str, params: list[str] | tuple[str, ...], data: str | Path,
    fmt: str = "ml-100k", seed: int = 0,
) -> dict[str, Any]:
    """Evaluate `model` with `--param` pairs on the log at `data`."""
    from streamrec.trainer.evaluation.prequential import ONLINE_MODELS, run_prequential
    from streamrec.trainer.evaluation.rating import run_rating
    from streamrec.trainer.evaluation.topn import run_topn
    from streamrec.trainer.models import coerce_params, model_class

    log = load_log(data, fmt)
    if protocol == "prequential":
        import streamrec.trainer.online.harness  # noqa: F401  (registers online-bpr and online-mf)

        if model not in ONLINE_MODELS:
            raise ValueError(f"no online model {model!r}; known: {sorted(ONLINE_MODELS)}")
        typed = {}
        for pair in params:
            key, _, raw = pair.partition("=")
            typed[key.strip()] = literal(raw)
        result = run_prequential(ONLINE_MODELS[model], typed, log)
        effective = typed
    elif protocol in ("rating", "topn"):
        cls = model_class(model)
        needed = "explicit" if protocol == "rating" else "implicit"
        if not getattr(cls.capabilities, needed):
            raise ValueError(f"{model} does not support {needed} feedback (protocol {protocol})")
        typed = coerce_params(model, params)
        if "seed" in cls.defaults and "seed" not in typed:
            typed["seed"] = seed
        effective = {**cls.defaults, **typed}
        make = lambda: cls(**typed)  # noqa: E731
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
