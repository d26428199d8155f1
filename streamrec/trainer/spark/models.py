"""ALS and item kNN whose fits run on Spark (see the package doc for why they share names and
everything but `_fit` with the in-process families).

Spark's ALS (Hu, Koren and Volinsky's implicit objective, like `ImplicitALS`) differs in two ways
that make its hyper-parameters its own: it needs integer ids (the `Interactions` indices are
those), and it scales the regularisation of each user's and item's factors by their number of
observations (ALS-WR), so `reg` here is per observation, not a total. Its defaults were chosen on
validation (docs/models.md, "Spark ALS"), never on a test split.

Item kNN on Spark computes the cosine of item columns as a self-join of the L2-normalised item x
user entries on the user, summed per item pair, and keeps each item's k best positive neighbours
by a window (ties to the lower item index, as `truncate_top_k` does). The rows of a user with n
items make n^2 pairs: the shuffle grows with the square of the heaviest histories.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from streamrec.core.params import FloatRange, IntRange, space
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.als import ImplicitALS
from streamrec.trainer.models.base import Capabilities
from streamrec.trainer.models.knn import ItemKNN
from streamrec.trainer.models.popularity_blend import RankingParams
from streamrec.trainer.spark.session import spark

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


def _frame(matrix: sp.csr_matrix, row: str, col: str, value: str) -> DataFrame:
    """A sparse matrix's entries as a Spark DataFrame (through Arrow: no Python object per entry)."""
    coo = matrix.tocoo()
    return spark().createDataFrame(pd.DataFrame({row: coo.row.astype(np.int32), col: coo.col.astype(np.int32),
                                                 value: coo.data.astype(np.float64)}))


def _dense_factors(factors: DataFrame, count: int, rank: int) -> np.ndarray:
    """Spark's (id, features) rows as a dense (count, rank) float32 matrix; ids Spark never saw stay 0."""
    frame = factors.toPandas()
    out = np.zeros((count, rank), np.float32)
    if len(frame):
        out[frame["id"].to_numpy()] = np.stack(frame["features"].to_numpy()).astype(np.float32)
    return out


class SparkALSParams(RankingParams):
    """Spark MLlib ALS, implicit: rank, regParam (per observation, see the module doc), alpha,
    maxIter and seed. The defaults are `streamrec tune --engine spark --model als --protocol topn
    --data ml-100k --trials 40 --budget-seconds 700`'s winner on the validation split carved from
    the training part (each user's last training item): hr@10 0.147 there against 0.131 for the
    in-process defaults carried over (32 factors, reg 0.05, alpha 2, 15 iterations). A per-
    observation reg makes Spark want a far smaller alpha than `ImplicitALS`'s 2."""

    factors: int = 92
    reg: float = 0.03
    iterations: int = 22
    alpha: float = 0.2
    seed: int = 0


class SparkALS(ImplicitALS):
    """`ImplicitALS` fitted by Spark MLlib: the same factors X, Y and everything after them."""

    Params = SparkALSParams
    search_space = space(factors=IntRange(8, 128, log=True), reg=FloatRange(1e-3, 1.0, log=True),
                         alpha=FloatRange(0.1, 100.0, log=True), iterations=IntRange(5, 25))

    def _fit(self, interactions: Interactions) -> None:
        from pyspark.ml.recommendation import ALS

        p = self.params
        ratings = _frame(interactions.strength(), "user", "item", "strength")
        model = ALS(rank=p["factors"], maxIter=p["iterations"], regParam=p["reg"], alpha=p["alpha"], implicitPrefs=True,
                    seed=p["seed"], userCol="user", itemCol="item", ratingCol="strength", nonnegative=False).fit(ratings)
        self.X = _dense_factors(model.userFactors, interactions.n_users, p["factors"])
        self.Y = _dense_factors(model.itemFactors, interactions.n_items, p["factors"])


class SparkItemKNN(ItemKNN):
    """`ItemKNN` on implicit data whose cosine neighbour lists are computed by Spark."""

    capabilities = Capabilities(implicit=True, weights=True)

    def _similarity(self, entities: sp.csr_matrix, kind: str, residuals: sp.csr_matrix) -> sp.csr_matrix:
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        if kind != "cosine":
            raise ValueError(f"item-knn on Spark computes cosine neighbours only, not {kind!r}")
        norms = np.sqrt(np.asarray(entities.multiply(entities).sum(axis=1)).ravel())
        normed = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ entities
        left = _frame(normed.tocsr(), "i", "u", "a")
        right = left.withColumnRenamed("i", "j").withColumnRenamed("a", "b")
        pairs = (left.join(right, "u").where(F.col("i") != F.col("j"))
                 .groupBy("i", "j").agg(F.sum(F.col("a") * F.col("b")).alias("s")).where(F.col("s") > 0))
        best = Window.partitionBy("i").orderBy(F.col("s").desc(), F.col("j").asc())
        top = pairs.withColumn("rank", F.row_number().over(best)).where(F.col("rank") <= self.k).select("i", "j", "s").toPandas()
        n = entities.shape[0]
        return sp.csr_matrix((top["s"].to_numpy(), (top["i"].to_numpy(), top["j"].to_numpy())), shape=(n, n))


SPARK_MODELS: dict[str, type[ImplicitALS] | type[ItemKNN]] = {"als": SparkALS, "item-knn": SparkItemKNN}
