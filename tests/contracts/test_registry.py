"""Every concrete model class is registered, under its own name, and names are unique."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import streamrec.trainer
from streamrec.core.params import ModelParams
from streamrec.trainer import registry
from streamrec.trainer.models.base import Recommender
from streamrec.trainer.online.base import OnlineRecommender
from streamrec.trainer.spark.models import SPARK_MODELS


def _all_subclasses(base: type) -> set[type]:
    found: set[type] = set()
    stack = [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


def test_every_concrete_model_class_is_registered() -> None:
    for module in pkgutil.walk_packages(streamrec.trainer.__path__, "streamrec.trainer."):
        importlib.import_module(module.name)  # the test imports everything; the product never does
    concrete = {cls for base in (Recommender, OnlineRecommender) for cls in _all_subclasses(base)
                if not inspect.isabstract(cls) and cls.__module__.startswith("streamrec.")}
    registered = {registry.model_class(name) for name in registry.names()}
    registered |= set(SPARK_MODELS.values())  # engine variants of registered families (--engine spark)
    missing = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in concrete - registered)
    assert not missing, f"concrete model classes missing from the entry points in pyproject.toml: {missing}"


def test_every_registered_model_declares_typed_params() -> None:
    for name in registry.names():
        cls = registry.model_class(name)
        assert issubclass(cls, (Recommender, OnlineRecommender)), name
        assert issubclass(cls.Params, ModelParams), name
        assert cls.name == name
        cls.Params()  # the defaults alone are valid


def test_every_engine_variant_is_a_registered_family_with_its_own_params() -> None:
    """`--engine spark` fits families that exist locally, under the same name, with their export."""
    for name, cls in SPARK_MODELS.items():
        assert cls.name == name and issubclass(cls, registry.model_class(name)), name
        assert issubclass(cls.Params, ModelParams) and cls.Params()
