"""Which shard holds an id: rendezvous (highest-random-weight) hashing, so shard counts can change.

Every shard s draws a score for every id, mix64(key64 ^ seed_s), and the id lives on the shard with
the highest score. key64 is the integer id or the string id's 64-bit hash (`Keys.hash64`), so the
placement depends only on the id and the shard count: the same in every process and across restarts.

Why not `hash % n`: going from n to n + 1 shards moves an id only when the new shard outbids the
others, about 1/(n + 1) of the ids, where a modulo moves about n/(n + 1) of them. That is what makes
`streamrec param-server reshard` cheap to reason about (it reports the fraction moved), and adding a
shard no longer reshuffles nearly every row. The cost is one mix per shard and id instead of one in
all, vectorised over the batch (a loop over shards, never over ids).

`ROUTING` names the scheme in checkpoints: a multi-shard checkpoint laid out under another scheme
(the modulo of earlier releases) would answer pulls for ids it does not hold, so it is refused at
start with a pointer to `reshard`, which re-lays any checkpoint out under this scheme.
"""

from __future__ import annotations

import numpy as np

from streamrec.param_server.keys import IdsLike, as_keys, mix64

ROUTING = "rendezvous-v1"
_SALT = np.uint64(0x5BD1E9955BD1E995)


def _seeds(num_shards: int) -> np.ndarray:
    """One 64-bit seed per shard, fixed forever: shard s keeps its seed whatever the shard count."""
    return mix64(np.arange(num_shards, dtype=np.uint64) ^ _SALT)


def shard_of(ids: IdsLike, num_shards: int) -> np.ndarray:
    """The shard of each id, int64 in [0, num_shards)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    key64 = as_keys(ids).hash64()
    shards = np.zeros(key64.shape, np.int64)
    if num_shards == 1:
        return shards
    seeds = _seeds(num_shards)
    best = mix64(key64 ^ seeds[0], in_place=True)
    for shard in range(1, num_shards):
        score = mix64(key64 ^ seeds[shard], in_place=True)
        won = score > best
        shards[won] = shard
        np.maximum(best, score, out=best)
    return shards
