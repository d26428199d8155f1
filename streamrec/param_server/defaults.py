"""Defaults shared by the server and its command line (a module without heavy imports, so that
`streamrec --help` does not load numpy to show them)."""

# Rows per table and shard unless create_table (or the server's --max-rows) says otherwise: 4M rows
# of a 64-dim Adagrad table are ~2.3 GB; only the pages of rows in use are ever committed.
DEFAULT_MAX_ROWS = 1 << 22
DEFAULT_CHECKPOINT_EVERY = 10.0  # seconds: the most a crash loses, which the trainer then replays
DEFAULT_KEEP_CHECKPOINTS = 3  # newest kept; a checkpoint that fails to load falls back to the next
