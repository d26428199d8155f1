"""streamrec.core.procstat against real processes (what `bench soak` and `bench pipeline` read)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from streamrec.core.procstat import cpu_seconds, machine_busy_seconds, rss_bytes


def test_a_busy_child_has_cpu_time_and_memory_and_a_gone_one_has_none(tmp_path: Path) -> None:
    busy_before = machine_busy_seconds()
    # a command name with spaces and parentheses: /proc/<pid>/stat's second field must not shift the others
    odd = tmp_path / "py (x) y"
    os.symlink(sys.executable, odd)
    child = subprocess.Popen([str(odd), "-c", "import sys, time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass\nsys.stdin.read()"],
                             stdin=subprocess.PIPE, text=True)
    assert ") y)" in Path(f"/proc/{child.pid}/stat").read_text()
    try:
        while (used := cpu_seconds(child.pid)) is not None and used < 0.5:
            pass
        assert used is not None and 0.5 <= used < 5
        assert rss_bytes(child.pid) > 1 << 20
    finally:
        child.communicate("")
    assert cpu_seconds(child.pid) is None and rss_bytes(child.pid) == 0
    assert machine_busy_seconds() - busy_before >= 0.4  # the child's half second, at the least
