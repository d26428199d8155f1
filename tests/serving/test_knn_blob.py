"""The kNN lists' blob: what a refit publishes and every serving worker decodes."""

from __future__ import annotations

import numpy as np
import pytest

from streamrec.param_server.artifacts import encode_neighbors, npz_bytes
from streamrec.serving.artifacts import ItemNeighbors


def test_one_long_id_does_not_pad_every_id_and_ids_round_trip_exactly() -> None:
    """The ids were a numpy string array, padded to the longest: one id of 10,000 characters made a
    1,330-item blob 54 MB instead of 1 MB. Trailing NULs of an id were lost too."""
    ids = [f"i{n}" for n in range(1000)] + ["x" * 256, "a\x00", "é:ü"]
    lists = np.tile(np.arange(1, 4, dtype=np.int32), (len(ids), 1))
    blob = encode_neighbors(np.array(ids, dtype=object), lists, np.ones(lists.shape, np.float32))
    assert len(blob) < 60_000  # 1,003 ids padded to 256 UCS-4 characters took over 1 MB
    back = ItemNeighbors.from_bytes(blob)
    assert back.ids.tolist() == ids
    neighbours, _ = back.lookup(["a\x00"], 3)
    assert neighbours.tolist() == ["i1", "i2", "i3"]


def test_a_blob_written_before_ids_were_bytes_still_decodes() -> None:
    legacy = npz_bytes({"items": np.array(["a", "b"]), "neighbors": np.array([[1], [0]], np.int32),
                        "scores": np.ones((2, 1), np.float32)})
    assert ItemNeighbors.from_bytes(legacy).ids.tolist() == ["a", "b"]


def test_offsets_that_lie_about_lengths_are_refused() -> None:
    good = {"item_bytes": np.frombuffer(b"ab", np.uint8), "item_offsets": np.array([0, 1, 2], np.int64),
            "neighbors": np.array([[1], [0]], np.int32), "scores": np.ones((2, 1), np.float32)}
    assert ItemNeighbors.from_bytes(npz_bytes(good)).ids.tolist() == ["a", "b"]
    for offsets in ([0, 5, 2], [0, 1, 9], [1, 1, 2]):
        with pytest.raises(ValueError):
            ItemNeighbors.from_bytes(npz_bytes({**good, "item_offsets": np.array(offsets, np.int64)}))
