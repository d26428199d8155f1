"""A FAISS inner-product index over item rows, following the item replica incrementally.

Rows are [q_i | b_i] (the item bias as one more dimension) and queries [p_u | 1], so the
maximum-inner-product search ranks by the model's own score p_u . q_i + b_i. FAISS ids are the
replica's row positions. Small catalogues use exact search (IndexFlatIP behind an id map); from
`ivf_min_items` items an IVF index (sqrt(n) lists, `nprobe` probed) keeps search cost sub-linear.
Both support incremental add / update (remove + add) / remove; a delta touching more than
`rebuild_fraction` of the rows, a full snapshot or a change of kind rebuilds instead, reusing the
IVF centroids while the catalogue stays within 2x of the size they were trained on.

Single-query searches are memoised (`SearchMemo`): requests follow a Zipf law over users, and a
user asking again before their row or the index changed sends the same query bytes, whose answer
from the same index is the same. The memo is emptied by every change to the index, so it never
answers from another state.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import faiss
import numpy as np

from streamrec.param_server.replica import Changes, TableMirror

IVF_TRAIN_PER_LIST = 64
IVF_TRAIN_ITERATIONS = 10
SELECTIVE_PROBES = 4


def index_rows(mirror: TableMirror, positions: np.ndarray | slice) -> np.ndarray:
    """The rows the index stores: the vector and, when the table has scalars, the first (bias)."""
    width = mirror.dim + min(mirror.scalars, 1)
    return np.ascontiguousarray(mirror.values[positions, :width], dtype=np.float32)


def query_rows(vectors: np.ndarray, item_mirror: TableMirror, bias_weight: float = 1.0) -> np.ndarray:
    """User vectors as queries: a constant `bias_weight` where the items carry a bias column."""
    if item_mirror.scalars:
        vectors = np.hstack([vectors, np.full((len(vectors), 1), bias_weight, np.float32)])
    return np.ascontiguousarray(vectors, dtype=np.float32)


class Count(Protocol):
    """What the memo counts hits and misses with: a labelled Prometheus counter in a worker."""

    def inc(self, amount: float = 1) -> None: ...


class Tally:
    """A plain `Count` where no metrics are kept (tests, the bench's bare search)."""

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


@dataclass(frozen=True)
class MemoCounts:
    """Where the memos of a worker's indexes (both buffers and their clones) count."""

    hits: Count = field(default_factory=Tally)
    misses: Count = field(default_factory=Tally)


MemoKey = tuple[str, int, bytes, int]  # the query's dtype and width, its bytes, k
Answer = tuple[np.ndarray, np.ndarray]
ENTRY_OVERHEAD_BYTES = 512  # key and answer tuples, the bytes object, two array headers, the LRU node


class SearchMemo:
    """The answers of recent distinct single-row searches, least recently used first out once they
    take more than `capacity_bytes` (arrays, key and a fixed overhead: a large k costs its size,
    not one slot). Answers are stored read-only: a caller that tried to change one would fail, not
    corrupt the next request's candidates. A lock guards the LRU order: `/similar` searches from
    the thread pool while `/recommend` searches on the event loop.

    Each `clear` starts a new generation, and an answer is kept only if no clear came between the
    `get` that missed and its `put`: a search that overlapped a change of its index (the index
    clears before and after changing) is answered but not remembered."""

    def __init__(self, capacity_bytes: int, counts: MemoCounts) -> None:
        self.capacity_bytes, self.counts = capacity_bytes, counts
        self._answers: OrderedDict[MemoKey, Answer] = OrderedDict()
        self._bytes = 0
        self._generation = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: MemoKey) -> tuple[Answer | None, int]:
        """The remembered answer (None: a miss) and the generation a `put` of this search gives back."""
        with self._lock:
            answer, generation = self._answers.get(key), self._generation
            if answer is not None:
                self._answers.move_to_end(key)
        (self.counts.misses if answer is None else self.counts.hits).inc()
        return answer, generation

    def put(self, key: MemoKey, answer: Answer, generation: int) -> None:
        size = _entry_bytes(key, answer)
        if size > self.capacity_bytes:
            return
        for array in answer:
            array.setflags(write=False)
        with self._lock:
            if generation != self._generation:
                return
            previous = self._answers.pop(key, None)
            if previous is not None:
                self._bytes -= _entry_bytes(key, previous)
            self._answers[key] = answer
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                old_key, old_answer = self._answers.popitem(last=False)
                self._bytes -= _entry_bytes(old_key, old_answer)

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()
            self._bytes = 0
            self._generation += 1


def _entry_bytes(key: MemoKey, answer: Answer) -> int:
    return len(key[2]) + answer[0].nbytes + answer[1].nbytes + ENTRY_OVERHEAD_BYTES


class ItemIndex:
    def __init__(self, kind: str = "auto", nprobe: int = 16, ivf_min_items: int = 50_000,
                 rebuild_fraction: float = 0.25, memo_bytes: int = 0, memo_counts: MemoCounts | None = None) -> None:
        """`memo_bytes`: the memo's bound on the answers it keeps (0: no memo); `memo_counts`: where
        its hits and misses are counted (shared by the worker's buffers)."""
        self.kind, self.nprobe, self.ivf_min_items, self.rebuild_fraction = kind, nprobe, ivf_min_items, rebuild_fraction
        self.memo = SearchMemo(memo_bytes, memo_counts or MemoCounts())
        self.index: faiss.Index | None = None
        self.built_kind = ""
        self._centroids: np.ndarray | None = None
        self._trained_on = 0
        self.rebuilds = 0

    @property
    def size(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _wanted_kind(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "ivf" if n >= self.ivf_min_items else "flat"

    def rebuild(self, mirror: TableMirror) -> None:
        positions = np.flatnonzero(mirror.alive)
        rows = index_rows(mirror, positions)
        dim = rows.shape[1] if rows.ndim == 2 and rows.shape[1] else mirror.dim + min(mirror.scalars, 1)
        kind = self._wanted_kind(len(rows))
        if kind == "ivf" and len(rows):
            index = self._ivf(rows, dim)
        else:
            kind, index = "flat", faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if len(rows):
            index.add_with_ids(rows, positions.astype(np.int64))
        self.memo.clear()
        self.index, self.built_kind = index, kind
        self.memo.clear()  # again: a search of the old index that began between the two is not remembered
        self.rebuilds += 1

    def _ivf(self, rows: np.ndarray, dim: int) -> faiss.Index:
        n = len(rows)
        reuse = (self._centroids is not None and self._centroids.shape[1] == dim
                 and self._trained_on / 2 <= n <= self._trained_on * 2)
        if not reuse:
            nlist = max(1, int(np.sqrt(n)))
            sample = rows[np.random.default_rng(0).choice(n, min(n, nlist * IVF_TRAIN_PER_LIST), replace=False)]
            kmeans = faiss.Kmeans(dim, nlist, niter=IVF_TRAIN_ITERATIONS, spherical=False, seed=1)
            kmeans.train(sample)
            self._centroids, self._trained_on = kmeans.centroids.copy(), n
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(self._centroids)
        index = faiss.IndexIVFFlat(quantizer, dim, len(self._centroids), faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        index.nprobe = self.nprobe
        return index

    def update(self, changes: Changes, mirror: TableMirror) -> bool:
        """Follow one applied delta; returns True when the index was rebuilt."""
        touched = len(changes.upserted) + len(changes.removed)
        if (self.index is None or changes.full or touched > self.rebuild_fraction * max(self.size, 1)
                or self._wanted_kind(len(mirror)) != self.built_kind
                or self.index.d != mirror.dim + min(mirror.scalars, 1)):
            self.rebuild(mirror)
            return True
        stale = np.concatenate([changes.removed, changes.upserted]).astype(np.int64)
        self.memo.clear()
        if len(stale):
            self.index.remove_ids(faiss.IDSelectorBatch(stale))
        if len(changes.upserted):
            self.index.add_with_ids(index_rows(mirror, changes.upserted), changes.upserted)
        self.memo.clear()  # again: a search that ran during the change is not remembered
        return False

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row positions), -1 positions where fewer than k items exist. A single query's
        answer may come from the memo: then both arrays are read-only."""
        if self.index is None or not self.size:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        k = min(k, self.size)
        if len(queries) != 1 or not self.memo.capacity_bytes:
            return self.index.search(queries, k)
        key = (queries.dtype.str, queries.shape[1], queries.tobytes(), k)
        answer, generation = self.memo.get(key)
        if answer is None:
            answer = self.index.search(queries, k)
            self.memo.put(key, answer, generation)
        return answer

    def search_within(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`search` restricted to the row positions where `allowed` (bool by row) is True, with a
        FAISS ID selector, so FAISS skips the others while it scans; an IVF index probes
        `SELECTIVE_PROBES` times as many lists (the allowed rows may sit in few of them)."""
        if self.index is None or not self.size:
            return self.search(queries, k)
        bitmap = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        if self.built_kind == "ivf":
            lists = faiss.extract_index_ivf(self.index).nlist
            params: faiss.SearchParameters = faiss.SearchParametersIVF(
                sel=selector, nprobe=min(lists, self.nprobe * SELECTIVE_PROBES))
        else:
            params = faiss.SearchParameters(sel=selector)
        return self.index.search(queries, min(k, self.size), params=params)

    def clone(self) -> ItemIndex:
        """An independent copy (the second buffer after a rebuild: a copy is cheaper than a rebuild)."""
        copy = ItemIndex(self.kind, self.nprobe, self.ivf_min_items, self.rebuild_fraction, self.memo.capacity_bytes,
                         self.memo.counts)
        copy.index = None if self.index is None else faiss.clone_index(self.index)
        if copy.index is not None and self.built_kind == "ivf":
            faiss.extract_index_ivf(copy.index).nprobe = self.nprobe
        copy.built_kind, copy._centroids, copy._trained_on = self.built_kind, self._centroids, self._trained_on
        return copy
