"""Tier 2: what an operator sees of a failing dependency, the loop on in-memory fakes (issue 25).

A fault that cannot heal ends the worker at once, out of the group; one that may heal is
retried while the lag keeps being refreshed from the broker; a retry that makes no progress
for ``retry.release_after_s`` gives up; ``/healthz`` fails while stuck; a partition no longer
held exports no lag.
"""

from __future__ import annotations

import json

import pytest
import redis.exceptions as rex

from worker.errors import DependencyError, Stalled
from worker.failures import PermanentFailure
from worker.state import MemoryStateStore

from .fakes import FakeLog, FakeSource
from .workers import IN, make_worker, publish

pytestmark = pytest.mark.fakes


def pairs(n: int, prefix: str = "s"):
    return [(f"{prefix}{i}".encode(), json.dumps({"session_id": f"{prefix}{i}", "seq": 0,
                                                  "tokens": ["the", "match"]}).encode())
            for i in range(n)]


class FailingStore(MemoryStateStore):
    """Every load fails with ``error`` (wrapped as the Redis adapter wraps it) while ``down``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error, self.down, self.calls = error, True, 0

    def load(self, *args, **kwargs):
        self.calls += 1
        if self.down:
            raise DependencyError("redis", f"load failed: {self.error!r}") from self.error
        return super().load(*args, **kwargs)


def test_a_wrong_password_ends_the_worker_at_once_out_of_the_group(clf):
    log = FakeLog(partitions=2)
    publish(log, pairs(6))
    store = FailingStore(rex.AuthenticationError("invalid username-password pair"))
    source = FakeSource(log, IN)
    w = make_worker(clf, log, store, source=source, idle_exit_s=None)
    with pytest.raises(PermanentFailure) as caught:
        w.run()
    assert store.calls == 1  # not retried
    assert "redis" in str(caught.value) and "GRU_REDIS__PASSWORD" in str(caught.value)
    assert source.closed  # closing the consumer leaves the group
    reg = w.metrics.registry
    assert reg.get_sample_value("gru_dependency_up", {"dependency": "redis"}) == 0
    assert log.committed["g"] == {}


def test_a_refused_connection_is_retried_with_the_lag_refreshed_then_gives_up(clf, monkeypatch):
    log = FakeLog(partitions=1)
    publish(log, pairs(5))
    store = FailingStore(rex.ConnectionError("Connection refused"))
    w = make_worker(clf, log, store, idle_exit_s=None,
                    retry={"initial_backoff_s": 0.01, "max_backoff_s": 0.02,
                           "stall_after_s": 0.2, "release_after_s": 0.6})
    seen: list[tuple[float, bool]] = []
    refresh = w.retry.on_wait  # the loop's own: the lag, from the broker

    def watch_lag() -> None:
        publish(log, pairs(1, prefix=f"late{len(seen)}-"))  # input keeps arriving
        refresh()
        lag = w.metrics.registry.get_sample_value("gru_consumer_lag_messages",
                                                  {"topic": IN, "partition": "0"})
        seen.append((lag or 0.0, w.alive()[0]))
    w.retry.on_wait = watch_lag
    monkeypatch.setattr("worker.intake.LAG_REFRESH_S", 0.0)
    with pytest.raises(Stalled):
        w.run()
    assert store.calls > 5  # retried
    lags = [lag for lag, _ in seen]
    assert lags[-1] > lags[0] and lags[-1] >= 5  # the lag rose during the outage
    assert seen[0][1] is True and seen[-1][1] is False  # /healthz fails once stuck
    assert w.metrics.registry.get_sample_value("gru_dependency_backoff_seconds_total",
                                               {"dependency": "redis"}) > 0


def test_the_dependency_is_back_and_healthy_once_the_outage_ends(clf, caplog):
    log = FakeLog(partitions=1)
    publish(log, pairs(4))
    store = FailingStore(rex.ConnectionError("Connection refused"))
    w = make_worker(clf, log, store, retry={"initial_backoff_s": 0.01, "max_backoff_s": 0.02})
    waits = []

    def heal() -> None:
        waits.append(1)
        if len(waits) == 3:
            store.down = False
    w.retry.on_wait = heal
    with caplog.at_level("WARNING"):
        summary = w.run()
    assert summary.outcomes["ok"] == 4
    assert w.metrics.registry.get_sample_value("gru_dependency_up", {"dependency": "redis"}) == 1
    assert any("is back after" in r.message for r in caplog.records)
    assert w.alive()[0] and w.ready()[1]["redis"]["up"]


def test_a_revoked_partition_exports_no_lag(clf):
    log = FakeLog(partitions=2)
    publish(log, pairs(8))
    source = FakeSource(log, IN)
    w = make_worker(clf, log, MemoryStateStore(), source=source, idle_exit_s=None,
                    max_messages=4)
    w.run()
    series = {s.labels["partition"] for m in w.metrics.registry.collect()
              if m.name == "gru_consumer_lag_messages" for s in m.samples}
    assert series == {"0", "1"}
    source.partitions = [1]  # the group moves partition 0 to another member
    source.rejoin()
    publish(log, pairs(3, prefix="after-"))
    w.intake.poll()
    w.intake.poll()
    series = {s.labels["partition"] for m in w.metrics.registry.collect()
              if m.name == "gru_consumer_lag_messages" for s in m.samples}
    assert series == {"1"}
