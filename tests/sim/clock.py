"""Simulated time: the worker's ``Clock`` (worker/clock.py) over a number the simulation moves.

Sleeping advances simulated time instead of waiting, so a backoff or a TTL passes in
microseconds and a run replays exactly. Each worker sees it through a hooked wrapper
(tests/sim/run.py), so that a sleep is an effect boundary too.
"""

from __future__ import annotations

EPOCH = 1_700_000_000.0  # simulated wall time at t = 0


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0  # seconds since the start of the run

    def time(self) -> float:
        return EPOCH + self.now

    def monotonic(self) -> float:
        return 1000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)


def wall_ms(t: float) -> int:
    """The record timestamp (wall milliseconds) of simulated time ``t``."""
    return round((EPOCH + t) * 1000)
