"""Defaults shared by the server and its command line (a module without heavy imports, so that
`streamrec --help` does not load numpy to show them)."""

# Rows per table and shard unless create_table (or the server's --max-rows) says otherwise: 4M rows
# of a 64-dim Adagrad table are ~2.3 GB; only the pages of rows in use are ever committed.
DEFAULT_MAX_ROWS = 1 << 22
DEFAULT_CHECKPOINT_EVERY = 10.0  # seconds: the most a crash loses, which the trainer then replays
DEFAULT_KEEP_CHECKPOINTS = 3  # newest kept; a checkpoint that fails to load falls back to the next
# one row's update in one push (its gradients summed over repeats of its id), per value: far beyond
# any learning step, and small enough that neither a sum nor Adagrad's square of it overflows float32
# (3.4e38): 3e38 pushed twice for one id wrote -inf, 2e19 once froze an Adagrad row at an infinite
# accumulator, and both rows were then served and checkpointed
MAX_UPDATE = 1e15
MAX_EVENTS_PER_PUSH = 10**9  # events (or one item's count) one push may credit: more is a bug or an attack
MAX_CLOCK_SKEW = 86400.0  # seconds an event time may lie in the future (it drives the TTL clock forward)
# what a shard lets its peers use (ServerLimits, docs/param_server.md "Limits")
DEFAULT_MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_BODY_BYTES = 256 << 20
DEFAULT_BYTE_BUDGET = 512 << 20  # header + body bytes of frames in flight, over all connections
DEFAULT_MAX_CONNECTIONS = 256  # authenticated
DEFAULT_MAX_UNAUTHENTICATED = 16  # still to send their hello frame
DEFAULT_AUTH_TIMEOUT = 5.0  # seconds from accept to a complete hello frame
DEFAULT_IDLE_TIMEOUT = 600.0  # seconds without a byte from an authenticated peer
DEFAULT_BUDGET_WAIT = 5.0  # seconds a frame waits for room in the byte budget before it is refused
# the rest of a frame must follow its prefix within this many seconds plus one per MIN_FRAME_RATE
# bytes received (FramePace): a stalled peer is cut before the frames waiting for its budget give up
DEFAULT_FRAME_GRACE = 3.0
DEFAULT_MIN_FRAME_RATE = 4 << 20  # bytes per second: 32 Mbit/s, a 256 MiB frame in about a minute
