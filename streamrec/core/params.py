"""Typed hyper-parameters: the one `--param KEY=VALUE` parser of every command.

Each model declares its hyper-parameters as a pydantic model (a subclass of `ModelParams`) next to
its code. Values typed on a command line arrive as strings; pydantic converts them by the declared
type, so `flag=false` is False (not a truthy string), `dim=32.5` is refused for an int, and an
unknown key is an error that lists the known ones, so a typo never passes silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

P = TypeVar("P", bound="ModelParams")


class ModelParams(BaseModel):
    """Base of every model's hyper-parameters: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ParamError(ValueError):
    """A `--param` that does not fit the model's declared hyper-parameters."""


def split_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """`["factors=64", "reg-u=0.05"]` -> {"factors": "64", "reg_u": "0.05"} (raw strings)."""
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ParamError(f"bad --param {pair!r}: expected KEY=VALUE")
        raw[key] = value.strip()
    return raw


def parse_params(schema: type[P], values: Sequence[str] | Mapping[str, object], model: str = "") -> P:
    """Validate `KEY=VALUE` strings (or an already-typed mapping) against `schema`."""
    given = split_pairs(values) if not isinstance(values, Mapping) else dict(values)
    try:
        return schema.model_validate(given)
    except ValidationError as exc:
        known = ", ".join(sorted(schema.model_fields))
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '?'}: {e['msg']}" for e in exc.errors())
        raise ParamError(f"bad parameters{f' for {model}' if model else ''}: {problems} (known: {known})") from None


# ---- search spaces (`streamrec tune`): declared next to each model, read by the tuner ----------
@dataclass(frozen=True)
class IntRange:
    """An integer hyper-parameter searched in [low, high] (log scale for sizes such as factors)."""

    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class FloatRange:
    """A real hyper-parameter searched in [low, high] (log scale for rates and penalties)."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """A categorical hyper-parameter."""

    options: tuple[str | int | float | bool, ...]


Dimension = IntRange | FloatRange | Choice
SearchSpace = Mapping[str, Dimension]  # hyper-parameter name -> where the tuner looks


def space(**dimensions: Dimension) -> SearchSpace:
    """A model's search space, read-only (it is a class attribute shared by every instance)."""
    return MappingProxyType(dimensions)
