"""Batch refits on Apache Spark (`--engine spark`): ALS and item kNN fitted by a Spark cluster.

The models here are the in-process families (`ImplicitALS`, `ItemKNN`) with their fit moved to
Spark: same names, same scoring, same `export()`, so a Spark refit publishes exactly the tables and
blobs serving already reads. They are not in the model registry: every registered model runs in
the contract suites, which would then all need a JVM. `pyspark` is the optional extra `spark`.
"""
