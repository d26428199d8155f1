"""The blend's combiners held as plain arrays: ridge weights and gradient-boosted regression trees.

sklearn fits them; what predicts afterwards (and what a saved blend stores) is their parameters as
numpy arrays, so a blend round-trips through numpy + JSON with neither pickle nor sklearn's private
classes. Predictions equal sklearn's bit for bit: the same comparisons at each split and the same
float64 summation order (baseline, then tree after tree), which tests/trainer checks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self, TypeVar

import numpy as np

TREE_ROW_CHUNK = 65536  # rows routed through one tree at a time: bounds the index arrays' memory
A = TypeVar("A", bound="ArrayRecord")


@dataclass(frozen=True)
class ArrayRecord:
    """A dataclass of numpy arrays that saves as a {field: array} mapping and back."""

    def state(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray]) -> Self:
        return cls(**{f.name: arrays[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class RidgeCombiner(ArrayRecord):
    """Linear blend with intercept: prediction = X @ coef + intercept (sklearn's Ridge)."""

    coef: np.ndarray  # (n_features,)
    intercept: np.ndarray  # () float64

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, alpha: float) -> RidgeCombiner:
        from sklearn.linear_model import Ridge

        ridge = Ridge(alpha=alpha).fit(X, y)
        return cls(ridge.coef_, np.asarray(ridge.intercept_, dtype=np.float64))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X @ self.coef + self.intercept



@dataclass(frozen=True)
class BoostedTrees(ArrayRecord):
    """Regression trees of sklearn's HistGradientBoostingRegressor, all nodes in flat arrays.

    Node n of the forest: a leaf with `value[n]`, or a split sending a row to `left[n]` when
    x[feature[n]] <= threshold[n] (NaN: left iff missing_left[n]), else to `right[n]`. Tree t
    starts at node roots[t]; prediction = baseline + the trees' leaf values, added in tree order.
    """

    baseline: np.ndarray  # () float64
    roots: np.ndarray  # (n_trees,) int64
    feature: np.ndarray  # per node, int64
    threshold: np.ndarray  # per node, float64
    missing_left: np.ndarray  # per node, bool
    left: np.ndarray  # per node, int64 (absolute node index)
    right: np.ndarray  # per node, int64
    leaf: np.ndarray  # per node, bool
    value: np.ndarray  # per node, float64

    def __post_init__(self) -> None:
        """Trees read back from a file are checked: a node array of another length, a root or a
        child outside the forest, or a child that points back up (a cycle: `_leaves` would never
        end) is a ValueError. sklearn numbers nodes depth first, so every child follows its parent."""
        nodes = len(self.leaf)
        per_node = (self.feature, self.threshold, self.missing_left, self.left, self.right, self.value)
        if any(np.shape(a) != (nodes,) for a in per_node) or np.ndim(self.roots) != 1:
            raise ValueError("boosted trees: the node arrays differ in length")
        split = np.flatnonzero(~np.asarray(self.leaf, bool))
        if (len(self.roots) and (np.min(self.roots) < 0 or np.max(self.roots) >= nodes)) or (
                len(split) and ((self.left[split] <= split).any() or (self.right[split] <= split).any()
                                or (self.left[split] >= nodes).any() or (self.right[split] >= nodes).any()
                                or (self.feature[split] < 0).any())):
            raise ValueError("boosted trees: a root or child lies outside the forest or points back up")

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, iterations: int, seed: int) -> BoostedTrees:
        """Fit sklearn's regressor and keep its trees. Its fitted trees are only reachable through
        private attributes (`_predictors`, `_baseline_prediction`); they are read here, once."""
        from sklearn.ensemble import HistGradientBoostingRegressor

        gbt = HistGradientBoostingRegressor(max_iter=iterations, random_state=seed).fit(X, y)
        nodes = [predictor.nodes for (predictor,) in gbt._predictors]
        if any(n["is_categorical"].any() for n in nodes):
            raise ValueError("categorical splits are not supported by BoostedTrees")
        sizes = np.array([len(n) for n in nodes], dtype=np.int64)
        offsets = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
        flat = np.concatenate(nodes)
        shift = np.repeat(offsets, sizes)
        return cls(
            baseline=np.asarray(gbt._baseline_prediction, dtype=np.float64).reshape(()),
            roots=offsets, feature=flat["feature_idx"].astype(np.int64),
            threshold=flat["num_threshold"].astype(np.float64), missing_left=flat["missing_go_to_left"].astype(bool),
            left=flat["left"].astype(np.int64) + shift, right=flat["right"].astype(np.int64) + shift,
            leaf=flat["is_leaf"].astype(bool), value=flat["value"].astype(np.float64),
        )

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        out = np.zeros(len(X)) + self.baseline
        for start in range(0, len(X), TREE_ROW_CHUNK):
            block = X[start : start + TREE_ROW_CHUNK]
            total = out[start : start + TREE_ROW_CHUNK]
            for root in self.roots:
                total += self.value[self._leaves(block, root)]
        return out

    def _leaves(self, X: np.ndarray, root: np.int64) -> np.ndarray:
        """The leaf of one tree that each row of X reaches (all rows descend one level per step)."""
        node = np.full(len(X), root, dtype=np.int64)
        pending = np.flatnonzero(~self.leaf[node])
        while len(pending):
            current = node[pending]
            x = X[pending, self.feature[current]]
            go_left = np.where(np.isnan(x), self.missing_left[current], x <= self.threshold[current])
            node[pending] = np.where(go_left, self.left[current], self.right[current])
            pending = pending[~self.leaf[node[pending]]]
        return node
