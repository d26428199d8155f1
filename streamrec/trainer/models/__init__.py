"""Batch model families behind one interface (`streamrec.trainer.models.base.Recommender`).

Names resolve through the one model registry (`streamrec.trainer.registry`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.trainer import registry
from streamrec.trainer.models.base import Recommender


def model_class(name: str) -> type[Recommender]:
    """The class registered under `name`."""
    cls = registry.model_class(name)
    if not issubclass(cls, Recommender):
        raise ValueError(f"{name!r} is an online model, not a batch model")
    return cls


def create(name: str, **params: Any) -> Recommender:
    """An unfitted model with the given hyperparameters (the rest at their defaults)."""
    return model_class(name)(**params)


def coerce_params(name: str, pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["factors=64", "reg=0.05"]` -> typed values, following the types of the defaults."""
    defaults = model_class(name).defaults
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            raise ValueError(f"bad --param {pair!r} for {name}; known: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            params[key] = raw.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            value = float(raw)
            params[key] = int(value) if isinstance(default, int) and value.is_integer() else value
        else:
            params[key] = raw.strip()
    return params


def load(path: str | Path) -> Recommender:
    """Read a model written by `Recommender.save`."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    with np.load(path / "arrays.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return model_class(meta["model"]).restore(meta, arrays)
