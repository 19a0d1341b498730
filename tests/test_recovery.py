"""Tier 2: recovery under the schedules of issue 24 (B1-B8), the loop on in-memory fakes.

Each test is the schedule that broke the worker before the checkpoint records, event-time
expiry and per-model decoding; it fails on the tree before them (62959ad). Time is a manual
wall clock: record timestamps, state expiry in the store and the worker's notion of now all
follow it, so a TTL passes without waiting.
"""

from __future__ import annotations

import json
import time as _time

import pytest

from worker.codec import decode_state
from worker.errors import UndecodableInput
from worker.state import MemoryStateStore

from .fakes import FakeLog, FakeSink, FakeSource, wipe
from .workers import IN, ModelKeyed, make_worker, predictions, rollout_worker

pytestmark = pytest.mark.fakes


class WallClock:
    """A settable wall clock; intervals and sleeps stay real (they are milliseconds here)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def time(self) -> float:
        return self.t

    monotonic = staticmethod(_time.monotonic)
    sleep = staticmethod(_time.sleep)


def send(log, clock, sid, seq=None, tokens=None, at=None, partition=None, **fields):
    """Publish one message of ``sid`` at wall time ``at`` (the clock moves there)."""
    if at is not None:
        clock.t = at
    log.clock_ms = int(clock.t * 1000) - 1  # FakeLog stamps the next record clock_ms + 1
    value = {"session_id": sid, **({"seq": seq} if seq is not None else {}),
             "tokens": tokens if tokens is not None else ["the", "match"], **fields}
    return log.append(IN, sid.encode(), json.dumps(value).encode(), partition)


WORDS = ["the", "match", "ended", "shares", "fell", "film", "won", "in", "a", "draw", "profits",
         "rose"]


def words(i: int, n: int = 3) -> list[str]:
    return [WORDS[(i * 5 + k) % len(WORDS)] for k in range(n)]


def last_of(preds, sid):
    return max((p for p in preds if p["session_id"] == sid), key=lambda p: p["seq"])


def close_to(clf, got, tokens):
    want = clf.classify(tokens)
    return max(abs(got["probs"][label] - want[label]) for label in want) <= 1e-5


def test_b1_a_re_emitted_prediction_survives_a_second_crash(clf):
    """Worker 1 writes seq 0 and dies before producing. Worker 2 re-emits seq 0 from the
    outbox and writes seq 1 in the same batch, then dies before producing. Worker 3 must still
    produce seq 0's prediction: a re-emitted entry stays in the outbox until acknowledged."""
    clock = WallClock(1000.0)
    log, store = FakeLog(partitions=1), MemoryStateStore(clock=clock.time)
    send(log, clock, "s", 0, words(0))
    with pytest.raises(SystemExit):
        make_worker(clf, log, store, sink=FakeSink(log, crash=True), clock=clock).run()
    send(log, clock, "s", 1, words(1))
    with pytest.raises(SystemExit):
        make_worker(clf, log, store, sink=FakeSink(log, crash=True), clock=clock).run()
    make_worker(clf, log, store, clock=clock).run()
    assert sorted(p["seq"] for p in predictions(log)) == [0, 1]
    assert close_to(clf, last_of(predictions(log), "s"), words(0) + words(1))


class UndecodableAt(FakeSource):
    """The input's record at ``bad`` (one partition) is a batch no client can decode."""

    def __init__(self, log, topic, bad: int, **kw) -> None:
        super().__init__(log, topic, **kw)
        self.bad = bad

    def poll(self, max_records, max_wait_ms):
        tp = (self.topic, 0)
        if self.assigned and self.positions.get(tp) == self.bad:
            raise UndecodableInput(self.topic, 0, self.bad, RuntimeError("CRC failed"))
        before = self.positions.get(tp) if self.assigned else None
        out = super().poll(max_records, max_wait_ms)
        start = out[0].offset if out else None
        if start is not None and start <= self.bad and (before is None or before <= self.bad):
            out = [r for r in out if r.offset < self.bad]
            if len(out) or start == self.bad:
                self.positions[tp] = min(self.positions[tp], self.bad)
        return out


def test_b2_an_operators_offset_reset_past_a_bad_batch_is_a_skip_not_a_rollback(clf):
    """The documented fix for a corrupt batch: stop the workers, move the group past it,
    start again. The worker must honour the skip (no rebuild onto the bad batch), go on, and
    mark partial the sessions that may have lost messages in it."""
    clock = WallClock(1000.0)
    log, store = FakeLog(partitions=1), MemoryStateStore(clock=clock.time)
    send(log, clock, "a", 0, words(0))
    send(log, clock, "a", 1, words(1))
    send(log, clock, "b", 0, words(2))
    send(log, clock, "c", None, words(3))  # numbered by offsets
    make_worker(clf, log, store, clock=clock).run()
    bad = send(log, clock, "a", 2, words(4)).offset  # the corrupt batch
    send(log, clock, "a", 3, words(5))  # a lost seq 2
    send(log, clock, "b", 1, words(6))  # b lost nothing
    send(log, clock, "c", None, words(7))  # c cannot tell
    stuck = make_worker(clf, log, store, source=UndecodableAt(log, IN, bad), clock=clock)
    stuck.run()
    assert stuck.metrics.registry.get_sample_value(
        "gru_undecodable_batches_total", {"topic": IN, "partition": "0"}) >= 1
    assert log.committed["g"][(IN, 0)] == bad
    log.committed["g"][(IN, 0)] = bad + 1  # kafka-consumer-groups --reset-offsets
    w = make_worker(clf, log, store, source=UndecodableAt(log, IN, bad), clock=clock)
    w.run()
    reg = w.metrics.registry
    assert reg.get_sample_value("gru_state_rebuilds_total", {"reason": "rollback"}) == 0
    assert reg.get_sample_value("gru_offset_skips_total") == 1
    assert log.committed["g"][(IN, 0)] == bad + 4 and not w.recovery.rebuilds
    after = {p["session_id"]: p for p in predictions(log) if p["offset"] > bad}
    assert after["a"]["context"] == "partial" and after["a"]["seq"] == 3
    assert after["b"]["context"] == "full" and after["c"]["context"] == "partial"
    assert close_to(clf, after["b"], words(2) + words(6))
    # a later claim sees the skip as this group's own progress: no second skip
    again = make_worker(clf, log, store, source=UndecodableAt(log, IN, bad), clock=clock)
    again.run()
    assert again.metrics.registry.get_sample_value("gru_offset_skips_total") == 0


def test_b3_a_session_older_than_the_ttl_is_rebuilt_whole_after_a_total_loss(clf):
    """A message every 60 s with the state TTL at 100 s: the session never idles past the
    TTL, but began long before now - TTL. Redis loses everything; the rebuild must replay
    from the session's first message, not from now - TTL."""
    clock = WallClock(10_000.0)
    log, store = FakeLog(partitions=1), MemoryStateStore(clock=clock.time)
    state = {"ttl_seconds": 100}
    tokens = []
    for i in range(6):
        send(log, clock, "long", i, words(i), at=10_000.0 + 60 * i)
        send(log, clock, f"short{i}", 0, words(i + 1))
        tokens += words(i)
        make_worker(clf, log, store, clock=clock, state=state).run()
    wipe(store)
    send(log, clock, "long", 6, words(6), at=10_000.0 + 360)
    tokens += words(6)
    w = make_worker(clf, log, store, clock=clock, state=state)
    w.run()
    got = last_of(predictions(log), "long")
    assert got["seq"] == 6 and got["context"] == "full" and got["tokens_seen"] == len(tokens)
    assert close_to(clf, got, tokens)
    assert w.metrics.registry.get_sample_value("gru_state_rebuilds_total",
                                               {"reason": "loss"}) == 1


def test_b4_a_rebuild_never_brings_back_an_expired_tombstone(clf):
    """A session ends; its tombstone expires; the id is reused from seq 0; then Redis loses
    everything. The rebuild replays the old conversation too (a long-lived session keeps the
    replay start before it), and must let the tombstone expire again in event time."""
    clock = WallClock(10_000.0)
    log, store = FakeLog(partitions=1), MemoryStateStore(clock=clock.time)
    state = {"ttl_seconds": 1000, "end_ttl_seconds": 60}
    send(log, clock, "keep", 0, words(9), at=10_000.0)
    send(log, clock, "x", 0, words(0))
    send(log, clock, "x", 1, words(1), end=True)
    make_worker(clf, log, store, clock=clock, state=state).run()
    new = []
    for i in range(3):  # the reused id, after the tombstone expired (60 s)
        send(log, clock, "x", i, words(i + 4), at=10_200.0 + i)
        new += words(i + 4)
    send(log, clock, "keep", 1, words(8))
    make_worker(clf, log, store, clock=clock, state=state).run()
    wipe(store)
    send(log, clock, "x", 3, words(7), at=10_210.0)
    new += words(7)
    make_worker(clf, log, store, clock=clock, state=state).run()
    got = last_of(predictions(log), "x")
    assert got["seq"] == 3 and got["tokens_seen"] == len(new) and got["context"] == "full"
    assert close_to(clf, got, new)


def test_b5_a_record_is_validated_by_the_model_that_serves_its_session(clf, clf_b):
    """During a rollout, a session on the previous model sends token_ids valid for the
    previous model's larger vocabulary: accepted, and applied by it."""
    big, small = sorted((clf, clf_b), key=lambda c: len(c.vocab), reverse=True)
    assert len(big.vocab) > len(small.vocab)
    clock = WallClock(1000.0)
    log, store = FakeLog(partitions=1), MemoryStateStore(clock=clock.time)
    high = [len(small.vocab) + 1, 2, len(big.vocab) - 1]
    log.append(IN, b"s", json.dumps({"session_id": "s", "seq": 0, "token_ids": [2, 3]}).encode())
    make_worker(big, log, ModelKeyed(store, big.model_id), clock=clock).run()
    log.append(IN, b"s", json.dumps({"session_id": "s", "seq": 1, "token_ids": high}).encode())
    log.append(IN, b"t", json.dumps({"session_id": "t", "seq": 0, "token_ids": high}).encode())
    w = rollout_worker(small, big, log, store, clock=clock)
    w.run()
    got = last_of(predictions(log), "s")
    assert got["seq"] == 1 and got["model_id"] == big.model_id and got["tokens_seen"] == 5
    dlq = [json.loads(v) for v in log.values("tokens.dlq")]
    assert [d["value"] for d in dlq] == [json.dumps({"session_id": "t", "seq": 0,
                                                     "token_ids": high})]
    assert f"out of range for vocab size {len(small.vocab)}" in dlq[0]["reason"]


def test_b6_a_rebuilt_session_stays_on_the_model_that_began_it(clf, clf_b):
    """A session begun on the previous model during a rollout; Redis loses everything: after
    the rebuild it goes on with the previous model, and the new sessions with the new one."""
    clock = WallClock(1000.0)
    log, store = FakeLog(partitions=1), MemoryStateStore(clock=clock.time)
    old_tokens = words(0) + words(1)
    send(log, clock, "old", 0, words(0))
    send(log, clock, "old", 1, words(1))
    make_worker(clf, log, ModelKeyed(store, clf.model_id), clock=clock).run()
    send(log, clock, "old", 2, words(2))
    send(log, clock, "new", 0, words(3))
    old_tokens += words(2)
    rollout_worker(clf_b, clf, log, store, clock=clock).run()
    wipe(store)
    send(log, clock, "old", 3, words(4))
    send(log, clock, "new", 1, words(5))
    old_tokens += words(4)
    rollout_worker(clf_b, clf, log, store, clock=clock).run()
    preds = predictions(log)
    got, new = last_of(preds, "old"), last_of(preds, "new")
    assert got["seq"] == 3 and got["model_id"] == clf.model_id and close_to(clf, got, old_tokens)
    assert new["model_id"] == clf_b.model_id and close_to(clf_b, new, words(3) + words(5))


def test_b7_a_closing_message_without_tokens_ends_the_session(clf):
    clock = WallClock(1000.0)
    log, store = FakeLog(partitions=1), MemoryStateStore(clock=clock.time)
    send(log, clock, "s", 0, words(0))
    log.append(IN, b"s", json.dumps({"session_id": "s", "seq": 1, "text": "\U0001F642",
                                     "end": True}).encode())
    log.append(IN, b"f", json.dumps({"session_id": "f", "seq": 0, "tokens": words(1)}).encode())
    log.append(IN, b"f", json.dumps({"session_id": "f", "seq": 1, "token_ids": [],
                                     "end": True}).encode())
    w = make_worker(clf, log, store, clock=clock, output={"emit": "final"})
    w.run()
    preds = {p["session_id"]: p for p in predictions(log)}
    assert set(preds) == {"s", "f"} and all(p["final"] for p in preds.values())
    assert preds["s"]["tokens_seen"] == 3 and close_to(clf, preds["s"], words(0))
    assert close_to(clf, preds["f"], words(1))
    assert not log.values("tokens.dlq")
    st = decode_state(store.load(["s"])[0], 1, clf.model.config.state_size, len(clf.labels))
    assert st.ended
    log.append(IN, b"z", json.dumps({"session_id": "z", "seq": 0, "text": "..."}).encode())
    make_worker(clf, log, store, clock=clock).run()
    (dl,) = [json.loads(v) for v in log.values("tokens.dlq")]
    assert "text has no tokens (only a message with end=true may have none)" in dl["reason"]
