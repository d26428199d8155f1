"""Batches of ids as flat numpy buffers, and the 64-bit hashes everything else is built on.

An id is either a 64-bit integer or a string. A batch of string ids travels and is stored as one
UTF-8 byte buffer plus an offsets array (no Python object per id), so hashing, comparing, sending
and sub-selecting a batch are all vectorised numpy operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

KeyType = Literal["int", "str"]
MAX_KEY_BYTES = 1024  # longer string ids are refused: they would blow up the padded hash matrix
_HASH_CHUNK = 1 << 16  # strings hashed per step, bounds the temporary padded matrix

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_STRING_SEED = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on uint64 that spreads every input bit over the output."""
    x = np.asarray(x).astype(np.uint64)
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def gather_padded(blob: np.ndarray, starts: np.ndarray, lens: np.ndarray, width: int) -> np.ndarray:
    """Byte strings blob[starts[i]:starts[i]+lens[i]] as rows of an (n, width) zero-padded matrix."""
    cols = np.arange(width, dtype=np.int64)
    valid = cols < lens[:, None]
    if blob.size == 0:
        return np.zeros((starts.size, width), np.uint8)
    idx = np.minimum(starts[:, None] + cols, blob.size - 1)
    return np.where(valid, blob[idx], np.uint8(0))


def padded_width(lens: np.ndarray) -> int:
    longest = int(lens.max()) if lens.size else 0
    return max(8, (longest + 7) // 8 * 8)


def hash_strings(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """A 64-bit hash per string: the length, then each of its 8-byte words, chained through mix64.

    Loops over word positions (a handful per id), never over ids. Depends only on the string, not
    on the batch it arrives in (the padding of a batch's longest id is skipped).
    """
    n = offsets.size - 1
    out = np.empty(n, np.uint64)
    for lo in range(0, n, _HASH_CHUNK):
        hi = min(n, lo + _HASH_CHUNK)
        starts = offsets[lo:hi]
        lens = offsets[lo + 1 : hi + 1] - starts
        words = gather_padded(blob, starts, lens, padded_width(lens)).view(np.uint64)
        words_used = (lens + 7) // 8
        h = mix64(lens.astype(np.uint64) ^ _STRING_SEED)
        for position, column in enumerate(words.T):  # padding words must not change the hash
            h = np.where(position < words_used, mix64(h ^ column), h)
        out[lo:hi] = h
    return out


@dataclass(frozen=True)
class Keys:
    """One batch of ids: `ints` (int64) for integer ids, or `blob` + `offsets` for string ids."""

    ints: np.ndarray | None = None
    blob: np.ndarray | None = None
    offsets: np.ndarray | None = None

    @property
    def kind(self) -> KeyType:
        return "int" if self.ints is not None else "str"

    def __len__(self) -> int:
        return int(self.ints.size) if self.ints is not None else int(self.offsets.size - 1)

    @property
    def lengths(self) -> np.ndarray:
        """Byte length of each string id."""
        return np.diff(self.offsets)

    def hash64(self) -> np.ndarray:
        """The 64-bit key: the integer itself (exact) or the string hash (exactness checked later)."""
        if self.ints is not None:
            return self.ints.view(np.uint64)
        return hash_strings(self.blob, self.offsets)

    def take(self, idx: np.ndarray) -> Keys:
        """The sub-batch at positions idx (a boolean mask or integer indices), vectorised."""
        if self.ints is not None:
            return Keys(ints=self.ints[idx])
        return Keys.from_spans(self.blob, self.offsets[:-1][idx], self.lengths[idx])

    @staticmethod
    def from_spans(blob: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> Keys:
        """String ids copied out of blob[starts[i]:starts[i]+lens[i]] into a fresh compact batch."""
        lens = lens.astype(np.int64)
        offsets = np.zeros(lens.size + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        source = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1], dtype=np.int64)
        return Keys(blob=blob[source], offsets=offsets)

    def to_list(self) -> list:
        """Python ints or strs (for callers that want objects; C-level map, no per-id Python code)."""
        if self.ints is not None:
            return self.ints.tolist()
        data = self.blob.tobytes()
        bounds = self.offsets.tolist()
        return list(map(bytes.decode, map(data.__getitem__, map(slice, bounds[:-1], bounds[1:]))))

    @staticmethod
    def empty(kind: KeyType) -> Keys:
        if kind == "int":
            return Keys(ints=np.empty(0, np.int64))
        return Keys(blob=np.empty(0, np.uint8), offsets=np.zeros(1, np.int64))

    @staticmethod
    def concat(parts: Sequence[Keys], kind: KeyType) -> Keys:
        if not parts:
            return Keys.empty(kind)
        if kind == "int":
            return Keys(ints=np.concatenate([p.ints for p in parts]))
        lens = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(lens.size + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        return Keys(blob=np.concatenate([p.blob for p in parts]), offsets=offsets)

    @staticmethod
    def from_strings(ids: Sequence[str | bytes]) -> Keys:
        encoded = list(map(str.encode, ids)) if ids and isinstance(ids[0], str) else list(ids)
        lens = np.fromiter(map(len, encoded), np.int64, len(encoded))
        offsets = np.zeros(lens.size + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), np.uint8)
        return Keys(blob=blob, offsets=offsets).checked()

    def checked(self) -> Keys:
        """Refuse malformed batches early, with a message a caller can act on."""
        if self.ints is not None:
            if self.ints.dtype != np.int64 or self.ints.ndim != 1:
                raise ValueError("integer ids must be a 1-d int64 array")
            return self
        if self.offsets.ndim != 1 or self.offsets.size < 1 or self.offsets[0] != 0:
            raise ValueError("string id offsets must be 1-d and start at 0")
        lens = self.lengths
        if lens.size and (lens.min() < 0 or lens.max() > MAX_KEY_BYTES):
            raise ValueError(f"string ids must be 0..{MAX_KEY_BYTES} bytes long")
        if self.offsets[-1] != self.blob.size:
            raise ValueError("string id offsets do not match the byte buffer")
        return self


IdsLike = Union[Keys, np.ndarray, Sequence[int], Sequence[str], Sequence[bytes]]


def as_keys(ids: IdsLike) -> Keys:
    """Accept what callers naturally have: Keys, an int array, or a list of ints or strings."""
    if isinstance(ids, Keys):
        return ids.checked()
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind in "iu":
            return Keys(ints=np.ascontiguousarray(ids, dtype=np.int64).ravel()).checked()
        return Keys.from_strings(ids.tolist())
    ids = list(ids)
    if not ids:
        return Keys.empty("str")
    if isinstance(ids[0], (str, bytes)):
        return Keys.from_strings(ids)
    return Keys(ints=np.asarray(ids, dtype=np.int64)).checked()
