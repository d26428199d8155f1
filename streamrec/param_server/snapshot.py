"""A table's big block (values and optimiser state) as of one version, read while pushes go on.

Why: copying a 1M-row table (~0.5 GB) under the shard lock stalls every push for the whole copy.
Instead the checkpoint reads the block in chunks, taking the lock per chunk only, and pushes keep
running in between. To keep the checkpoint consistent at the version where it started, a write to
a row the checkpoint has not read yet first saves that row's old bytes (a copy-on-write
pre-image); the chunk reader uses the saved bytes instead of the row's current ones. Rows created
after the start (beyond `end`) are not part of the snapshot; rows already read need nothing.

Thread safety: `preserve` runs with the store lock held (the table calls it before writing rows);
`chunks` takes the same lock for each chunk, so a row is never read half-written.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

DEFAULT_CHUNK_ROWS = 16384  # ~8 MB of a 64-dim Adagrad table: about a millisecond under the lock


class BlockSnapshot:
    def __init__(self, block: np.ndarray, end: int, lock: threading.Lock, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        self.block, self.end, self.lock, self.chunk_rows = block, end, lock, chunk_rows
        self.cursor = 0  # rows below it are read already
        self.slot = np.full(end, -1, np.int64)  # row -> its pre-image in `saved`, -1: none
        self.saved = np.empty((0, block.shape[1]), block.dtype)
        self.saved_rows = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.end, int(self.block.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.block.dtype

    def preserve(self, rows: np.ndarray) -> None:
        """Save the current bytes of the rows about to be written that the reader still needs."""
        if self.cursor >= self.end or not rows.size:
            return
        rows = rows[(rows >= self.cursor) & (rows < self.end)]
        rows = np.unique(rows[self.slot[rows] < 0])
        if not rows.size:
            return
        need = self.saved_rows + rows.size
        if need > len(self.saved):
            grown = np.empty((max(need, 2 * len(self.saved), 1024), self.block.shape[1]), self.block.dtype)
            grown[: self.saved_rows] = self.saved[: self.saved_rows]
            self.saved = grown
        self.saved[self.saved_rows : need] = self.block.take(rows, axis=0)
        self.slot[rows] = np.arange(self.saved_rows, need)
        self.saved_rows = need

    def chunks(self) -> Iterator[np.ndarray]:
        """The rows [0, end) as they were at the start, chunk by chunk. Each chunk is a view of one
        reused buffer: consume it before asking for the next."""
        buffer = np.empty((min(self.chunk_rows, max(self.end, 1)), self.block.shape[1]), self.block.dtype)
        while True:
            with self.lock:
                start = self.cursor
                if start >= self.end:
                    return
                stop = min(self.end, start + self.chunk_rows)
                out = buffer[: stop - start]
                out[...] = self.block[start:stop]
                slots = self.slot[start:stop]
                kept = slots >= 0
                if kept.any():
                    out[kept] = self.saved[slots[kept]]
                self.cursor = stop
            yield out
