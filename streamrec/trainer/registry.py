"""The one registry of models, batch and online: a `--model` name -> the class that implements it.

Entries are the entry points of the group `streamrec.models` declared in `pyproject.toml` (a
package of the user's own can add models the same way). A class is imported only when its name is
used, so naming `als` never imports torch. No module of ours is found by a string anywhere else.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

GROUP = "streamrec.models"


@cache
def _entries() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=GROUP):
        if entry.name in found and found[entry.name].value != entry.value:
            raise RuntimeError(f"model name {entry.name!r} is registered twice: {found[entry.name].value}, {entry.value}")
        found[entry.name] = entry
    if not found:
        raise RuntimeError(f"no models registered under the entry-point group {GROUP!r}: is streamrec installed?")
    return found


def names(package: str | None = None) -> list[str]:
    """Registered model names, sorted; only those implemented under `package` when it is given
    (e.g. "streamrec.trainer.models.neural"), read from the entry points without importing."""
    return sorted(name for name, entry in _entries().items()
                  if package is None or entry.module == package or entry.module.startswith(package + "."))


@cache
def model_class(name: str) -> type:
    """The class registered under `name` (a batch `Recommender` or an `OnlineRecommender`)."""
    try:
        entry = _entries()[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {names()}") from None
    cls = entry.load()
    if not isinstance(cls, type) or getattr(cls, "name", None) != name:
        raise RuntimeError(f"entry point {name!r} -> {entry.value} is not a model class named {name!r}")
    return cls
