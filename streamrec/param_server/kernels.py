"""Compiled row kernels of a table (numba): initial values, the optimiser step and row gathers.

Why compiled: in numpy each of these is a chain of whole-batch passes with temporaries (ten passes
over the random bits of the initial values, five for an Adagrad step, a gather then a slice for a
pull), and creating a row cost initial values + update + write as three batch-sized round trips
through memory. One loop per row does the same arithmetic once, in the CPU cache, and writes each
new row exactly once. The arithmetic is the numpy form's, operation by operation in the same
precision (float64 for the uniform draw, float32 for the optimiser, no fused multiply-add), so
the values are bit for bit those of the reference `initial_values` tests and of torch's
optimisers to float32 rounding.

The entry points have explicit signatures, so they compile on import (once: the machine code is
cached in __pycache__, `cache=True`) and no push waits for a compiler; the helpers are inlined into
them. `nogil=True` lets the server's other threads (checkpoints, the memory committer) run beside a
push.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_F2, _F1, _U1, _I1 = "float32[:, ::1]", "float32[::1]", "uint64[::1]", "int64[::1]"
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def kernel_input(array: np.ndarray, dtype: type[np.generic]) -> np.ndarray:
    """`array` as the kernels' signatures take it: `dtype`, C-ordered and writable (numba refuses a
    read-only buffer, e.g. `np.frombuffer` of bytes or a copy-on-write pandas array, even where a
    kernel only reads it); copied only when it is not that already."""
    return np.require(array, dtype, ("C", "W"))


@njit(cache=True, nogil=True, inline="always")
def mix(x: np.uint64) -> np.uint64:
    """SplitMix64's finaliser on one word (`keys.mix64` on arrays)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


@njit(cache=True, nogil=True, inline="always")
def _draw(out: np.ndarray, row: int, key: np.uint64, seed: np.uint64, scale: float, dim: int) -> None:
    """out[row, :dim] = uniform(-scale, scale) from the key's bits: column c from
    mix(key ^ seed + c * golden), the top 53 bits as a float64 in [-1, 1), scaled, then rounded."""
    base = key ^ seed
    for c in range(dim):
        bits = mix(base + np.uint64(c) * _GOLDEN) >> np.uint64(11)
        out[row, c] = np.float32((np.float64(bits) * 2.0**-52 - 1.0) * scale)


@njit(f"void({_F2}, {_U1}, uint64, float64, int64)", cache=True, nogil=True)
def draw_initial(out: np.ndarray, key64: np.ndarray, seed: np.uint64, scale: float, dim: int) -> None:
    """Initial values of ids `key64` into out (n, width): the vector drawn, the scalars 0."""
    for r in range(key64.size):
        _draw(out, r, key64[r], seed, scale, dim)
        for c in range(dim, out.shape[1]):
            out[r, c] = 0.0


@njit(cache=True, nogil=True, inline="always")
def _step(block: np.ndarray, row: int, grads: np.ndarray, g_row: int, lr: np.ndarray, eps: np.float32,
          adagrad: bool) -> None:
    """One optimiser step on block[row] (values, then Adagrad's accumulators) with grads[g_row]."""
    width = lr.size
    for c in range(width):
        g = grads[g_row, c]
        step = g * lr[c]
        if adagrad:
            accumulated = block[row, width + c] + g * g
            block[row, width + c] = accumulated
            step = step / (np.sqrt(accumulated) + eps)
        block[row, c] -= step


@njit(f"void({_F2}, {_I1}, {_U1}, uint64, float64, int64, float32, {_F2}, {_F1}, float32, boolean)",
      cache=True, nogil=True)
def write_new_rows(block: np.ndarray, rows: np.ndarray, key64: np.ndarray, seed: np.uint64, scale: float,
                   dim: int, initial_accumulator: np.float32, grads: np.ndarray, lr: np.ndarray,
                   eps: np.float32, adagrad: bool) -> None:
    """Write new rows whole, once: initial values, accumulators, and the first update when `grads`
    has a row per new row (an empty `grads`: no update)."""
    width, stride = lr.size, block.shape[1]
    update = grads.shape[0] == rows.size
    for r in range(rows.size):
        row = rows[r]
        _draw(block, row, key64[r], seed, scale, dim)
        for c in range(dim, width):
            block[row, c] = 0.0
        for c in range(width, stride):
            block[row, c] = initial_accumulator
        if update:
            _step(block, row, grads, r, lr, eps, adagrad)


@njit(f"void({_F2}, {_I1}, {_F2}, {_F1}, float32, boolean)", cache=True, nogil=True)
def apply_rows(block: np.ndarray, rows: np.ndarray, grads: np.ndarray, lr: np.ndarray, eps: np.float32,
               adagrad: bool) -> None:
    """One optimiser step on each of `rows` (distinct), in place."""
    for r in range(rows.size):
        _step(block, rows[r], grads, r, lr, eps, adagrad)


@njit(f"void({_F2}, {_I1}, {_F2})", cache=True, nogil=True)
def gather_rows(block: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[r] = the first out.shape[1] floats of block[rows[r]] (the values, not the accumulators)."""
    width = out.shape[1]
    for r in range(rows.size):
        row = rows[r]
        for c in range(width):
            out[r, c] = block[row, c]


# ---- the key index (`keyindex.KeyIndex`): open addressing, linear probing from a key's home,
# mix(home ^ salt), the salt a secret of the index (see KeyIndex) ------------------------------

_EMPTY, _TOMBSTONE = -1, -2


@njit(f"void(int32[::1], {_U1}, {_U1}, {_U1}, uint64, {_I1})", cache=True, nogil=True)
def find_keys(slots: np.ndarray, row_key: np.ndarray, keys: np.ndarray, homes: np.ndarray, salt: np.uint64,
              out: np.ndarray) -> None:
    """out[i] = the first row whose key is keys[i], probing from the home of homes[i] until an
    empty slot (-1: absent). Tombstones are probed past. `homes` is `keys` itself for integer ids
    and a secret hash of the id's bytes for string ids (see `hash_words`)."""
    mask = np.uint64(slots.size - 1)
    for i in range(keys.size):
        key = keys[i]
        pos = mix(homes[i] ^ salt) & mask
        out[i] = -1
        while True:
            row = slots[pos]
            if row == _EMPTY:
                break
            if row >= 0 and row_key[row] == key:
                out[i] = row
                break
            pos = (pos + np.uint64(1)) & mask


@njit(f"int64(int32[::1], int32[::1], {_U1}, uint64, {_I1})", cache=True, nogil=True)
def place_keys(slots: np.ndarray, row_slot: np.ndarray, homes: np.ndarray, salt: np.uint64, rows: np.ndarray) -> int:
    """Put rows[i] in the first free (empty or tombstone) slot from the home of homes[i] and record
    the slot in row_slot; returns how many tombstones were reused. The index must have room."""
    mask = np.uint64(slots.size - 1)
    reused = 0
    for i in range(homes.size):
        pos = mix(homes[i] ^ salt) & mask
        while slots[pos] >= 0:
            pos = (pos + np.uint64(1)) & mask
        if slots[pos] == _TOMBSTONE:
            reused += 1
        slots[pos] = rows[i]
        row_slot[rows[i]] = pos
    return reused


@njit(f"void({_U1}, {_I1}, {_I1}, {_I1}, uint64, uint64, {_U1}, {_U1})", cache=True, nogil=True)
def hash_words(words: np.ndarray, starts: np.ndarray, counts: np.ndarray, lengths: np.ndarray, seed: np.uint64,
               secret: np.uint64, key64: np.ndarray, homes: np.ndarray) -> None:
    """Two hashes of each string id in one pass over its words: key64[i], `keys.KeyWords.hash64`
    (seeded by the public `seed`: routing, initial values and every process agree on it) and
    homes[i], the same chain seeded by the table's `secret`, where the id's slot in the key index
    starts. The public chain can be inverted, so anyone could make thousands of ids share one
    key64; they then shared one home too, and every lookup walked them all. Their secret hashes
    differ, so they no longer pile up in one probe run."""
    for i in range(starts.size):
        public = mix(np.uint64(lengths[i]) ^ seed)
        private = mix(np.uint64(lengths[i]) ^ secret)
        first = starts[i]
        for j in range(counts[i]):
            word = words[first + j]
            public = mix(public ^ word)
            private = mix(private ^ word)
        key64[i] = public
        homes[i] = private


@njit(f"void({_U1}, {_I1}, int32[::1], {_I1}, uint64, {_U1})", cache=True, nogil=True)
def stored_homes(arena: np.ndarray, key_start: np.ndarray, key_len: np.ndarray, rows: np.ndarray, secret: np.uint64,
                 out: np.ndarray) -> None:
    """out[i] = `hash_words`'s home of the id stored for rows[i], read in place from a table's key
    arena (`key_start` in bytes, a multiple of 8; ids zero-padded to whole words): an index
    rebuild re-homes every live row without first copying their ids out."""
    for i in range(rows.size):
        row = rows[i]
        length = key_len[row]
        first = key_start[row] >> 3
        private = mix(np.uint64(length) ^ secret)
        for j in range((length + 7) >> 3):
            private = mix(private ^ arena[first + j])
        out[i] = private
