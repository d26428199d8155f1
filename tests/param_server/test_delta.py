"""Incremental sync: replaying deltas on a copy reproduces the table, also while pushes run."""

from __future__ import annotations

import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.param_server.client import Delta, ParamClient
from streamrec.param_server.keys import Keys
from streamrec.param_server.specs import TableSpec
from streamrec.param_server.store import ParamStore

Replica = dict[object, bytes]


def apply(replica: Replica, ids: list, values: np.ndarray, deleted: list, reset: bool) -> None:
    if reset:
        replica.clear()
    for key in deleted:
        replica.pop(key, None)
    replica.update(zip(ids, (row.tobytes() for row in values)))


def store_sync(store: ParamStore, replica: Replica, since: int, chunk: int) -> int:
    plan, chunk, (keys, part, _, _) = store.delta_start("t", since, chunk)
    ids, values = keys.to_list(), [part]
    for start in range(chunk, plan.rows.size, chunk):
        keys, part, _, _ = store.delta_chunk("t", plan.rows[start : start + chunk], plan.version)
        ids += keys.to_list()
        values.append(part)
    apply(replica, ids, np.concatenate(values) if values else np.empty((0, 3)), plan.deleted.to_list(), plan.reset)
    return plan.version


def truth(store: ParamStore) -> Replica:
    table = store.tables["t"]
    keys, values = table.read_rows(table.alive_rows())
    return dict(zip(keys.to_list(), (row.tobytes() for row in values)))


operation = st.tuples(
    st.sampled_from(["push", "assign", "sync"]),
    st.lists(st.integers(0, 40), min_size=1, max_size=12),
    st.floats(0, 6),  # event time advance: with ttl 10, rows expire along the way
    st.integers(1, 7),  # chunk size of a sync
)


@settings(max_examples=40, deadline=None)
@given(st.lists(operation, min_size=1, max_size=30), st.booleans())
def test_replayed_deltas_reproduce_table(ops: list, string_ids: bool) -> None:
    store = ParamStore()
    store.create_table(TableSpec("t", 2, scalars=1, key_type="str" if string_ids else "int", ttl=10.0, min_count=1))
    replica: Replica = {}
    since, clock = 0, 0.0
    for kind, ids, advance, chunk in ops:
        clock += advance
        keys = Keys.from_strings([f"id{i}" for i in ids]) if string_ids else Keys(ints=np.array(ids, np.int64))
        rows = np.random.default_rng(len(ids)).normal(size=(len(ids), 3)).astype(np.float32)
        if kind == "push":
            store.push([("t", keys, rows)], event_time=clock)
        elif kind == "assign":
            store.assign("t", keys, rows, event_time=clock)
        else:
            since = store_sync(store, replica, since, chunk)
    store_sync(store, replica, since, 5)
    assert replica == truth(store)


def client_apply(replica: Replica, delta: Delta) -> None:
    apply(replica, delta.ids.to_list(), delta.values, delta.deleted.to_list(), delta.full)


def test_delta_under_concurrent_pushes(client: ParamClient, server) -> None:
    client.create_table("t", 4, scalars=1, key_type="int", ttl=5.0, optimizer="sgd", lr=0.1)
    stop = threading.Event()
    pushes = [0]

    def pusher() -> None:
        rng = np.random.default_rng(7)
        with ParamClient([server.address]) as own:
            clock = 0.0
            while not stop.is_set():
                clock += 0.05  # event time: ids not pushed for 5 "seconds" expire
                ids = rng.integers(0, 3000, 500) + 20 * pushes[0]  # a sliding population
                own.push({"t": (ids, rng.normal(size=(500, 5)).astype(np.float32))}, event_time=clock)
                pushes[0] += 1

    thread = threading.Thread(target=pusher)
    thread.start()
    replica: Replica = {}
    version: int | tuple = 0
    try:
        while pushes[0] < 250:  # 12.5 s of event time: plenty of expiry
            delta = client.delta("t", version)
            client_apply(replica, delta)
            version = delta.version
    finally:
        stop.set()
        thread.join()
    assert client.table_info("t")["evicted"] > 0
    client_apply(replica, client.delta("t", version))
    chunks = list(client.delta_chunks("t", 0, chunk_rows=333))
    assert len(chunks) > 1
    full: Replica = {}
    for chunk in chunks:
        apply(full, chunk.ids.to_list(), chunk.values, [], False)
    assert replica == full
    empty = client.delta("t", client.delta("t", version).version)
    assert len(empty.ids) == 0 and len(empty.deleted) == 0 and not empty.full


def test_a_delta_is_the_table_as_of_its_version_or_says_it_is_torn() -> None:
    """A push landing while a delta is read: a one-chunk delta (plan and rows under one lock) is
    the table as of its version; a later chunk the push reached is flagged torn (it used to carry the
    push's values under the version before it, and serving labelled them with that version)."""
    store = ParamStore()
    store.create_table(TableSpec("t", 2, scalars=1, key_type="int"))
    keys = Keys(ints=np.arange(10, dtype=np.int64))
    since = store.assign("t", keys, np.zeros((10, 3), np.float32))
    store.assign("t", keys, np.ones((10, 3), np.float32))
    plan, chunk, (_, first, _, torn) = store.delta_start("t", since, 4)
    store.assign("t", keys, np.full((10, 3), 2, np.float32))  # lands between the chunks
    assert chunk == 4 and not torn and (first == 1).all()
    _, later, _, torn = store.delta_chunk("t", plan.rows[4:8], plan.version)
    assert torn and (later == 2).all()
    _, _, (_, whole, _, torn) = store.delta_start("t", since, 100)
    assert not torn and (whole == 2).all()
