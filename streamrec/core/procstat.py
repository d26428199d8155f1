"""What Linux says about another process (/proc): its memory and CPU time, for the benchmarks that
watch the pipeline's processes from outside (`bench soak`, `bench pipeline`)."""

from __future__ import annotations

import os
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds the process has used (all its threads), None once it is gone.
    The command name (field 2) may hold spaces and parentheses: the fields after it are counted
    from its last ')'."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot, summed over its cores (every state of
    /proc/stat's first line but idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS
