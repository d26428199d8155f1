"""`--nproc N`: run this very command as N ranks of one data-parallel fit, under torchrun.

The command line is re-executed by `torch.distributed.run --standalone` (a rendezvous on this
host), minus `--nproc`; each copy sees WORLD_SIZE and RANK and its torch family joins the process
group when it fits (`streamrec.trainer.models.neural.distributed`). Only rank 0 prints, writes
artefacts and publishes; the others' stdout is discarded. The exit status is torchrun's: non-zero
when any rank failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from streamrec.trainer.models.neural.training import NeuralRecommender
from streamrec.trainer.ranks import requested


def check_data_parallel(cls: type, nproc: int) -> None:
    """ValueError unless `cls` is a torch family that can be trained data-parallel."""
    if nproc > 1 and not (isinstance(cls, type) and issubclass(cls, NeuralRecommender) and cls.data_parallel):
        raise ValueError(f"--nproc {nproc}: only torch families with independent examples per batch train "
                         f"data-parallel (ncf-*, neumf, wide-deep, deepfm, dcn, dcn-v2, youtube-dnn), not {cls.name!r}")


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` with `--nproc N` / `--nproc=N` removed."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def relaunch(nproc: int) -> int:
    """Run this process's command line as `nproc` ranks; returns torchrun's exit status."""
    script = Path(sys.argv[0])
    if not (script.is_file() and os.access(script, os.X_OK)):
        raise ValueError("--nproc re-runs the `streamrec` command: start it as `streamrec ...`")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--no-python", str(script), *without_nproc(sys.argv[1:])]
    return subprocess.run(command, check=False).returncode


def quiet_unless_primary() -> None:
    """In a rank other than 0, discard stdout: the command's JSON comes from rank 0 alone."""
    if requested() and os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
