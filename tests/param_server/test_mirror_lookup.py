"""`TableMirror.position` (one id, a dict built at its first call and kept by `apply`) and
`TableMirror.positions` (many ids, the pandas index) must always agree: the live scorer ranks
with the first and learns with the second, serving looks up short lists with the first and long
ones with the second. Any sequence of upserts, deletions, full snapshots and compactions, with
lookups between them (so the dict exists while the deltas change the index)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.param_server.client import Delta
from streamrec.param_server.keys import Keys
from streamrec.param_server.replica import TableMirror

POOL = [f"i{n}" for n in range(40)] + ["a:b", "%3A", "{x}", "ünï", ""]
DIM = 2


def delta(ids: list[str], deleted: list[str], version: int, full: bool) -> Delta:
    return Delta(values=np.full((len(ids), DIM + 1), version, np.float32), found=np.ones(len(ids), bool), dim=DIM,
                 ids=Keys.from_strings(ids), deleted=Keys.from_strings(deleted) if deleted else Keys.empty("str"),
                 version=(version,), full=full)


steps = st.lists(st.tuples(st.lists(st.sampled_from(POOL), unique=True, max_size=20),
                           st.lists(st.sampled_from(POOL), unique=True, max_size=30),
                           st.booleans()), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(steps=steps, compact=st.booleans(), look_first=st.booleans())
def test_one_id_and_many_ids_find_the_same_rows(steps, compact: bool, look_first: bool) -> None:
    mirror = TableMirror(None, "items", compact=compact)
    live: set[str] = set()
    if look_first:
        assert mirror.position("i0") == -1
    for version, (upserts, deletions, full) in enumerate(steps, start=1):
        deletions = [] if full else [d for d in deletions if d not in upserts]
        mirror.apply(delta(upserts, deletions, version, full))
        live = set(upserts) if full else (live - set(deletions)) | set(upserts)
        many = mirror.positions(np.array(POOL + ["unknown"], object))
        one = [mirror.position(key) for key in POOL + ["unknown"]]
        assert one == many.tolist()
        assert {key for key, row in zip(POOL, one) if row >= 0} == live
        for key in upserts:
            assert mirror.values[mirror.position(key), 0] == version


def test_a_compaction_moves_the_rows_a_lookup_finds() -> None:
    """The dict built before a compaction must not outlive the rows it named."""
    mirror = TableMirror(None, "items", compact=True)
    items = [f"i{j}" for j in range(3000)]
    mirror.apply(delta(items, [], 1, False))
    assert mirror.position("i2999") == 2999
    assert mirror.apply(delta(["new"], items[:2000], 2, False)).full
    assert mirror.position("i2999") == 999 and mirror.position("new") == 1000 and mirror.position("i5") == -1
