"""The wire format: length-prefixed frames of a small JSON header plus raw numpy buffers.

  frame  = prefix | header | body
  prefix = struct "<4sIQ": magic b"SRP1", header length (u32), body length (u64)
  header = UTF-8 JSON object: the operation and its scalar arguments, and "arrays":
           [[name, dtype, shape, offset], ...] describing the body
  body   = the arrays' raw C-contiguous bytes, each at an 8-byte aligned offset

Vectors and ids never go through JSON: they are the body, sent with one scatter-gather sendmsg
and read with recv_into straight into the buffer numpy then views without copying.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from streamrec.param_server.keys import Keys

MAGIC = b"SRP1"
PREFIX = struct.Struct("<4sIQ")
MAX_HEADER_BYTES = 16 << 20
MAX_BODY_BYTES = 4 << 30
ALLOWED_DTYPES = {"<f4", "<f8", "<i4", "<i8", "<u4", "<u8", "|u1", "|b1"}


class ProtocolError(ConnectionError):
    """The peer sent something that is not a valid frame; the connection is dropped."""


@dataclass
class Message:
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _pad(n: int) -> int:
    return (8 - n % 8) % 8


def raw_bytes(array: np.ndarray) -> memoryview:
    """The array's bytes, C order, as a flat memoryview (copying only if it is not contiguous)."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def send(sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
    """Write one frame with a single gathered send where the kernel accepts it all."""
    buffers: list[memoryview] = []
    layout, offset = [], 0
    for name, array in (arrays or {}).items():
        array = np.ascontiguousarray(array)
        layout.append([name, array.dtype.str, list(array.shape), offset])
        buffers.append(raw_bytes(array))
        pad = _pad(array.nbytes)
        if pad:
            buffers.append(memoryview(b"\0" * pad))
        offset += array.nbytes + pad
    head = orjson.dumps({**header, "arrays": layout}, option=orjson.OPT_SERIALIZE_NUMPY)
    pending = [memoryview(PREFIX.pack(MAGIC, len(head), offset) + head)] + [b for b in buffers if b.nbytes]
    while pending:
        sent = sock.sendmsg(pending[:512])
        while pending and sent >= pending[0].nbytes:
            sent -= pending.pop(0).nbytes
        if sent:
            pending[0] = pending[0][sent:]


def _recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ConnectionError("connection closed in the middle of a frame")
        got += n
    return buffer


def recv(sock: socket.socket) -> Message | None:
    """Read one frame; None if the peer closed the connection cleanly between frames."""
    prefix = _recv_exact(sock, PREFIX.size)
    if prefix is None:
        return None
    magic, head_len, body_len = PREFIX.unpack(prefix)
    if magic != MAGIC or head_len > MAX_HEADER_BYTES or body_len > MAX_BODY_BYTES:
        raise ProtocolError("bad frame prefix (not a param-server peer, or a frame over the size limit)")
    head = _recv_exact(sock, head_len) or b""
    body = _recv_exact(sock, body_len) if body_len else bytearray()
    if len(head) != head_len or body is None:
        raise ConnectionError("connection closed in the middle of a frame")
    try:
        header = orjson.loads(head)
        arrays = {}
        for name, dtype, shape, offset in header.pop("arrays"):
            if dtype not in ALLOWED_DTYPES:
                raise ProtocolError(f"array {name!r} has a disallowed dtype {dtype}")
            arrays[name] = view_array(body, dtype, shape, offset)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed frame header: {exc}") from exc
    return Message(header, arrays)


def view_array(buffer: bytes | bytearray, dtype: str, shape: list[int], offset: int) -> np.ndarray:
    """A zero-copy view of `shape` elements at `offset` (ValueError if it does not fit)."""
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(buffer, dtype, count, offset).reshape(shape)


def keys_arrays(keys: Keys, name: str = "ids") -> dict[str, np.ndarray]:
    if keys.ints is not None:
        return {name: keys.ints}
    return {f"{name}.blob": keys.blob, f"{name}.offsets": keys.offsets}


def keys_from(arrays: dict[str, np.ndarray], name: str = "ids") -> Keys:
    if name in arrays:
        return Keys(ints=arrays[name]).checked()
    try:
        return Keys(blob=arrays[f"{name}.blob"], offsets=arrays[f"{name}.offsets"]).checked()
    except KeyError:
        raise ValueError(f"request has no {name!r} ids") from None
