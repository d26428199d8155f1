"""Batch model families behind one interface (`streamrec.trainer.models.base.Recommender`).

Names resolve through the one model registry (`streamrec.trainer.registry`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from streamrec.trainer import registry
from streamrec.trainer.models.base import Recommender


def model_class(name: str) -> type[Recommender]:
    """The class registered under `name`."""
    cls = registry.model_class(name)
    if not issubclass(cls, Recommender):
        raise ValueError(f"{name!r} is an online model, not a batch model")
    return cls


def create(name: str, **params: object) -> Recommender:
    """An unfitted model with the given hyperparameters (the rest at their defaults), validated
    against the model's `Params`."""
    return model_class(name)(**params)


def load(path: str | Path) -> Recommender:
    """Read a model written by `Recommender.save`."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    with np.load(path / "arrays.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return model_class(meta["model"]).restore(meta, arrays)
