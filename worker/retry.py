"""Retrying calls to a dependency: backoff that doubles up to a cap, counted and logged, and
the two ways out of it.

Adapters raise ``DependencyError``; the loop's units call them through one ``Retrier``.

* What may heal (a refused connection, a timeout) is retried until it succeeds. Each dependency's
  state is kept by ``worker.health.DependencyHealth``: one log line when it goes down, one when
  it is back and for how long it was gone; ``gru_dependency_up``.
* What cannot heal (a wrong password, a missing ACL, an unknown host; ``worker.failures``)
  raises ``PermanentFailure`` at once: the worker leaves the group and exits 2, naming the
  dependency, its address and the setting to check.
* A retry gives up when the worker has held partitions with input waiting and advanced none
  of them for ``retry.release_after_s``: ``Stalled``, the worker leaves the group and exits 3
  so a healthy member takes over (``worker.health.Progress``).
* While it waits, the consumer lag is refreshed from the broker (``on_wait``), so that an
  outage shows as growing lag, and a stop request ends it (``ShutdownRequested``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

from .clock import Clock
from .config import RetrySettings
from .errors import DependencyError, ShutdownRequested, Stalled
from .failures import PermanentFailure, classify, kafka_hosts
from .health import DependencyHealth, Progress
from .metrics import Metrics

log = logging.getLogger("worker.loop")

T = TypeVar("T")

SETTINGS = {"redis": "GRU_REDIS__URL / GRU_REDIS__USERNAME / GRU_REDIS__PASSWORD",
            "kafka": "GRU_KAFKA__BOOTSTRAP_SERVERS / GRU_KAFKA__SECURITY_PROTOCOL / "
                     "GRU_KAFKA__SASL_*"}


class Retrier:
    def __init__(self, settings: RetrySettings, metrics: Metrics, clock: Clock,
                 health: DependencyHealth, progress: Progress,
                 addresses: Mapping[str, str] | None = None) -> None:
        self.settings, self.metrics, self.clock = settings, metrics, clock
        self.health, self.progress = health, progress
        self.addresses = dict(addresses or {})
        self.stopping = False  # set by Worker.stop: the next backoff gives up
        self.on_wait: Callable[[], None] = lambda: None

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried with backoff while it raises DependencyError."""
        backoff = self.settings.initial_backoff_s
        failed: str | None = None
        while True:
            try:
                out = fn()
            except DependencyError as e:
                failed = e.dependency
                self.wait(e, backoff)
                backoff = self.next_backoff(backoff)
                continue
            if failed is not None:
                self.health.ok(failed)
            return out

    def next_backoff(self, seconds: float) -> float:
        return min(seconds * 2, self.settings.max_backoff_s)

    def wait(self, e: DependencyError, seconds: float) -> None:
        """Count and log ``e``, then sleep ``seconds``; or end the wait (module docstring)."""
        dep = e.dependency
        self.metrics.retries.labels(dep).inc()
        self.health.failed(dep, e)
        address = self.addresses.get(dep, "")
        failure = classify(e, kafka_hosts(address) if dep == "kafka" else ())
        if failure.permanent:
            raise PermanentFailure(dep, address or dep, failure.reason, SETTINGS.get(dep, ""),
                                   e) from e
        log.warning("%s; retrying in %.2fs", e, seconds)
        if self.stopping:
            raise ShutdownRequested() from e
        stalled = self.progress.stalled_for()
        if stalled >= self.settings.release_after_s:
            raise Stalled(f"no progress for {stalled:.0f}s while retrying {dep} "
                          f"({address or dep}: {e}): leaving the group so that another "
                          f"member takes the partitions (GRU_RETRY__RELEASE_AFTER_S)") from e
        self.metrics.dependency_backoff.labels(dep).inc(seconds)
        self.pause(seconds)

    def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, refreshing what the wait should not freeze (the lag)."""
        if self.stopping:
            raise ShutdownRequested()
        try:
            self.on_wait()
        except DependencyError:
            pass  # the lag is refreshed on the next wait, or the next poll
        self.clock.sleep(seconds)
