"""Small helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this folder is on
sys.path): how much CPU other processes took during a measurement, and plain-text tables."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from typing import Any


class OtherLoad:
    """CPU used by other processes while active, in cores on average: the machine's busy CPU time (/proc/stat)
    minus this process's and its reaped children's (DataLoader workers, memory children), over the wall time."""

    cores = 0.0

    def __enter__(self) -> OtherLoad:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._sample()
        self.cores = max(0.0, (busy1 - busy0 - (ours1 - ours0)) / max(t1 - t0, 1e-9))

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return time.perf_counter(), busy, sum(u.ru_utime + u.ru_stime for u in usage)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
