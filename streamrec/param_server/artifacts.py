"""Encodings of the artefacts that batch refits publish as parameter-server blobs.

Refit jobs (trainer layer) write them and serving reads them, so the format lives here, in the
lowest layer both use; nothing is pickled, every blob is numpy's .npz read with
`allow_pickle=False` plus JSON.

* `KNN_BLOB` = "refit/item-knn/neighbors": an .npz with `items` (n,) unicode ids, `neighbors`
  (n, m) int32 indices into `items` (-1 = no neighbour), `scores` (n, m) float32, each row sorted
  by decreasing score.
* `RANKER_BLOB` = "refit/ranker": a dense blob = b"SRDENSE1" | u32 header length | UTF-8 JSON
  header | .npz arrays. The header's `kind` says which ranking model it holds (serving's
  `RANKER_LOADERS`).
* `CATALOGUE_BLOB` = "catalogue/items": a dense blob holding the item catalogue
  (`streamrec.stream.catalogue.ItemCatalogue.to_arrays`).
* `refit/<model>/manifest`: a dense blob whose header says what a refit published.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from typing import Any

import numpy as np

from streamrec.param_server.keys import Keys
from streamrec.stream.catalogue import CatalogueError, ItemCatalogue

KNN_BLOB = "refit/item-knn/neighbors"
RANKER_BLOB = "refit/ranker"
CATALOGUE_BLOB = "catalogue/items"  # the item catalogue (streamrec.param_server.catalogue_cli)
DENSE_MAGIC = b"SRDENSE1"


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an .npz; ValueError for bytes that are not one (a truncated zip, say)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"not an npz archive: {exc}") from exc


def encode_dense(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    head = json.dumps(header).encode()
    return DENSE_MAGIC + struct.pack("<I", len(head)) + head + npz_bytes(arrays)


def decode_dense(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a dense blob; ValueError for anything else (blobs are put by peers)."""
    header = dense_header(data)
    (length,) = struct.unpack_from("<I", data, 8)
    return header, load_npz(data[12 + length :])


def dense_header(data: bytes) -> dict[str, Any]:
    """A dense blob's JSON header alone (its arrays are not read)."""
    if data[:8] != DENSE_MAGIC or len(data) < 12:
        raise ValueError("not a dense blob (bad magic or truncated)")
    (length,) = struct.unpack_from("<I", data, 8)
    try:
        header = json.loads(data[12 : 12 + length])
    except RecursionError as exc:
        raise ValueError("dense blob header nested too deep") from exc
    if not isinstance(header, dict):
        raise ValueError(f"dense blob header is a JSON {type(header).__name__}, not an object")
    return header


def encode_neighbors(items: list[str] | np.ndarray, neighbors: np.ndarray, scores: np.ndarray) -> bytes:
    """The kNN lists as a blob; the item ids as UTF-8 bytes and offsets (`Keys`). A numpy string
    array padded every id to the longest: one id of 10,000 characters made a 1,330-item blob
    54 MB instead of 1 MB, and an id's trailing NUL characters were lost."""
    ids = Keys.from_strings(list(map(str, items))).checked_utf8()
    return npz_bytes({"item_bytes": ids.blob, "item_offsets": ids.offsets, "neighbors": np.asarray(neighbors, np.int32),
                      "scores": np.asarray(scores, np.float32)})


def decode_neighbor_ids(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The item ids of a kNN blob (object array); ValueError for ids that break `Keys`' rules.
    Blobs written before the ids were bytes carry them as a numpy string array, `items`."""
    if "item_bytes" not in arrays:
        return arrays["items"].astype(object)
    ids = Keys(blob=arrays["item_bytes"], offsets=arrays["item_offsets"]).checked_utf8()
    return np.array(ids.to_list(), dtype=object) if len(ids) else np.empty(0, object)


def encode_catalogue(catalogue: ItemCatalogue, marks: dict[str, int] | None = None) -> bytes:
    """The item catalogue as a dense blob (`CATALOGUE_BLOB`). `marks`: the items-topic offsets it
    holds ("topic/partition" -> next offset), written with it so that state and position are one
    atomic put (streamrec.param_server.catalogue_follow)."""
    header, arrays = catalogue.to_arrays()
    if marks is not None:
        header["marks"] = marks
    return encode_dense(header, arrays)


def decode_catalogue(data: bytes) -> ItemCatalogue:
    """Inverse of `encode_catalogue`; CatalogueError (a ValueError) on a malformed blob."""
    return decode_catalogue_marks(data)[0]


def decode_catalogue_marks(data: bytes) -> tuple[ItemCatalogue, dict[str, int] | None]:
    """The catalogue and the items-topic marks it was published with (None: a file publish)."""
    try:
        header, arrays = decode_dense(data)
    except ValueError as exc:
        raise CatalogueError(f"malformed catalogue blob: {exc}") from exc
    marks = header.get("marks")
    if marks is not None and not (isinstance(marks, dict) and all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in marks.items())):
        raise CatalogueError("malformed catalogue blob: marks must map partition keys to offsets")
    return ItemCatalogue.from_arrays(header, arrays), marks
