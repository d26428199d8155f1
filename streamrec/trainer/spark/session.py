"""The Spark session of this process: one, created on first use, with settings for small jobs.

The master comes from `Settings.spark_master` (`STREAMREC_SPARK_MASTER`, default `local[2]`) or
`--spark-master`. Arrow carries columns between pandas and the JVM (no per-row Python objects);
shuffles use few partitions because a refit's frames are small next to Spark's default of 200;
the web UI is off (a refit needs no port). ALS iterates by growing an RDD lineage: without a
checkpoint directory its deserialisation overflows the JVM stack after ~15 iterations, so the
session checkpoints to a temporary directory (ALS cuts the lineage every 10 iterations) and
gives its threads deeper stacks.
"""

from __future__ import annotations

import importlib.util
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_master: str = "local[2]"


class SparkUnavailable(RuntimeError):
    """pyspark (or the Java it needs) is missing: the message says how to install it."""


def use_master(master: str) -> None:
    """The master that the next session is created on (a session already running keeps its own)."""
    global _master
    _master = master


def spark() -> SparkSession:
    """The session, created on the configured master if none runs."""
    if importlib.util.find_spec("pyspark") is None:
        raise SparkUnavailable("--engine spark needs pyspark: pip install 'streamrec[spark]' (and Java 17 or later)")
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master(_master).appName("streamrec")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "8")
               .config("spark.default.parallelism", "8")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.driver.memory", "2g")
               .config("spark.driver.extraJavaOptions", "-Xss16m")
               .config("spark.executor.extraJavaOptions", "-Xss16m")
               .getOrCreate())
    context = session.sparkContext
    context.setLogLevel("WARN")
    if context.getCheckpointDir() is None:
        context.setCheckpointDir(tempfile.mkdtemp(prefix="streamrec-spark-"))
    return session
