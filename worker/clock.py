"""Time as the worker sees it: wall time, a monotonic clock and sleeping, behind one seam.

The loop and its units take a ``Clock`` instead of calling ``time`` themselves, so the fault
simulator (tests/sim) runs the real worker on simulated time: a backoff or a TTL passes in
microseconds, and a seed replays exactly. Stage timings for metrics stay on ``perf_counter``.
"""

from __future__ import annotations

import time as _time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (record timestamps, TTLs)."""
    def monotonic(self) -> float:
        """Seconds for intervals (commit interval, idle exit, progress)."""
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    time = staticmethod(_time.time)
    monotonic = staticmethod(_time.monotonic)
    sleep = staticmethod(_time.sleep)


SYSTEM_CLOCK = SystemClock()
