"""The wire format: length-prefixed frames of a small JSON header plus raw numpy buffers.

  frame  = prefix | header | body
  prefix = struct "<4sIQ": magic b"SRP2" (the protocol version), header length (u32), body length (u64)
  header = UTF-8 JSON object: the operation and its scalar arguments, and "arrays":
           [[name, dtype, shape, offset], ...] describing the body
  body   = the arrays' raw C-contiguous bytes, each at an 8-byte aligned offset

Vectors and ids never go through JSON: they are the body, sent with one scatter-gather sendmsg
and read with recv_into straight into the buffer numpy then views without copying.

Reading is hostile-peer safe: the prefix is checked against `FrameLimits` before anything is
allocated, the bytes of header and body are reserved from a `ByteBudget` shared by all connections
(never allocated beyond it), and a body larger than `DIRECT_BODY_BYTES` grows chunk by chunk, so
memory follows the bytes actually received rather than the length a peer announces.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from streamrec.param_server.defaults import (
    DEFAULT_FRAME_GRACE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MIN_FRAME_RATE,
)
from streamrec.param_server.keys import Keys

MAGIC = b"SRP2"
OLD_MAGICS = (b"SRP1",)
PREFIX = struct.Struct("<4sIQ")
HELLO_MAX_HEADER_BYTES = 4096  # the first frame of a connection: hello (+ token), no body
DIRECT_BODY_BYTES = 4 << 20  # bodies up to this are allocated at once; larger ones grow per chunk
CHUNK_BYTES = 1 << 20
ALLOWED_DTYPES = {"<f4", "<f8", "<i4", "<i8", "<u4", "<u8", "|u1", "|b1"}


class ProtocolError(ConnectionError):
    """The peer sent something that is not a valid frame; the connection is dropped."""


class MalformedFrame(ProtocolError):
    """A whole frame read whose header is no request (not JSON, not an object, bad arrays): the
    stream is still in step, so the server can say why before it closes the connection."""


class FrameRefused(ProtocolError):
    """A well-formed prefix the server will not read (over a cap or over the byte budget); the
    server tells the peer why, then drops the connection (the unread body cannot be skipped)."""


@dataclass(frozen=True)
class FrameLimits:
    max_header: int = DEFAULT_MAX_HEADER_BYTES
    max_body: int = DEFAULT_MAX_BODY_BYTES


HELLO_LIMITS = FrameLimits(HELLO_MAX_HEADER_BYTES, 0)


@dataclass(frozen=True)
class FramePace:
    """How fast the rest of a frame must follow its prefix: each read must return within `grace`
    seconds of the prefix plus 1/`min_rate` seconds per byte of the frame received so far. The
    budget reserves a frame's announced bytes before they arrive, so without a pace a peer that
    announced a large frame and then sent nothing (or a byte now and then, each resetting the idle
    timeout) held that share of the budget for as long as it liked, and two of them held all of
    it. Now a stalled peer is cut within `grace` seconds, sooner than a frame waiting for room
    gives up (`budget_wait`), and holding bytes takes sending them at `min_rate` at least."""

    grace: float = DEFAULT_FRAME_GRACE
    min_rate: float = DEFAULT_MIN_FRAME_RATE  # bytes per second

    def __post_init__(self) -> None:
        if self.grace <= 0 or self.min_rate <= 0:
            raise ValueError("a frame's grace and minimum rate must be positive")


class _Due:
    """When the next read (or send) of one frame must have returned: a fixed deadline, a pace's
    rolling one (which moves with the bytes moved so far, `received`), the earlier of both, or
    none (the socket's own timeout)."""

    def __init__(self, deadline: float | None = None, pace: FramePace | None = None) -> None:
        self.deadline, self.pace = deadline, pace
        self.started, self.received = time.monotonic(), 0

    def arm(self, sock: socket.socket) -> None:
        due = self.deadline
        if self.pace is not None:
            paced = self.started + self.pace.grace + self.received / self.pace.min_rate
            due = paced if due is None else min(due, paced)
        if due is None:
            return
        left = due - time.monotonic()
        if left <= 0:
            raise TimeoutError("the frame did not arrive in time (deadline or minimum rate)")
        sock.settimeout(left)


class ByteBudget:
    """Bytes of frames in flight across every connection of a server. A frame reserves its header
    and body before any of it is allocated and releases them once answered; a frame that does not
    fit waits up to `wait` seconds for others to finish, then is refused."""

    def __init__(self, capacity: int, wait: float = 5.0):
        if capacity < 1:
            raise ValueError("the byte budget must be positive")
        self.capacity, self.wait, self.used = capacity, wait, 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        if n > self.capacity:
            raise FrameRefused(f"a frame of {n} bytes exceeds the server's byte budget of {self.capacity}")
        deadline = time.monotonic() + self.wait
        with self._cond:
            while self.used + n > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FrameRefused(f"server busy: {self.used} of {self.capacity} bytes in flight, no room for {n}")
                self._cond.wait(left)
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


@dataclass
class Message:
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    reserved: int = 0  # bytes held in the budget until the message is answered


def _pad(n: int) -> int:
    return (8 - n % 8) % 8


def raw_bytes(array: np.ndarray) -> memoryview:
    """The array's bytes, C order, as a flat memoryview (copying only if it is not contiguous)."""
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> list[memoryview]:
    """One frame as buffers, prefix and header first: what `send` writes (no copy of the arrays)."""
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
    return [memoryview(PREFIX.pack(MAGIC, len(head), offset) + head)] + [b for b in buffers if b.nbytes]


def send(sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
         pace: FramePace | None = None) -> None:
    """Write one frame with a single gathered send where the kernel accepts it all; with `pace`,
    the peer must take the bytes that fast (TimeoutError otherwise, the socket's timeout left as
    the last send set it): a reply is held in memory until the peer has read it."""
    pending = encode(header, arrays)
    due = _Due(None, pace)
    while pending:
        due.arm(sock)
        sent = sock.sendmsg(pending[:512])
        due.received += sent
        while pending and sent >= pending[0].nbytes:
            sent -= pending.pop(0).nbytes
        if sent:
            pending[0] = pending[0][sent:]


def _recv_exact(sock: socket.socket, size: int, due: _Due) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        due.arm(sock)
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ConnectionError("connection closed in the middle of a frame")
        got += n
        due.received += n
    return buffer


def _recv_growing(sock: socket.socket, size: int, due: _Due) -> bytearray:
    """`size` bytes, the buffer growing with what arrives (a peer that announces much and sends
    little costs only what it sent)."""
    body = bytearray()
    while len(body) < size:
        due.arm(sock)
        chunk = sock.recv(min(CHUNK_BYTES, size - len(body)))
        if not chunk:
            raise ConnectionError("connection closed in the middle of a frame")
        body += chunk
        due.received += len(chunk)
    return body


def read_prefix(sock: socket.socket, limits: FrameLimits, deadline: float | None = None) -> tuple[int, int] | None:
    """(header length, body length) of the next frame, checked against `limits`; None if the peer
    closed the connection cleanly between frames. FrameRefused for a frame over the caps."""
    prefix = _recv_exact(sock, PREFIX.size, _Due(deadline))
    if prefix is None:
        return None
    magic, head_len, body_len = PREFIX.unpack(prefix)
    if magic in OLD_MAGICS:
        raise FrameRefused(f"protocol {magic.decode()} is no longer spoken: upgrade the client to {MAGIC.decode()}")
    if magic != MAGIC:
        raise ProtocolError("bad frame prefix (not a param-server peer)")
    if head_len > limits.max_header or body_len > limits.max_body:
        raise FrameRefused(
            f"frame of {head_len} header and {body_len} body bytes is over the limits "
            f"({limits.max_header} and {limits.max_body})"
        )
    return head_len, body_len


def read_frame(sock: socket.socket, head_len: int, body_len: int, deadline: float | None = None,
               direct: int = DIRECT_BODY_BYTES, pace: FramePace | None = None) -> Message:
    """The header and body announced by a prefix (already checked and reserved by the caller),
    by `deadline` and at `pace` where given (TimeoutError otherwise). The socket's timeout is
    left as the last read set it: a caller that paces restores its own."""
    due = _Due(deadline, pace)
    head = _recv_exact(sock, head_len, due) or b""
    if len(head) != head_len:
        raise ConnectionError("connection closed in the middle of a frame")
    if body_len <= direct:
        body = _recv_exact(sock, body_len, due) if body_len else bytearray()
    else:
        body = _recv_growing(sock, body_len, due)
    if body is None:
        raise ConnectionError("connection closed in the middle of a frame")
    return parse(head, body)


def parse(head: bytes | bytearray, body: bytearray) -> Message:
    """The message of a header and body; ProtocolError for anything malformed."""
    try:
        header = orjson.loads(head)
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        arrays = {}
        for name, dtype, shape, offset in header.pop("arrays", []):
            if not isinstance(name, str) or dtype not in ALLOWED_DTYPES:
                raise ValueError(f"array {name!r} has a bad name or a disallowed dtype {dtype!r}")
            if name in arrays:  # the later one silently won
                raise ValueError(f"array {name!r} is described twice")
            arrays[name] = view_array(body, dtype, shape, offset)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MalformedFrame(f"malformed frame header: {exc}") from exc
    return Message(header, arrays)


def recv(sock: socket.socket, limits: FrameLimits | None = None) -> Message | None:
    """Read one frame from a trusted peer (the client reading its server's replies: no caps unless
    given); None if the peer closed the connection cleanly between frames."""
    sizes = read_prefix(sock, limits or TRUSTED_LIMITS)
    if sizes is None:
        return None
    return read_frame(sock, *sizes, direct=sizes[1])


TRUSTED_LIMITS = FrameLimits(1 << 31, 1 << 62)


def view_array(buffer: bytes | bytearray, dtype: str, shape: list[int], offset: int) -> np.ndarray:
    """A zero-copy view of `shape` elements at `offset` (ValueError if it does not fit)."""
    if not isinstance(shape, list) or not all(isinstance(n, int) and 0 <= n < 2**40 for n in shape):
        raise ValueError(f"bad array shape {shape!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"bad array offset {offset!r}")
    count = 1
    for n in shape:
        count *= n
    if offset + count * np.dtype(dtype).itemsize > len(buffer):
        raise ValueError(f"array of shape {shape} at offset {offset} runs past the {len(buffer)}-byte body")
    if count == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(buffer, dtype, count, offset).reshape(shape)


def keys_arrays(keys: Keys, name: str = "ids") -> dict[str, np.ndarray]:
    if keys.ints is not None:
        return {name: keys.ints}
    return {f"{name}.blob": keys.blob, f"{name}.offsets": keys.offsets}


def keys_from(arrays: dict[str, np.ndarray], name: str = "ids") -> Keys:
    """The ids of a request, checked as ids from a peer (`Keys.checked_utf8`)."""
    if name in arrays:
        return Keys(ints=arrays[name]).checked()
    try:
        return Keys(blob=arrays[f"{name}.blob"], offsets=arrays[f"{name}.offsets"]).checked_utf8()
    except KeyError:
        raise ValueError(f"request has no {name!r} ids") from None
