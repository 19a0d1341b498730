"""What one call costs, measured in the test's own process: wall time, peak RSS growth and
tracemalloc's peak. Shared by the tests that bound a crafted input's cost (artifacts, the
Keras import, the active-session window).

Peak RSS: Linux keeps the process's high-water mark (VmHWM), and writing 5 to
/proc/self/clear_refs resets it to the current RSS, so the mark after the call is the call's
own peak. Where that file cannot be written, a thread samples VmRSS every millisecond.
tracemalloc sees Python's and numpy's allocations but not torch's or other C++ libraries'."""

from __future__ import annotations

import re
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

MB = 1 << 20


@dataclass
class Cost:
    seconds: float
    rss_growth: int  # bytes: the peak RSS during the call minus the RSS before it
    traced_peak: int  # bytes: tracemalloc's peak during the call
    error: BaseException | None
    result: object = None

    def __str__(self) -> str:
        return (f"{self.seconds * 1000:.1f} ms, peak RSS +{self.rss_growth / MB:.1f} MB, "
                f"traced peak {self.traced_peak / MB:.1f} MB, "
                f"{type(self.error).__name__ if self.error else 'no error'}")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], object], trace: bool = True) -> Cost:
    """Run ``fn`` once; an exception it raises is returned, not raised."""
    before = _status("VmRSS")
    exact = _reset_peak()
    sampled = [before]
    done = threading.Event()
    if not exact:
        def sample() -> None:
            while not done.wait(0.001):
                sampled.append(_status("VmRSS"))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    if trace:
        tracemalloc.start()
    error, result = None, None
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - the caller asserts on it
        error = e
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1] if trace else 0
    if trace:
        tracemalloc.stop()
    if exact:
        peak = _status("VmHWM")
    else:
        done.set()
        sampler.join()
        peak = max(sampled + [_status("VmRSS")])
    return Cost(seconds, max(0, peak - before), traced, error, result)
