"""Content tower (issue 17): item metadata -> the online learner's embedding space, for cold start.

An item the online learner has never seen has no row in `bpr_items`, so retrieval cannot find it
until enough interactions have moved a random initial row somewhere useful. The tower gives it a
row from its metadata before its first interaction: a linear map from catalogue features (genres
and other categorical values, title words, numeric attributes) to the table's rows, fitted on the
rows of the items that already have enough events.

Why linear (ridge regression, closed form): there are a few thousand trained items, far too few
for a deep tower to beat a regularised linear map, which generalises from them and fits in closed
form (a fraction of a second for a MovieLens-sized catalogue, a few seconds at a few thousand
features), so it can be refitted every few minutes. Why the online table's own rows as targets:
a seeded row then lies in the space the online learner works in (vector and bias alike), so the
learner moves it from there with its first interactions instead of from noise, and serving, which
indexes every row of the table, can retrieve the item at once.

Features (`FeatureSpec`, fitted on the training items and stored with the tower, so a later
catalogue's items, new ones included, get features computed the same way; a value never seen at
fit time contributes nothing):
* categorical: one binary column per value held by at least `MIN_ITEMS` training items, the
  `MAX_VALUES` most frequent per attribute;
* text (`title`): one binary column per word (lowercase, a run of at least two letters, so the
  "(1995)" of a MovieLens title and any other number is no word) held by at least `MIN_ITEMS`
  training items, `MAX_VALUES` at most;
* numeric: the standardised value (clipped to +-`Z_CLIP`), a missing flag and a one-hot of
  `BINS` quantile bins whose edges are fixed at fit time (a linear map then also bends with it).

Published as the blob `tower_blob(table)` = "content_tower/<table>" (the dense blob format of
`streamrec.param_server.artifacts`: JSON header and .npz arrays, nothing pickled).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from streamrec.param_server.artifacts import (
    CATALOGUE_BLOB,
    decode_catalogue,
    decode_dense,
    encode_dense,
)
from streamrec.param_server.client import ParamClient
from streamrec.stream.catalogue import ItemCatalogue

BLOB_KIND = "content-tower"
MIN_ITEMS = 2  # a value or word held by one training item only fits that item's noise
MAX_VALUES = 1000  # per attribute: keeps the feature count, and so the Gram matrix, small
BINS = 8
Z_CLIP = 5.0  # one extreme value of a new item cannot throw its row far
LAMBDAS = tuple(10.0 ** k for k in range(-2, 5))  # the ridge penalties tried on the validation split
VALIDATION_SHARE = 0.2
MIN_FIT_ITEMS = 5  # below that there is nothing to validate against
CHUNK_IDS = 65_536  # ids per pull / assign when seeding, so no frame grows with the catalogue
# seeding leaves 1/SEED_RESERVE of each shard's max_rows free: rows the online trainer creates
# between the room check and the assign, and its next pushes, find room without an eviction
SEED_RESERVE = 100
WORD = r"[^\W\d_]{2,}"  # letters only (any alphabet), at least two: no numbers, no "a"


def tower_blob(table: str) -> str:
    """The blob holding the tower fitted on `table`'s rows."""
    return f"content_tower/{table}"


# ---- features -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NumericSpec:
    """A numeric attribute's standardisation and bin edges, as the training items had them."""

    mean: float
    std: float
    edges: tuple[float, ...]  # quantile bin edges: len(edges) + 1 bins

    @property
    def columns(self) -> int:
        return 2 + len(self.edges) + 1  # value, missing flag, bins


def _positions(catalogue: ItemCatalogue, ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Catalogue positions of `ids`; a ValueError names ids the catalogue lacks."""
    positions = pd.Index(catalogue.ids).get_indexer(np.asarray(ids, dtype=object))
    if (positions < 0).any():
        missing = np.asarray(ids, dtype=object)[positions < 0]
        raise ValueError(f"{missing.size} ids are not in the catalogue, e.g. {missing[:3].tolist()}")
    return positions


def _row_map(catalogue: ItemCatalogue, positions: np.ndarray) -> np.ndarray:
    """Output row of each catalogue position, -1 for positions not asked for."""
    rows = np.full(len(catalogue), -1, np.int64)
    rows[positions] = np.arange(positions.size)
    return rows


def _categorical_pairs(catalogue: ItemCatalogue, name: str, rows_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(output row, value) of every value the asked-for items hold of attribute `name`."""
    column = catalogue.categorical.get(name)
    if column is None:
        return np.zeros(0, np.int64), np.zeros(0, object)
    codes = np.repeat(np.arange(len(column.values)), np.diff(column.starts))
    rows = rows_of[column.items]
    keep = rows >= 0
    return rows[keep], np.asarray(column.values, dtype=object)[codes[keep]]


def _text_pairs(catalogue: ItemCatalogue, name: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(output row, word) pairs, each word once per item: lowercase runs of at least two letters
    (a title's year, "(1995)", is a number and the numeric year attribute's business)."""
    texts = catalogue.text.get(name)
    if texts is None or positions.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, object)
    # object dtype: Python's re (Unicode letters) whatever string backend pandas would pick
    words = pd.Series(texts[positions], dtype=object).str.lower().str.findall(WORD).explode().dropna()
    pairs = pd.DataFrame({"row": words.index.to_numpy(np.int64), "word": words.to_numpy(object)}).drop_duplicates()
    return pairs["row"].to_numpy(np.int64), pairs["word"].to_numpy(object)


def _vocabulary(values: np.ndarray) -> tuple[str, ...]:
    """The values (one entry per holding item) held by at least MIN_ITEMS items, most frequent
    first (ties by value, so a refit on the same data gives the same columns), MAX_VALUES at most."""
    counts = pd.Series(values, dtype=object).value_counts()
    counts = counts[counts >= MIN_ITEMS].sort_index().sort_values(ascending=False, kind="stable")
    return tuple(str(v) for v in counts.index[:MAX_VALUES])


def _binary(rows: np.ndarray, values: np.ndarray, vocabulary: tuple[str, ...],
            offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, 1.0) for the (row, value) pairs whose value is in `vocabulary`; the others
    (values unseen at fit time) are dropped."""
    columns = pd.Index(vocabulary, dtype=object).get_indexer(values)
    known = columns >= 0
    return rows[known], offset + columns[known], np.ones(int(known.sum()))


def _numeric_spec(values: np.ndarray) -> NumericSpec:
    """Mean, std and quantile bin edges of the finite `values`, computed on the values divided by a
    power of two that brings the largest to [1, 2): sums, squares and interpolations of finite but
    huge values (1e308) overflowed, and a NaN mean made NaN features that stopped every fit
    ("Eigenvalues did not converge"), or an infinite std silently zeroed the value column. A
    power of two divides and multiplies exactly, so ordinary values get the very same statistics."""
    present = values[np.isfinite(values)]
    if present.size == 0:
        return NumericSpec(0.0, 1.0, ())
    largest = float(np.abs(present).max())
    scale = math.ldexp(1.0, math.frexp(largest)[1] - 1) if largest > 0 else 1.0
    unit = present / scale
    mean, std = float(unit.mean()) * scale, float(unit.std()) * scale
    edges = np.unique(np.quantile(unit, np.linspace(0, 1, BINS + 1)[1:-1]) * scale)
    return NumericSpec(mean, std if 0 < std < math.inf else 1.0, tuple(edges.tolist()))


@dataclass(frozen=True)
class FeatureSpec:
    """What turns a catalogue into the tower's feature matrix, fixed at fit time: vocabularies per
    categorical and text attribute, and each numeric attribute's mean, std and bin edges. Columns:
    categorical attributes, then text, then numeric, each group by attribute name."""

    categorical: dict[str, tuple[str, ...]]
    text: dict[str, tuple[str, ...]]
    numeric: dict[str, NumericSpec]

    @property
    def n_features(self) -> int:
        return (sum(map(len, self.categorical.values())) + sum(map(len, self.text.values()))
                + sum(spec.columns for spec in self.numeric.values()))

    @classmethod
    def fit(cls, catalogue: ItemCatalogue, positions: np.ndarray) -> FeatureSpec:
        """The spec of the items at `positions` (the training items: a value only untrained items
        hold could get no weight anyway)."""
        rows_of = _row_map(catalogue, positions)
        categorical = {name: _vocabulary(_categorical_pairs(catalogue, name, rows_of)[1])
                       for name in sorted(catalogue.categorical)}
        text = {name: _vocabulary(_text_pairs(catalogue, name, positions)[1]) for name in sorted(catalogue.text)}
        numeric: dict[str, NumericSpec] = {}
        numeric = {name: _numeric_spec(catalogue.numeric[name][positions]) for name in sorted(catalogue.numeric)}
        return cls(categorical, text, numeric)

    def features(self, catalogue: ItemCatalogue, positions: np.ndarray) -> sparse.csr_matrix:
        """(len(positions), n_features) float64 features of the items at `positions` of any
        catalogue: values, words and attributes unknown to the spec contribute nothing, a numeric
        attribute the catalogue lacks counts as missing."""
        rows_of = _row_map(catalogue, positions)
        n = positions.size
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        offset = 0
        for name, vocabulary in self.categorical.items():
            parts.append(_binary(*_categorical_pairs(catalogue, name, rows_of), vocabulary, offset))
            offset += len(vocabulary)
        for name, vocabulary in self.text.items():
            parts.append(_binary(*_text_pairs(catalogue, name, positions), vocabulary, offset))
            offset += len(vocabulary)
        everyone = np.arange(n)
        for name, spec in self.numeric.items():
            column = catalogue.numeric.get(name)
            values = column[positions] if column is not None else np.full(n, np.nan)
            present = np.isfinite(values)
            with np.errstate(over="ignore", invalid="ignore"):  # huge values: +-inf is clipped below
                z = (values[present] - spec.mean) / spec.std
            # NaN only from a blob's non-finite statistics (an older tower's): such a value adds nothing
            z = np.clip(np.nan_to_num(z, nan=0.0), -Z_CLIP, Z_CLIP)
            bins = np.searchsorted(np.asarray(spec.edges, np.float64), values[present], side="right")
            parts.append((everyone[present], np.full(z.size, offset), z))
            parts.append((everyone[~present], np.full(n - z.size, offset + 1), np.ones(n - z.size)))
            parts.append((everyone[present], offset + 2 + bins, np.ones(z.size)))
            offset += spec.columns
        if not parts:
            return sparse.csr_matrix((n, 0))
        rows, columns, data = (np.concatenate(group) for group in zip(*parts))
        return sparse.csr_matrix((data, (rows, columns)), shape=(n, self.n_features))

    def to_json(self) -> dict[str, Any]:
        return {"categorical": {k: list(v) for k, v in self.categorical.items()},
                "text": {k: list(v) for k, v in self.text.items()},
                "numeric": {k: {"mean": s.mean, "std": s.std, "edges": list(s.edges)} for k, s in self.numeric.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls({str(k): tuple(map(str, v)) for k, v in data["categorical"].items()},
                   {str(k): tuple(map(str, v)) for k, v in data["text"].items()},
                   {str(k): NumericSpec(float(s["mean"]), float(s["std"]), tuple(map(float, s["edges"])))
                    for k, s in data["numeric"].items()})


# ---- ridge regression ---------------------------------------------------------------------------

RidgeSolution = tuple[np.ndarray, np.ndarray]  # (coef (features, width), intercept (width,))


def _ridge_path(features: sparse.csr_matrix, targets: np.ndarray, weights: np.ndarray) -> Callable[[float], RidgeSolution]:
    """Weighted ridge regression with an unpenalised intercept, diagonalised once so that every
    lambda of a grid costs a few matrix products: returns lambda -> (coef, intercept) minimising
    sum_i w_i |y_i - x_i coef - intercept|^2 + lambda |coef|^2.

    The weighted, centred design Xw = sqrt(W) (X - 1 mean_x^T) = K - sqrt(w) mean_x^T (K = sqrt(W) X,
    sparse) is never formed densely; its Gram matrix is taken on the smaller side: features x
    features (primal) or items x items (dual), whichever is smaller."""
    total = float(weights.sum())
    root = np.sqrt(weights)
    x_mean = np.asarray(features.T @ weights).ravel() / total
    y_mean = weights @ targets / total
    scaled = sparse.diags(root) @ features  # K
    centred = root[:, None] * (targets - y_mean)  # Yw; sqrt(w)^T Yw = 0, so Xw^T Yw = K^T Yw
    n, p = features.shape

    def with_intercept(coef: np.ndarray) -> RidgeSolution:
        return coef, y_mean - x_mean @ coef

    if p <= n:
        gram = (scaled.T @ scaled).toarray() - total * np.outer(x_mean, x_mean)
        eigenvalues, vectors = np.linalg.eigh(gram)
        projected = vectors.T @ (scaled.T @ centred)
        return lambda lam: with_intercept(vectors @ (projected / (np.maximum(eigenvalues, 0) + lam)[:, None]))
    product = scaled @ x_mean  # K mean_x
    gram = ((scaled @ scaled.T).toarray() - np.outer(product, root) - np.outer(root, product)
            + (x_mean @ x_mean) * np.outer(root, root))
    eigenvalues, vectors = np.linalg.eigh(gram)
    projected = vectors.T @ centred

    def dual(lam: float) -> RidgeSolution:
        alpha = vectors @ (projected / (np.maximum(eigenvalues, 0) + lam)[:, None])  # (Xw Xw^T + lam)^-1 Yw
        return with_intercept(scaled.T @ alpha - np.outer(x_mean, root @ alpha))  # Xw^T alpha

    return dual


def _weighted_mse(predicted: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> float:
    return float(weights @ ((predicted - targets) ** 2).mean(axis=1) / weights.sum())


def _mean_cosine(predicted: np.ndarray, targets: np.ndarray) -> float:
    norms = np.linalg.norm(predicted, axis=1) * np.linalg.norm(targets, axis=1)
    return float(np.mean(np.einsum("ij,ij->i", predicted, targets) / np.maximum(norms, 1e-12)))


@dataclass(frozen=True, eq=False)  # arrays: no field-wise ==
class ContentTower:
    """Feature spec + linear map: row = features @ coef + intercept. `metrics` records the fit
    (lambda, items, features, validation scores) and travels with the blob."""

    spec: FeatureSpec
    coef: np.ndarray  # (n_features, width) float64
    intercept: np.ndarray  # (width,) float64
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.intercept.size)

    @classmethod
    def fit(cls, catalogue: ItemCatalogue, ids: Sequence[str] | np.ndarray, targets: np.ndarray, weights: np.ndarray,
            *, lambdas: Sequence[float] = LAMBDAS, seed: int = 0) -> ContentTower:
        """Ridge regression of `targets` (one row per id) on the items' features, each item weighted.

        The regularisation is the lambda of `lambdas` with the lowest weighted mean squared error on
        a seeded validation split of VALIDATION_SHARE of the items (fitted on the rest); the tower is
        then refitted on every item with it. `metrics` compares the validation error with the
        mean-row baseline (what every new item would get without metadata) and gives the mean
        cosine of predicted and actual validation rows."""
        targets = np.asarray(targets, np.float64)
        weights = np.asarray(weights, np.float64)
        positions = _positions(catalogue, ids)
        if targets.ndim != 2 or targets.shape[0] != positions.size or weights.shape != (positions.size,):
            raise ValueError(f"targets must be ({positions.size}, width) and weights ({positions.size},), "
                             f"got {targets.shape} and {weights.shape}")
        if not (np.isfinite(targets).all() and np.isfinite(weights).all() and (weights > 0).all()):
            raise ValueError("targets must be finite and weights finite and positive")
        if positions.size < MIN_FIT_ITEMS:
            raise ValueError(f"a content tower needs at least {MIN_FIT_ITEMS} trained items, got {positions.size}")
        spec = FeatureSpec.fit(catalogue, positions)
        features = spec.features(catalogue, positions)
        order = np.random.default_rng(seed).permutation(positions.size)
        valid = np.zeros(positions.size, bool)
        valid[order[: max(1, round(VALIDATION_SHARE * positions.size))]] = True
        train = ~valid
        solve = _ridge_path(features[train], targets[train], weights[train])
        scores = []
        for lam in lambdas:
            coef, intercept = solve(lam)
            scores.append(_weighted_mse(features[valid] @ coef + intercept, targets[valid], weights[valid]))
        best = int(np.argmin(scores))
        coef, intercept = solve(lambdas[best])
        predicted = features[valid] @ coef + intercept
        baseline = np.broadcast_to(weights[train] @ targets[train] / weights[train].sum(), predicted.shape)
        metrics = {
            "items": int(positions.size), "validation_items": int(valid.sum()), "features": spec.n_features,
            "lambda": float(lambdas[best]), "validation_mse": scores[best],
            "baseline_mse": _weighted_mse(baseline, targets[valid], weights[valid]),
            "validation_cosine": _mean_cosine(predicted, targets[valid]),
            "baseline_cosine": _mean_cosine(baseline, targets[valid]),
        }
        coef, intercept = _ridge_path(features, targets, weights)(lambdas[best])
        return cls(spec, coef, intercept, metrics)

    def predict(self, catalogue: ItemCatalogue, ids: Sequence[str] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 rows) for `ids` (default: every catalogue item); a ValueError names ids the
        catalogue lacks."""
        positions = np.arange(len(catalogue)) if ids is None else _positions(catalogue, ids)
        rows = self.spec.features(catalogue, positions) @ self.coef + self.intercept
        return catalogue.ids[positions], np.asarray(rows, np.float32)

    def to_blob(self) -> bytes:
        header = {"kind": BLOB_KIND, "spec": self.spec.to_json(), "metrics": self.metrics}
        return encode_dense(header, {"coef": self.coef, "intercept": self.intercept})

    @classmethod
    def from_blob(cls, data: bytes) -> ContentTower:
        """Inverse of `to_blob`; a ValueError for another kind of blob or parts that disagree."""
        header, arrays = decode_dense(data)
        if header.get("kind") != BLOB_KIND:
            raise ValueError(f"not a content tower blob (kind {header.get('kind')!r})")
        try:
            spec = FeatureSpec.from_json(header["spec"])
            coef, intercept = arrays["coef"], arrays["intercept"]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed content tower blob: {exc!r}") from exc
        if coef.shape != (spec.n_features, intercept.size) or intercept.ndim != 1:
            raise ValueError(f"malformed content tower blob: coef {coef.shape} for {spec.n_features} features, "
                             f"intercept {intercept.shape}")
        return cls(spec, coef, intercept, dict(header.get("metrics", {})))


# ---- against the parameter server ---------------------------------------------------------------


def _item_events(shard_counts: list[dict[str, int]]) -> pd.Series:
    """Events per item: every shard counts every item of the pushes it applied, so they agree, and
    the largest is right where one shard restarted with fewer (summing would double count)."""
    counted = [pd.Series(counts, dtype=np.int64) for counts in shard_counts if counts]
    if not counted:
        return pd.Series(dtype=np.int64)
    return pd.concat(counted).groupby(level=0).max()


def _check_table(client: ParamClient, table: str) -> None:
    """A ValueError unless `table` exists with string ids (catalogue ids are strings)."""
    tables = client.tables()
    if table not in tables:
        raise ValueError(f"no table {table!r} on the parameter server")
    key_type = tables[table]["spec"]["key_type"]
    if key_type != "str":
        raise ValueError(f"table {table!r} has {key_type} ids; catalogue ids are strings")


def fit_content_tower(client: ParamClient, table: str, catalogue: ItemCatalogue, min_events: int = 5,
                      *, seed: int = 0) -> tuple[ContentTower, dict[str, Any]]:
    """Fit a tower on `table`'s current rows (vector and scalars, full width) of the catalogue's
    items with at least `min_events` events, each weighted by log1p(events): the more events, the
    more the online learner's row is to be trusted. An item counted with no events (min_events 0,
    or counts a shard lost) weighs as one event. Seeded items have no events, so any min_events
    of 1 or more keeps the tower from learning from its own output. Returns (tower, report)."""
    _check_table(client, table)
    rows = client.delta(table, 0)
    ids = np.asarray(rows.ids.to_list(), dtype=object)
    events = _item_events(client.item_event_counts()).reindex(ids, fill_value=0).to_numpy(np.int64)
    use = (pd.Index(catalogue.ids).get_indexer(ids) >= 0) & (events >= min_events)
    if use.sum() < MIN_FIT_ITEMS:
        raise ValueError(f"table {table!r} has {int(use.sum())} rows of catalogue items with at least {min_events} "
                         f"events; a content tower needs {MIN_FIT_ITEMS}")
    tower = ContentTower.fit(catalogue, ids[use], rows.values[use], np.log1p(np.maximum(events[use], 1)), seed=seed)
    return tower, {"table": table, "rows": int(ids.size), "min_events": min_events, **tower.metrics}


def _reversed_chunks(ids: np.ndarray) -> Iterator[np.ndarray]:
    """`ids` in chunks of CHUNK_IDS, last first and each reversed: the catalogue's newest items
    (the items topic appends) come first."""
    for stop in range(ids.size, 0, -CHUNK_IDS):
        yield ids[max(0, stop - CHUNK_IDS):stop][::-1]


def _free_rows(client: ParamClient, table: str) -> np.ndarray:
    """Rows each shard of `table` can still create without evicting one: max_rows (per shard) less
    its live rows, less 1/SEED_RESERVE of max_rows."""
    free = []
    for shard in client.info():
        entry = next((t for t in shard["tables"] if t["name"] == table), None)
        if entry is None:
            raise ValueError(f"no table {table!r} on the parameter server")
        max_rows = int(entry["spec"]["max_rows"])
        free.append(max(0, max_rows - max_rows // SEED_RESERVE - int(entry["rows"])))
    return np.asarray(free, np.int64)


def _fitting(shards: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Mask of the ids (by their shards, in order of preference) that fit the shards' free rows."""
    rank = np.empty(shards.size, np.int64)  # how many ids of the same shard come before
    for shard in np.unique(shards):
        on = shards == shard
        rank[on] = np.arange(int(on.sum()))
    return rank < free[shards]


@dataclass(frozen=True)
class Seeding:
    """What one seeding did: `ids` given rows (sent with `only_new`), and how many catalogue items
    without a row got none because their shard had no free row left."""

    ids: np.ndarray  # object
    skipped_for_room: int


def seed_new_items(client: ParamClient, table: str, catalogue: ItemCatalogue, tower: ContentTower,
                   before_assign: Callable[[np.ndarray], None] | None = None) -> Seeding:
    """Give catalogue items without a row in `table` the tower's row for them, newest first, as many
    as fit the rows each shard has free (`_free_rows`).

    Seeding never displaces a row: the table makes room for new rows by evicting its least recently
    updated ones, which are trained rows, so seeding the whole catalogue into a nearly full table
    evicted learned rows round after round (and with more new items than max_rows every round
    failed with TableFullError). The items left out are counted in `skipped_for_room`; a later
    round seeds them when there is room. The assign is `only_new`, so a row the online trainer
    created between the pull and the assign keeps its trained values.

    `before_assign` gets each chunk's ids before their rows are written (e.g. to make them fresh for
    exploration): if it raises, those items still have no row and the next round tries them again,
    where marking after the assign left items seeded but never marked whenever the mark failed."""
    free = _free_rows(client, table)
    seeded: list[np.ndarray] = []
    skipped = 0
    for ids in _reversed_chunks(catalogue.ids):
        pulled = client.pull(table, ids)
        if pulled.values.shape[1] != tower.width:
            raise ValueError(f"table {table!r} rows are {pulled.values.shape[1]} wide, the tower's {tower.width}")
        missing = ids[~pulled.found]
        shards = client.shard_of(missing)
        fits = _fitting(shards, free)
        skipped += int((~fits).sum())
        missing = missing[fits]
        if missing.size == 0:
            continue
        free -= np.bincount(shards[fits], minlength=free.size)
        if before_assign is not None:
            before_assign(missing)
        _, rows = tower.predict(catalogue, missing)
        scalars = rows[:, pulled.dim :] if tower.width > pulled.dim else None
        client.assign(table, missing, rows[:, : pulled.dim], scalars, only_new=True)
        seeded.append(missing)
    return Seeding(np.concatenate(seeded) if seeded else np.empty(0, object), skipped)


def seed_with_published(client: ParamClient, table: str, since: int,
                        before_assign: Callable[[np.ndarray], None] | None = None) -> dict[str, Any] | None:
    """Between fits: when the catalogue has a version newer than `since` (the items topic adds
    items at any time), seed its items without a row with the tower already published, without
    refitting (`before_assign` as `seed_new_items`'s `before_assign`); None while there is no newer
    catalogue or no tower yet."""
    catalogue_blob = client.find_blob(CATALOGUE_BLOB, since)
    tower = client.find_blob(tower_blob(table)) if catalogue_blob is not None else None
    if catalogue_blob is None or tower is None:
        return None
    seeding = seed_new_items(client, table, decode_catalogue(catalogue_blob.data), ContentTower.from_blob(tower.data),
                             before_assign)
    return {"table": table, "catalogue_version": catalogue_blob.version, "tower_version": tower.version,
            "seeded": int(seeding.ids.size), "skipped_for_room": seeding.skipped_for_room}


def refresh_content_tower(client: ParamClient, table: str, min_events: int = 5,
                          before_assign: Callable[[np.ndarray], None] | None = None) -> dict[str, Any]:
    """One round: fit on the published catalogue and `table`'s rows, publish the tower as
    `tower_blob(table)`, seed the catalogue items without a row that fit the table (`before_assign`
    gets their ids just before their rows are written, e.g. to make them fresh for exploration:
    see `seed_new_items`). Returns the report."""
    blob = client.find_blob(CATALOGUE_BLOB)
    if blob is None:
        raise ValueError("no catalogue is published (streamrec catalogue publish PATH)")
    catalogue = decode_catalogue(blob.data)
    tower, report = fit_content_tower(client, table, catalogue, min_events)
    version = client.put_blob(tower_blob(table), tower.to_blob())
    seeding = seed_new_items(client, table, catalogue, tower, before_assign)
    return {"blob": tower_blob(table), "version": version, "catalogue_version": blob.version, **report,
            "seeded": int(seeding.ids.size), "skipped_for_room": seeding.skipped_for_room}
