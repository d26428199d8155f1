"""Batch model families behind one interface (`streamrec.trainer.models.base.Recommender`).

Names resolve through the one model registry (`streamrec.trainer.registry`).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from streamrec.trainer import registry
from streamrec.trainer.interactions import IdIndex
from streamrec.trainer.models.base import FORMAT_VERSION, Recommender


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


class ModelFileError(ValueError):
    """A saved model that cannot be read back as one; the message names the folder and the fault."""


def load(path: str | Path) -> Recommender:
    """Read a model written by `Recommender.save`, checked before it is returned.

    Restoring alone checked only that each array exists: a model folder whose arrays do not fit
    together (an `arrays.npz` from another fit, a truncated copy, a hand-edited file) loaded and
    then failed or answered garbage at its first query, far from the cause. The ids, the seen
    matrix and the popularity are checked against each other, and the model then scores one user
    over every item: the scores must have one column per item and no NaN, which ties every
    model-specific array (factors, neighbours, network weights) to the item index; the first and the
    last user, and a pair with the first and the last item, tie the user arrays to the user index."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        with np.load(path / "arrays.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path}: not a saved model ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: meta.json is not format version {FORMAT_VERSION}")
    try:
        cls = model_class(str(meta.get("model")))
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    _check_common(path, arrays)
    try:
        model = cls.restore(meta, arrays)
        scores = model.user_scores(np.unique([0, len(model.users) - 1]))  # the first and the last user
        model.pair_scores(np.array([0, len(model.users) - 1]), np.array([0, model.n_items - 1]))
    except (KeyError, ValueError, IndexError, TypeError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: the arrays do not fit together ({type(exc).__name__}: {str(exc)[:200]})") from None
    if scores.shape[-1] != model.n_items or np.isnan(scores).any():
        raise ModelFileError(f"{path}: the model scores {scores.shape[-1]} items with"
                             f"{'' if np.isnan(scores).any() else 'out'} NaN; its index has {model.n_items}")
    return model


def _check_common(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The arrays every model saves (ids, the seen matrix in CSR form, popularity) against each other."""
    missing = sorted({"seen_indptr", "seen_indices", "popularity"} - set(arrays))
    if missing:
        raise ModelFileError(f"{path}: arrays.npz lacks {missing}")
    try:
        users, items = IdIndex.from_arrays(arrays, "users"), IdIndex.from_arrays(arrays, "items")
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    indptr, indices, popularity = arrays["seen_indptr"], arrays["seen_indices"], arrays["popularity"]
    faults = [
        (indptr.shape != (len(users) + 1,) or not np.issubdtype(indptr.dtype, np.integer), "seen_indptr is not one "
         "offset per user plus one"),
        (not np.issubdtype(indices.dtype, np.integer) or indices.ndim != 1, "seen_indices is not 1-D integers"),
        (popularity.shape != (len(items),), f"popularity has {popularity.shape} entries for {len(items)} items"),
    ]
    for broken, why in faults:
        if broken:
            raise ModelFileError(f"{path}: {why}")
    if len(indptr) and (indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any()):
        raise ModelFileError(f"{path}: seen_indptr does not cover seen_indices in order")
    if len(indices) and (indices.min() < 0 or indices.max() >= len(items)):
        raise ModelFileError(f"{path}: seen_indices names items outside the {len(items)} saved")
    if not np.isfinite(popularity).all():
        raise ModelFileError(f"{path}: popularity is not finite")
