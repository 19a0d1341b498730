"""Tier 1: metric helpers that the hot path leans on (the GC watch, the active-session window)."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from worker.metrics import Metrics, quiet_gc, watch_gc


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
    m.saw_sessions(["a"], now=8.0)  # a is seen again: it moves to the young end
    m.saw_sessions(["d"], now=12.0)  # b and c are now 12 s old
    assert list(m._seen) == ["a", "d"]
    assert m.registry.get_sample_value("gru_active_sessions") == 2
    m.saw_sessions([], now=30.0)
    assert m.registry.get_sample_value("gru_active_sessions") == 0


def test_pruning_is_bounded_per_call_and_catches_up():
    m = Metrics(CollectorRegistry(), active_window_s=10)
    m.saw_sessions([f"s{i}" for i in range(5000)], now=0.0)
    m.saw_sessions([], now=20.0)  # all expired: one call prunes at most PRUNE_PER_CALL
    assert len(m._seen) == 5000 - Metrics.PRUNE_PER_CALL
    m.saw_sessions([], now=21.0)
    m.saw_sessions([], now=22.0)
    assert m.registry.get_sample_value("gru_active_sessions") == 0
