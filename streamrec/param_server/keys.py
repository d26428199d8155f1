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
MAX_KEY_BYTES = 1024  # longer string ids are refused

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
STRING_SEED = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on uint64 that spreads every input bit over the output.
    `in_place`: x is a uint64 array the caller gives up (saves a copy of large inputs)."""
    x = x if in_place else np.asarray(x).astype(np.uint64)
    shifted = np.empty_like(x)
    x ^= np.right_shift(x, _S30, out=shifted)
    x *= _M1
    x ^= np.right_shift(x, _S27, out=shifted)
    x *= _M2
    x ^= np.right_shift(x, _S31, out=shifted)
    return x


def ragged_index(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat positions starts[i] + 0..counts[i]-1 for every i, in order (one repeat, no Python loop)."""
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(int(ends[-1]) if ends.size else 0, dtype=np.int64)


@dataclass(frozen=True)
class KeyWords:
    """String ids as little-endian 8-byte words: each id zero-padded to whole words, the ids laid end
    to end (ragged: a batch's one long id does not pad the others).

    Why words: hashing and exact comparison then touch one uint64 per 8 bytes of id, and a table's
    key arena stores ids in this same form, so checking that a 64-bit hash match is the same id is
    a word-by-word compare of two flat arrays.
    """

    words: np.ndarray  # uint64, every id's words
    starts: np.ndarray  # int64, first word of each id
    counts: np.ndarray  # int64, words of each id
    lengths: np.ndarray  # int64, bytes of each id

    def __len__(self) -> int:
        return int(self.lengths.size)

    @staticmethod
    def of(blob: np.ndarray, offsets: np.ndarray) -> KeyWords:
        """The words of blob[offsets[i]:offsets[i+1]] for every i."""
        lengths = np.diff(offsets).astype(np.int64)
        counts = (lengths + 7) >> 3
        starts = np.cumsum(counts) - counts
        padded = np.zeros(8 * int(counts.sum()), np.uint8)
        padded[ragged_index(8 * starts, lengths)] = blob[offsets[0] : offsets[-1]]  # the ids lie end to end
        return KeyWords(padded.view(np.uint64), starts, counts, lengths)

    def take(self, idx: np.ndarray) -> KeyWords:
        """The ids at positions idx, compacted."""
        counts = self.counts[idx]
        return KeyWords(self.words[ragged_index(self.starts[idx], counts)], np.cumsum(counts) - counts, counts, self.lengths[idx])

    def hash64(self) -> np.ndarray:
        """A 64-bit hash per id: the length, then each of its words, chained through mix64.

        Loops over word positions (a handful per id), never over ids; the ids still active at a
        position shrink as the short ones finish, so the work is one mix per word.
        """
        h = mix64(self.lengths.astype(np.uint64) ^ STRING_SEED)
        active = np.flatnonzero(self.counts > 0)
        position = 0
        while active.size:
            if active.size == h.size:  # every id has this word: no fancy indexing
                h = mix64(h ^ self.words[self.starts + position])
            else:
                h[active] = mix64(h[active] ^ self.words[self.starts[active] + position])
            position += 1
            active = active[self.counts[active] > position]
        return h

    def equal(self, positions: np.ndarray, arena: np.ndarray, stored_starts: np.ndarray, stored_lengths: np.ndarray) -> np.ndarray:
        """Whether the id at each of `positions` equals the id stored at arena[stored_starts[i]:]
        (in words) with byte length stored_lengths[i]: same length, then every word the same."""
        same = self.lengths[positions] == stored_lengths
        candidates = np.flatnonzero(same)
        counts = self.counts[positions[candidates]]
        owner = np.repeat(np.arange(candidates.size), counts)
        step = np.arange(owner.size, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        incoming = self.words[self.starts[positions[candidates]][owner] + step]
        stored = arena[stored_starts[candidates][owner] + step]
        same[candidates[owner[incoming != stored]]] = False
        return same


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
        return self.words().hash64()

    def words(self) -> KeyWords:
        """String ids as words (hashing, exact comparison, a table's key arena)."""
        return KeyWords.of(self.blob, self.offsets)

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
        if self.offsets.dtype != np.int64 or self.blob.dtype != np.uint8:
            raise ValueError("string ids must be a uint8 byte buffer with int64 offsets")
        if self.offsets.ndim != 1 or self.offsets.size < 1 or self.offsets[0] != 0:
            raise ValueError("string id offsets must be 1-d and start at 0")
        lens = self.lengths
        if lens.size and (lens.min() < 0 or lens.max() > MAX_KEY_BYTES):
            raise ValueError(f"string ids must be 0..{MAX_KEY_BYTES} bytes long")
        if self.offsets[-1] != self.blob.size:
            raise ValueError("string id offsets do not match the byte buffer")
        return self

    def checked_utf8(self) -> Keys:
        """`checked`, and every string id valid UTF-8: what a server asks of ids from the wire.
        An id that is not was stored, and every reader decoding the table's ids (a serving
        worker's delta, `to_list`) failed on it from then on. The buffer must decode as a whole
        and no non-empty id may start inside a character (on a continuation byte), which a
        split between two ids of a valid buffer would."""
        self.checked()
        if self.ints is not None or not self.blob.size:
            return self
        try:
            self.blob.tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"string ids must be valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        starts = self.offsets[:-1][self.lengths > 0]
        if ((self.blob[starts] & 0xC0) == 0x80).any():
            raise ValueError("string ids must be valid UTF-8 (an id starts inside a character)")
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
