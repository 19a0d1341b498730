"""Tier 1: metric helpers that the hot path leans on (the GC watch, the active-session window)."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import CollectorRegistry

from worker.metrics import ActiveSessions, Metrics, quiet_gc, watch_gc

pytestmark = pytest.mark.unit


def test_gc_pauses_are_observed_by_generation():
    m = Metrics(CollectorRegistry())
    unwatch = watch_gc(m)
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        unwatch()
    count = lambda g: m.registry.get_sample_value("gru_gc_pause_seconds_count", {"generation": g})
    assert count("0") >= 1 and count("2") >= 1
    gc.collect()
    assert count("2") >= 1  # no longer watched: nothing raises, nothing more is required


def test_quiet_gc_freezes_the_heap():
    try:
        quiet_gc()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_active_sessions_forget_the_least_recently_seen_first():
    m = Metrics(CollectorRegistry(), active_window_s=10)
    m.saw_sessions(["a", "b", "c"], now=0.0)
    m.saw_sessions(["a"], now=8.0)  # a is seen again: it counts from 8 s on
    m.saw_sessions(["d"], now=12.0)  # b and c are now 12 s old
    assert m.registry.get_sample_value("gru_active_sessions") == 2
    m.saw_sessions([], now=30.0)
    assert m.registry.get_sample_value("gru_active_sessions") == 0


def test_active_sessions_by_model():
    m = Metrics(CollectorRegistry(), active_window_s=10)
    m.saw_sessions(["a", "b", "c"], now=0.0, models={"new": ["a", "b"], "old": ["c"]})
    m.saw_sessions(["a"], now=5.0, models={"new": ["a"]})
    value = lambda mid: m.registry.get_sample_value("gru_model_active_sessions", {"model_id": mid})
    assert (value("new"), value("old")) == (2, 1)
    m.saw_sessions([], now=12.0)  # the old model saw nothing since 0 s: its gauge still moves
    assert (value("new"), value("old")) == (1, 0)


@pytest.mark.parametrize("n", [1, 7, 100, 5_000, 60_000])
def test_active_session_count_is_within_a_few_percent(n):
    active = ActiveSessions(window_s=300)
    ids = [f"session-{i:07d}" for i in range(n)]
    for start in range(0, n, 512):
        active.add(ids[start:start + 512], now=start / 1000)
        active.add(ids[: min(50, n)], now=start / 1000)  # repeats count once
    assert abs(active.count(now=n / 1000) - n) <= max(0.04 * n, 0), n


def test_the_window_holds_500k_ids_in_bounded_memory():
    """Issue 26, F8: 500,000 distinct ids (one batch of 512 every 0.3 s, one model) cost
    about 230 MB when every id was kept for the window; the sketches cost a few hundred KB."""
    from .peak import measure

    m = Metrics(CollectorRegistry(), active_window_s=300)
    n, batch = 500_000, 512

    def feed() -> None:
        for start in range(0, n, batch):
            ids = [f"{start + i:08d}-a-session-id" for i in range(min(batch, n - start))]
            m.saw_sessions(ids, now=start / batch * 0.3, models={"m1": ids})

    cost = measure(feed)
    print(cost)
    assert cost.error is None
    count = m.registry.get_sample_value("gru_active_sessions")
    by_model = m.registry.get_sample_value("gru_model_active_sessions", {"model_id": "m1"})
    assert abs(count - n) <= 0.04 * n and abs(by_model - n) <= 0.04 * n, (count, by_model)
    assert cost.rss_growth < 16 * 2**20 and cost.traced_peak < 4 * 2**20, cost
    m.saw_sessions(["late"], now=n / batch * 0.3 + 310)  # every earlier slice has left
    assert m.registry.get_sample_value("gru_active_sessions") == 1
