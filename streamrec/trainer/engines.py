"""Where a batch model is fitted: `local` (this process, the registry's classes) or `spark` (the
same families with their fit run by Apache Spark, `streamrec.trainer.spark`)."""

from __future__ import annotations

from typing import Literal

from streamrec.trainer import registry

Engine = Literal["local", "spark"]
ENGINES: tuple[Engine, ...] = ("local", "spark")


def model_class(name: str, engine: Engine = "local") -> type:
    """The class that fits `name` on `engine`; ValueError naming what exists otherwise."""
    if engine == "local":
        return registry.model_class(name)
    if engine == "spark":
        from streamrec.trainer.spark.models import SPARK_MODELS

        if name not in SPARK_MODELS:
            raise ValueError(f"--engine spark fits {sorted(SPARK_MODELS)}, not {name!r}")
        return SPARK_MODELS[name]
    raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
