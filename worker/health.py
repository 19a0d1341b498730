"""Health that means something: each dependency's own last result, and the loop's progress.

``DependencyHealth`` keeps, per dependency (redis, kafka), the last success and failure, when it
went down and how often it failed since; it logs one line when a dependency goes down and one
when it is back ("redis is back after 31.2s down"), and sets ``gru_dependency_up``. ``Progress``
answers /healthz: a worker that holds partitions and has input waiting, but has not advanced
for ``stall_after_s``, is stuck. Both are pure bookkeeping over an injected clock; the loop (or
the port wrappers of ``watched``) tells them what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from .clock import SYSTEM_CLOCK, Clock
from .errors import DependencyError
from .failures import one_line
from .metrics import DEPENDENCIES

log = logging.getLogger(__name__)


@dataclass
class DependencyState:
    up: bool = True
    last_ok: float | None = None  # clock.monotonic() of the last success
    last_failure: float | None = None
    down_since: float | None = None  # first failure since the last success
    failures: int = 0  # failed calls since the last success
    last_error: str | None = None


class DependencyHealth:
    """Per dependency: up (its last call succeeded) or down since its first failure after a
    success. ``ok`` is cheap (a dict lookup and two stores) and belongs on every successful
    call; ``failed`` on every failed one, before the backoff. A dependency starts up: the
    worker starts only after start-up reached both (worker/preflight.py)."""

    def __init__(self, metrics: Any = None, clock: Clock = SYSTEM_CLOCK,
                 dependencies: Iterable[str] = DEPENDENCIES,
                 addresses: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.metrics = metrics
        self.addresses = dict(addresses or {})
        self._states: dict[str, DependencyState] = {}
        for d in dependencies:
            self._state(d)

    def _state(self, dependency: str) -> DependencyState:
        st = self._states.get(dependency)
        if st is None:
            st = self._states[dependency] = DependencyState()
            self._set_up(dependency, True)
        return st

    def _set_up(self, dependency: str, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.dependency_up.labels(dependency).set(1 if up else 0)

    def _where(self, dependency: str) -> str:
        address = self.addresses.get(dependency)
        return f"{dependency} at {address}" if address else dependency

    def ok(self, dependency: str) -> None:
        st = self._state(dependency)
        now = self.clock.monotonic()
        st.last_ok = now
        if not st.up:
            log.warning("%s is back after %.1fs down (%d failed calls; last error: %s)",
                        self._where(dependency), now - (st.down_since or now), st.failures,
                        st.last_error)
            st.up, st.down_since, st.failures = True, None, 0
            self._set_up(dependency, True)

    def failed(self, dependency: str, error: BaseException | str) -> None:
        st = self._state(dependency)
        now = self.clock.monotonic()
        st.last_failure = now
        st.failures += 1
        st.last_error = error if isinstance(error, str) else one_line(error)
        if st.up:
            st.up, st.down_since = False, now
            log.warning("%s is down: %s; retrying with backoff until it is back",
                        self._where(dependency), st.last_error)
            self._set_up(dependency, False)

    def state(self, dependency: str) -> DependencyState:
        """A copy of the dependency's state."""
        return replace(self._state(dependency))

    def down_for(self, dependency: str) -> float | None:
        """Seconds since the dependency went down, None while it is up."""
        st = self._state(dependency)
        return None if st.up else self.clock.monotonic() - (st.down_since or 0.0)

    def all_up(self) -> bool:
        return all(st.up for st in self._states.values())

    def readiness(self) -> dict[str, dict]:
        """For /readyz: each dependency's own state, from its own last result."""
        now = self.clock.monotonic()
        out = {}
        for name, st in self._states.items():
            entry: dict = {"up": st.up}
            if st.last_ok is not None:
                entry["last_ok_s_ago"] = round(now - st.last_ok, 3)
            if not st.up:
                entry["down_for_s"] = round(now - (st.down_since or now), 3)
                entry["failures"] = st.failures
                entry["last_error"] = st.last_error
            out[name] = entry
        return out


class Progress:
    """Liveness of the loop. ``healthy()`` is False only when the worker holds partitions,
    input is waiting for it, and it has advanced nothing for ``stall_after_s`` since the last
    of: its last progress, the moment it took partitions, the moment input began waiting. An
    idle worker is healthy however long it idles.

    With ``metrics``, ``gru_partition_progress_timestamp_seconds{topic,partition}`` is set to
    the wall time of each partition's last progress (its claim counts), and removed when the
    partition is released."""

    def __init__(self, stall_after_s: float, clock: Clock = SYSTEM_CLOCK,
                 metrics: Any = None) -> None:
        self.stall_after_s = stall_after_s
        self.clock = clock
        self.metrics = metrics
        self.held: set[tuple[str, int]] = set()
        self._held_since: float | None = None
        self._last_progress: float | None = None
        self._waiting_since: float | None = None

    def assigned(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Partitions taken (claimed): their clocks start now."""
        partitions = list(partitions)
        if not partitions:
            return
        if not self.held:
            self._held_since = self.clock.monotonic()
        self.held |= set(partitions)
        self._stamp(partitions)

    def released(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Partitions revoked, lost or fenced: their series go, and stay gone."""
        for tp in partitions:
            self.held.discard(tp)
            if self.metrics is not None:
                try:
                    self.metrics.partition_progress.remove(tp[0], str(tp[1]))
                except KeyError:
                    pass
        if not self.held:
            self._held_since = None

    def advanced(self, partitions: Iterable[tuple[str, int]] = ()) -> None:
        """Work was done: records settled (acknowledged and committed, or replayed in a
        rebuild) for ``partitions``."""
        self._last_progress = self.clock.monotonic()
        self._stamp(partitions)

    def input_waiting(self, waiting: int | bool | None) -> None:
        """After a lag refresh: the messages waiting in the held partitions (None: unknown,
        which changes nothing)."""
        if waiting is None:
            return
        if waiting and self._waiting_since is None:
            self._waiting_since = self.clock.monotonic()
        elif not waiting:
            self._waiting_since = None

    def _stamp(self, partitions: Iterable[tuple[str, int]]) -> None:
        if self.metrics is None:
            return
        now = self.clock.time()
        for topic, partition in partitions:
            if (topic, partition) in self.held:
                self.metrics.partition_progress.labels(topic, str(partition)).set(now)

    def stalled_for(self) -> float:
        """Seconds without progress while holding partitions with input waiting (0 when
        idle or not holding)."""
        if not self.held or self._waiting_since is None:
            return 0.0
        since = max(t for t in (self._last_progress, self._held_since, self._waiting_since)
                    if t is not None)
        return max(0.0, self.clock.monotonic() - since)

    def healthy(self) -> tuple[bool, dict]:
        stalled = self.stalled_for()
        ok = stalled < self.stall_after_s
        details: dict = {"partitions": len(self.held), "input_waiting": self._waiting_since is not None}
        if stalled:
            details["no_progress_for_s"] = round(stalled, 3)
        if not ok:
            details["stall_after_s"] = self.stall_after_s
        return ok, details


class _Watched:
    """A port whose calls report to a ``DependencyHealth``: a ``DependencyError`` marks its
    dependency failed (and is raised on); a return from a call in ``successes`` (None: any
    call) marks it ok."""

    def __init__(self, port: Any, dependency: str, health: DependencyHealth,
                 successes: frozenset[str] | None) -> None:
        self._port, self._dependency, self._health = port, dependency, health
        self._successes = successes

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._port, name)
        if not callable(attr) or name.startswith("_") or name in _NOT_WATCHED:
            return attr
        health, dependency = self._health, self._dependency
        counts = self._successes is None or name in self._successes

        def call(*args, **kwargs):
            try:
                out = attr(*args, **kwargs)
            except DependencyError as e:
                health.failed(e.dependency or dependency, e)
                raise
            if counts:
                health.ok(dependency)
            return out
        call.__name__ = name
        return call


# Calls that say nothing about the dependency (local bookkeeping, or closing).
_NOT_WATCHED = {"bind", "seek", "close", "assignment", "lag", "rejoin"}


def watched(port: Any, dependency: str, health: DependencyHealth,
            successes: Iterable[str] | None = None) -> Any:
    """``port`` (a Source, Sink or StateStore) with its calls reported to ``health``. Only the
    calls named in ``successes`` prove the dependency is back (default: all). A Kafka sink's
    ``send`` only buffers, so for it only ``wait`` (acknowledgements) does."""
    return _Watched(port, dependency, health,
                    None if successes is None else frozenset(successes))


def ready_gauge(fn: Callable[[], tuple[bool, dict]]) -> Callable[[], float]:
    """For ``Gauge.set_function``: 1.0 when ``fn()`` says ready, else 0.0 (also when it
    raises: a scrape must not fail, nor say ready on an error)."""
    def value() -> float:
        try:
            return 1.0 if fn()[0] else 0.0
        except Exception:  # noqa: BLE001 - read from another thread; report not ready
            return 0.0
    return value
