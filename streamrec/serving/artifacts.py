"""How serving decodes the artefacts batch refits publish (formats: `streamrec.param_server.artifacts`).

The ranker blob's header `kind` picks the loader in `RANKER_LOADERS`; kind "linear" has
`features` (names from `FEATURES`) and arrays `weights` (len(features),) and `bias` (1,):
score = features @ weights + bias.

Other families' item vectors are not blobs: they are parameter-server tables, chosen with
`ServingConfig.user_table` / `item_table`.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from streamrec.core.lookup import positions
from streamrec.param_server.artifacts import decode_catalogue, decode_dense, decode_neighbor_ids, load_npz
from streamrec.stream.catalogue import ItemCatalogue

if TYPE_CHECKING:  # torch is imported only when a neural ranker is loaded
    from streamrec.trainer.models.neural.ctr import Ranker as CTRRanker

# per-candidate features a ranking model may use (computed by streamrec.serving.pipeline)
FEATURES = ("dot", "bias", "ann", "item_knn", "trending", "knn_score", "popularity")


@dataclass(frozen=True)
class ItemNeighbors:
    """Item-kNN lists of a batch refit, looked up by item id."""

    index: pd.Index
    ids: np.ndarray  # object ids by row
    neighbors: np.ndarray
    scores: np.ndarray

    @classmethod
    def from_bytes(cls, data: bytes) -> ItemNeighbors:
        arrays = load_npz(data)
        ids = decode_neighbor_ids(arrays)
        neighbors, scores = arrays["neighbors"], arrays["scores"]
        if neighbors.ndim != 2 or neighbors.shape != scores.shape or neighbors.shape[0] != len(ids):
            raise ValueError(f"neighbour blob shapes disagree: {len(ids)} items, {neighbors.shape}, {scores.shape}")
        if neighbors.dtype.kind not in "iu" or scores.dtype.kind != "f":
            raise ValueError(f"neighbour blob types: neighbors {neighbors.dtype}, scores {scores.dtype}")
        if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= len(ids)):  # -1: no neighbour
            raise ValueError(f"neighbour blob points outside its {len(ids)} items")
        return cls(pd.Index(ids, dtype=object), ids, neighbors, scores)

    def lookup(self, item_ids: list[str], per_item: int) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour ids, scores) of the known items, flattened, at most per_item each."""
        rows = positions(self.index, item_ids)
        rows = rows[rows >= 0]
        neighbors, scores = self.neighbors[rows, :per_item].ravel(), self.scores[rows, :per_item].ravel()
        valid = neighbors >= 0
        return self.ids[neighbors[valid]], scores[valid]


class CandidateRanker(Protocol):
    """A published ranking model as the candidate pipeline calls it: one score per candidate, from
    the per-candidate `FEATURES` or from the model's own embeddings of (user, item)."""

    name: str

    @property
    def uses_history(self) -> bool:
        """True when `score` reads the user's current items (`history`): the pipeline then
        fetches them even when the request does not filter seen items."""
        ...

    def score(self, features: dict[str, np.ndarray], user_id: str, item_ids: np.ndarray,
              history: Collection[str] | None) -> np.ndarray: ...


@dataclass(frozen=True)
class LinearRanker:
    features: tuple[str, ...]
    weights: np.ndarray
    bias: float
    name: str = "linear"

    @classmethod
    def from_dense(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> LinearRanker:
        features = tuple(header["features"])
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ValueError(f"ranker uses unknown features {sorted(unknown)}; known: {FEATURES}")
        weights = np.asarray(arrays["weights"], np.float64)
        if weights.shape != (len(features),):
            raise ValueError(f"ranker weights shape {weights.shape} != ({len(features)},)")
        return cls(features, weights, float(np.asarray(arrays["bias"]).reshape(-1)[0]))

    @property
    def uses_history(self) -> bool:
        return False

    def score(self, features: dict[str, np.ndarray], user_id: str, item_ids: np.ndarray,
              history: Collection[str] | None) -> np.ndarray:
        return np.column_stack([features[f] for f in self.features]) @ self.weights + self.bias


@dataclass(frozen=True)
class NeuralRanker:
    """A ranking-stage network published by a refit (Wide & Deep, DeepFM, DCN, DCN-v2): it scores
    (user, item) pairs itself from its own embeddings; torch is imported only when one is loaded."""

    model: CTRRanker
    name: str

    @classmethod
    def from_dense(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> NeuralRanker:
        from streamrec.trainer.models.neural.ctr import load_ranker as load_network

        return cls(load_network(header, arrays), header.get("model", header["kind"]))

    @property
    def uses_history(self) -> bool:
        return self.model.uses_history

    def score(self, features: dict[str, np.ndarray], user_id: str, item_ids: np.ndarray,
              history: Collection[str] | None) -> np.ndarray:
        """With `user_history`, the user's items as they are now (`history`) are pooled, so an
        event since the refit moves the ranking at once."""
        return self.model.score(np.full(len(item_ids), user_id, dtype=object), item_ids, history=history)


RANKER_LOADERS: dict[str, Callable[[dict[str, Any], dict[str, np.ndarray]], CandidateRanker]] = {
    "linear": LinearRanker.from_dense,
    **{kind: NeuralRanker.from_dense for kind in ("wide-deep", "deepfm", "dcn", "dcn-v2")},
}


def load_ranker(data: bytes) -> CandidateRanker:
    header, arrays = decode_dense(data)
    kind = header.get("kind")
    if kind not in RANKER_LOADERS:
        raise ValueError(f"unknown ranker kind {kind!r}; known: {sorted(RANKER_LOADERS)}")
    return RANKER_LOADERS[kind](header, arrays)


@dataclass(frozen=True)
class Artifacts:
    """The refit artifacts a serving state uses, with the blob versions they came from."""

    knn: ItemNeighbors | None = None
    ranker: CandidateRanker | None = None
    catalogue: ItemCatalogue | None = None
    versions: dict[str, int] = field(default_factory=dict)

    def with_blob(self, name: str, kind: str, data: bytes, version: int) -> Artifacts:
        """A copy with one blob decoded and replaced (`kind`: "knn", "ranker" or "catalogue").
        Raises `ArtifactError` for any blob that does not decode: blobs come from whoever may put
        one, and their decoders meet bytes they were not written for in many ways."""
        loaders: dict[str, Callable[[bytes], object]] = {"knn": ItemNeighbors.from_bytes, "ranker": load_ranker,
                                                         "catalogue": decode_catalogue}
        try:
            decoded = loaders[kind](data)
        except DECODE_ERRORS as exc:
            raise ArtifactError(f"{kind} blob {name!r} version {version} does not decode: "
                                f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        return replace(self, **{kind: decoded}, versions={**self.versions, name: version})


class ArtifactError(ValueError):
    """A published blob that serving cannot use."""


# what decoding foreign bytes raises: json, npz (zip), struct headers, numpy casts, torch's
# load_state_dict (RuntimeError), and headers of the wrong JSON shape (AttributeError, TypeError)
DECODE_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, OverflowError,
                 RecursionError, RuntimeError, struct.error, zipfile.BadZipFile)
