"""Polling the input: how many records the next batch may take, and what a poll can meet.

The batch limit comes from the latency budget (``worker.budget``), fed the consumer lag
after each poll. A poll that meets a record batch the client cannot decode counts it, logs
where it is and backs off, doubling while the partition stays stuck; other dependency errors
back off too. The interpreter's thread switch interval follows the budget's reason: short
while records are few, long while a backlog lifts the budget.
"""

from __future__ import annotations

import logging
import sys
import time

from collections.abc import Callable

from .budget import BatchBudget
from .clock import Clock
from .config import BatchSettings
from .errors import DependencyError, UndecodableInput
from .health import Progress
from .metrics import Metrics
from .ports import Record, Source, TopicPartition
from .retry import Retrier

LAG_REFRESH_S = 5.0  # while waiting out an outage, the lag is asked of the broker this often

log = logging.getLogger("worker.loop")


class Intake:
    def __init__(self, settings: BatchSettings, source: Source, retrier: Retrier,
                 held: Callable[[], set[TopicPartition]], progress: Progress, metrics: Metrics,
                 clock: Clock) -> None:
        self.settings, self.source, self.retry = settings, source, retrier
        self.held, self.progress, self.metrics, self.clock = held, progress, metrics, clock
        self._exported: set[TopicPartition] = set()  # partitions with a lag series
        self._fresh_at = float("-inf")
        self.budget = BatchBudget(settings.target_latency_ms / 1000, settings.max_records)
        self.last_poll_ok = 0.0  # monotonic time of the last poll that did not fail
        self._waiting: int | None = None  # consumer lag after the last poll
        self._limit_reason: str | None = None  # the reason label gru_batch_limit_records has
        self._undecodable_backoff = retrier.settings.initial_backoff_s
        # an undecodable batch an operator already moved the group past: jumped again (True)
        self.known_skip: Callable[[UndecodableInput], bool] = lambda e: False
        metrics.batch_budget.set(settings.target_latency_ms / 1000)

    def poll(self) -> list[Record]:
        limit = self.budget.limit(self._waiting)
        m = self.metrics
        if limit.reason != self._limit_reason:  # one series: the current limit and its reason
            if self._limit_reason is not None:
                m.batch_limit.remove(self._limit_reason)
            self._limit_reason = limit.reason
            self._set_switch_interval(limit.reason)
        m.batch_limit.labels(limit.reason).set(limit.records)
        t0 = time.perf_counter()
        try:
            records = self.source.poll(limit.records, self.settings.max_wait_ms)
        except DependencyError as e:
            m.poll_wait.inc(time.perf_counter() - t0)
            self._failed(e)
            return []
        m.poll_wait.inc(time.perf_counter() - t0)
        m.polls.labels("records" if records else "empty").inc()
        if records:
            m.poll_seconds.observe(time.perf_counter() - t0)
        self._undecodable_backoff = self.retry.settings.initial_backoff_s
        self.last_poll_ok = self.clock.monotonic()
        self._update_lag()
        return records

    def _failed(self, e: DependencyError) -> None:
        if not isinstance(e, UndecodableInput):
            self.retry.wait(e, self.retry.settings.initial_backoff_s)
            return
        if self.known_skip(e):  # read again by a replay: the live run jumped it
            return
        # Not the broker's fault: counted apart, and Kafka is not marked down for it.
        self.metrics.undecodable.labels(
            e.topic or "unknown", "unknown" if e.partition is None else str(e.partition)).inc()
        log.error("%s. The partition cannot advance past this batch; the others go on. "
                  "See docs/reliability.md, 'Undecodable input'", e)
        self.retry.pause(self._undecodable_backoff)
        self._undecodable_backoff = self.retry.next_backoff(self._undecodable_backoff)

    def observe(self, messages: int, sessions: int, seconds: float, tokens: int = 0,
                longest: int = 0) -> None:
        """A batch's own processing time, for the budget's cost model: its records, the
        sessions written, the tokens the model read and its longest sequence."""
        b = self.budget
        b.observe(messages, sessions, seconds, tokens, longest)
        cost = self.metrics.batch_cost
        cost.labels("fixed").set(b.fixed_s)
        cost.labels("per_message").set(b.per_message_s)
        cost.labels("per_token").set(b.per_token_s)
        cost.labels("per_step").set(b.per_step_s)

    def _set_switch_interval(self, reason: str) -> None:
        """Short GIL turns while records are few, long ones while a backlog lifts the budget.
        kafka-python runs its network I/O on its own thread: every poll, send and commit hands
        over to it and back, and at Python's 5 ms switch interval the loop could wait that
        long for the GIL after each (docs/latency.md); under a backlog each hand-off costs CPU
        instead. The process-wide interval is the loop's alone to set: the first poll sets it."""
        b = self.settings
        ms = b.backlog_switch_interval_ms if reason == "backlog" and b.backlog_switch_interval_ms \
            else b.switch_interval_ms
        sys.setswitchinterval(ms / 1000)

    def _update_lag(self, fresh: bool = False) -> None:
        try:
            lags = self.source.lag(fresh)
        except DependencyError:
            self._waiting = None
            return
        held = self.held()
        lags = {tp: n for tp, n in lags.items() if tp in held}
        for tp in self._exported - set(lags):  # a partition no longer ours: its series goes
            try:
                self.metrics.lag.remove(tp[0], str(tp[1]))
            except KeyError:
                pass
        for (topic, p), lag in lags.items():
            self.metrics.lag.labels(topic, str(p)).set(lag)
        self._exported = set(lags)
        self._waiting = sum(lags.values()) if lags else None
        self.progress.input_waiting(self._waiting)

    def refresh_lag(self) -> None:
        """While the loop waits out an outage: the lag from the broker, at most every
        ``LAG_REFRESH_S`` (the fetches that would refresh it have stopped)."""
        now = self.clock.monotonic()
        if now - self._fresh_at >= LAG_REFRESH_S:
            self._fresh_at = now
            self._update_lag(fresh=True)

    def forget(self, partitions) -> None:
        for tp in partitions:
            if tp in self._exported:
                self._exported.discard(tp)
                try:
                    self.metrics.lag.remove(tp[0], str(tp[1]))
                except KeyError:
                    pass
