"""Batch model families behind one interface (`trainer.models.base.Recommender`).

`MODELS` maps each `--model` name to the class implementing it; classes are imported lazily so that
naming a model never imports every family (torch only where needed).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from trainer.models.base import Recommender
from trainer.models.neural.registry import NEURAL_MODELS

MODELS: dict[str, str] = {
    "popularity": "trainer.models.popularity:Popularity",
    "user-knn": "trainer.models.knn:UserKNN",
    "item-knn": "trainer.models.knn:ItemKNN",
    "amazon-i2i": "trainer.models.knn:AmazonI2I",
    "mf-sgd": "trainer.models.mf:BiasedMF",
    "svdpp": "trainer.models.svdpp:SVDpp",
    "timesvdpp": "trainer.models.svdpp:TimeSVDpp",
    "als": "trainer.models.als:ImplicitALS",
    "bpr": "trainer.models.bpr:BPR",
    "neighborhood-factor": "trainer.models.integrated:IntegratedModel",
    "rbm": "trainer.models.rbm:RBM",
    "blend": "trainer.models.blend:Blend",
    **NEURAL_MODELS,
}


def model_class(name: str) -> type[Recommender]:
    """The class registered under `name`."""
    try:
        module, attr = MODELS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
    return getattr(importlib.import_module(module), attr)


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
