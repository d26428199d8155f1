"""Which rank of a data-parallel fit this process is, without importing torch.

`refit` and `launch` ask this of every fit, and the `streamrec` console script imports them to
register its commands: importing torch for the answer cost every command ~2.5 s of start-up
(`streamrec --help` took 6 s). A process group only exists once torch.distributed has been
imported and initialised (`models.neural.distributed.join`), so a process that never imported it
is the only rank.
"""

from __future__ import annotations

import os
import sys


def requested() -> bool:
    """Whether this process was started as one of several ranks (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> tuple[int, int]:
    """(rank, number of ranks); (0, 1) outside a process group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_primary() -> bool:
    """Rank 0, or the only process: the one that writes artefacts, publishes and prints."""
    return world()[0] == 0
