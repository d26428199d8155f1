"""Shared fixtures of the model contract suite: tiny synthetic data and small-but-real settings.

The suite discovers models through the registry, so a newly registered model is covered without
editing any list here. To stay within a couple of minutes, `small_params` shrinks the usual size
and duration knobs (by their names, for whichever model declares them) and leaves everything else
at the model's defaults.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamrec.core.params import ModelParams
from streamrec.stream.loaders import InteractionLog, time_order

SHRINK: dict[str, int] = {
    "epochs": 3, "iterations": 3, "factors": 8, "dim": 8, "hidden": 8, "side_dim": 4, "batch_size": 64,
    "negatives": 4, "val_users": 8, "patience": 1, "gbt_iterations": 20, "window": 3, "n_h": 2, "n_v": 2,
}


def small_params(schema: type[ModelParams], seed: int = 0) -> dict[str, object]:
    """The model's defaults with the size/duration knobs it declares shrunk, and the given seed."""
    params: dict[str, object] = {}
    for name, field in schema.model_fields.items():
        if name in SHRINK and isinstance(field.default, int) and not isinstance(field.default, bool):
            params[name] = min(field.default, SHRINK[name])
    if "seed" in schema.model_fields:
        params["seed"] = seed
    return params


def synthetic_log(n_users: int = 40, n_items: int = 30, per_user: int = 10, seed: int = 0) -> InteractionLog:
    """Users of 3 planted groups rate mostly their group's items (5) and some others (1), in time
    order; ids are opaque strings with a colon, so nothing may assume integer ids."""
    rng = np.random.default_rng(seed)
    users, items, ratings, stamps = [], [], [], []
    for u in range(n_users):
        own = np.flatnonzero(np.arange(n_items) % 3 == u % 3)
        other = np.flatnonzero(np.arange(n_items) % 3 != u % 3)
        picks = np.r_[rng.choice(own, per_user - 2, replace=False), rng.choice(other, 2, replace=False)]
        users += [f"u:{u}"] * per_user
        items += [f"i:{i}" for i in picks]
        ratings += [5.0 if i % 3 == u % 3 else 1.0 for i in picks]
        stamps += list(1_000_000.0 + 3600.0 * np.arange(per_user) + 97.0 * u)
    log = InteractionLog(np.array(users, dtype=object), np.array(items, dtype=object),
                         np.array(ratings, dtype=float), np.array(stamps, dtype=float))
    return log.take(time_order(log))


@pytest.fixture(scope="session")
def log() -> InteractionLog:
    return synthetic_log()
