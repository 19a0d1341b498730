"""Retrying calls to a dependency: backoff that doubles up to a cap, counted and logged.

Adapters raise ``DependencyError`` for what may heal (a refused connection, a timeout); the
loop's units call them through one ``Retrier``, which waits and tries again until the call
succeeds or the worker is asked to stop (then ``ShutdownRequested`` unwinds the batch in
hand, uncommitted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from .clock import Clock
from .config import RetrySettings
from .errors import DependencyError, ShutdownRequested
from .metrics import Metrics

log = logging.getLogger("worker.loop")

T = TypeVar("T")


class Retrier:
    def __init__(self, settings: RetrySettings, metrics: Metrics, clock: Clock) -> None:
        self.settings, self.metrics, self.clock = settings, metrics, clock
        self.stopping = False  # set by Worker.stop: the next backoff gives up

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried with backoff while it raises DependencyError."""
        backoff = self.settings.initial_backoff_s
        while True:
            try:
                return fn()
            except DependencyError as e:
                self.wait(e, backoff)
                backoff = self.next_backoff(backoff)

    def next_backoff(self, seconds: float) -> float:
        return min(seconds * 2, self.settings.max_backoff_s)

    def wait(self, e: DependencyError, seconds: float) -> None:
        """Count and log ``e``, then sleep ``seconds`` (or give up when stopping)."""
        self.metrics.retries.labels(e.dependency).inc()
        log.warning("%s; retrying in %.2fs", e, seconds)
        if self.stopping:
            raise ShutdownRequested() from e
        self.clock.sleep(seconds)
