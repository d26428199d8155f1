"""Keys derived from the shared token, and the digests that seal what the server writes or serves.

Why keyed: a plain SHA-256 only catches corruption; anyone who can write the checkpoint directory
(or talk to the server) can recompute it. With a token configured, checkpoints carry an
HMAC-SHA256 under a key derived from the token, so a crafted file is refused; without one they keep
the plain SHA-256. Each use has its own derived key, so a MAC made for one can never pass as another.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol

CHECKPOINT_CONTEXT = b"streamrec-checkpoint"
BLOB_CONTEXT = b"streamrec-blob"
MAC_BYTES = 32


def derived_key(token: str, context: bytes) -> bytes:
    return hmac.new(token.encode(), context, hashlib.sha256).digest()


class Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


def hasher(key: bytes | None) -> Digest:
    """A streaming digest: HMAC-SHA256 under `key`, or plain SHA-256 when there is none."""
    return hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()


def blob_mac(key: bytes, name: str, data: bytes) -> bytes:
    """The MAC of a blob's name and bytes (the name is bound in, so blobs cannot be swapped)."""
    encoded = name.encode()
    return hmac.new(key, len(encoded).to_bytes(4, "little") + encoded + data, hashlib.sha256).digest()


def key_id(key: bytes | None) -> str:
    """A public name of a signing key (or "none"), written in each checkpoint's header: a shard can
    tell, from a file's header alone, that another key signed it, and must not prune it. It is an
    HMAC of a fixed text under the key, so it tells nothing of the key."""
    return "none" if key is None else hmac.new(key, b"streamrec-key-id", hashlib.sha256).hexdigest()[:16]
