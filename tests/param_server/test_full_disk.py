"""A parameter server whose checkpoint disk fills up, on a real filesystem that runs out of
space (a 2 MiB tmpfs: the kernel's own ENOSPC, no fault injected in Python). A failed write
leaves no partial file behind, the server keeps serving, and a SIGTERM whose final checkpoint
cannot be written exits non-zero with one line that says what survives, not a traceback."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamrec.param_server.client import ParamClient, ParamServerError
from tests.param_server.conftest import StartServer


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def leftovers(disk: Path) -> list[str]:
    return sorted(path.name for path in disk.rglob("*.tmp"))


def test_a_full_disk_leaves_no_partial_checkpoint_and_the_exit_says_what_survives(
        start_server: StartServer, small_disk: Path) -> None:
    server = start_server("--checkpoint-dir", str(small_disk), "--checkpoint-every", "0")
    rng = np.random.default_rng(0)
    with ParamClient([server.address], retries=0) as client:
        client.create_table("users", 32)
        client.assign("users", [f"u:{i}" for i in range(500)], rng.normal(size=(500, 32)).astype(np.float32))
        first = client.checkpoint()  # about 100 kB: fits
        many = [f"user:{i}:" + "x" * 200 for i in range(20_000)]  # ~7 MB of rows and ids: does not
        client.assign("users", many, rng.normal(size=(len(many), 32)).astype(np.float32))
        with pytest.raises(ParamServerError) as failed:
            client.checkpoint()
        assert "No space left on device" in str(failed.value)
        assert leftovers(small_disk) == []  # the partial file is gone: the space is free again
        assert client.pull("users", many[-3:]).found.all()  # still serving
    server.proc.terminate()
    _, err = server.proc.communicate(timeout=60)
    assert server.proc.returncode == 1
    assert "final checkpoint failed" in err and "Traceback" not in err, err
    assert leftovers(small_disk) == []
    restarted = start_server("--checkpoint-dir", str(small_disk), "--checkpoint-every", "0")
    assert restarted.ready["restored"] == first[0]["path"]
    with ParamClient([restarted.address], retries=0) as client:
        assert client.pull("users", ["u:0", "u:499"]).found.all()
        assert not client.pull("users", many[:1]).found.any()  # what the disk could not take is not there
