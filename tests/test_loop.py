"""Tier 2: the whole loop with in-memory fakes for Kafka and the state store."""

from __future__ import annotations

import itertools
import json
import sys
import time

import pytest

from worker.config import Settings
from worker.codec import decode_state
from worker.state import MemoryStateStore

from .fakes import FakeLog, FakeSink, FakeSource, restore, snapshot, wipe
from .streams import bbc_sessions, interleave, last_predictions
from .workers import DLQ, IN, OUT, assert_matches_offline, make_worker, predictions, publish

pytestmark = pytest.mark.fakes


def test_interleaved_sessions_match_offline_and_get_one_prediction_each(clf):
    log, store = FakeLog(), MemoryStateStore()
    sessions = bbc_sessions(30, seed=1)
    pairs = interleave(sessions, seed=1)
    publish(log, pairs)
    w = make_worker(clf, log, store, batch={"max_records": 64})
    summary = w.run()
    preds = predictions(log)
    assert len(preds) == len(pairs) == summary.outcomes["ok"]
    assert sorted((p["session_id"], p["seq"]) for p in preds) == sorted(
        (json.loads(v)["session_id"], json.loads(v)["seq"]) for _, v in pairs)
    assert_matches_offline(clf, sessions, preds, store)
    assert all(p["model_id"] == clf.model_id and p["label"] in clf.labels for p in preds)
    assert w.metrics.registry.get_sample_value("gru_messages_total", {"outcome": "ok"}) == len(pairs)
    assert w.metrics.registry.get_sample_value("gru_e2e_latency_seconds_count") == len(pairs)
    assert w.metrics.registry.get_sample_value("gru_tokens_total") == sum(len(s.tokens) for s in sessions)


def test_without_seq_positions_are_offsets_and_seq_is_the_message_index(clf):
    log, store = FakeLog(), MemoryStateStore()
    sessions = bbc_sessions(5, seed=2)
    publish(log, interleave(sessions, seed=2, with_seq=False))
    make_worker(clf, log, store).run()
    preds = predictions(log)
    for s in sessions:
        seqs = [p["seq"] for p in preds if p["session_id"] == s.session_id]
        assert seqs == list(range(len(s.chunks)))
    assert_matches_offline(clf, sessions, preds)


def test_replay_from_zero_changes_no_state_and_counts_duplicates(clf):
    log, store = FakeLog(), MemoryStateStore()
    sessions = bbc_sessions(10, seed=3)
    pairs = interleave(sessions, seed=3)
    publish(log, pairs)
    make_worker(clf, log, store, batch={"max_records": 16}).run()
    before = {s.session_id: store.load([s.session_id])[0] for s in sessions}
    n_preds = len(predictions(log))
    log.committed["g"].clear()  # reset the group: every offset is redelivered
    w = make_worker(clf, log, store, batch={"max_records": 16})
    summary = w.run()
    after = {s.session_id: store.load([s.session_id])[0] for s in sessions}
    assert after == before
    assert summary.outcomes["duplicate"] == len(pairs)
    assert summary.outcomes["ok"] == 0
    # Only the messages of each session's last write are re-emitted, from its outbox.
    assert 0 < summary.outcomes["replayed"] <= len(pairs)
    assert len(predictions(log)) == n_preds + summary.outcomes["replayed"]
    assert w.metrics.registry.get_sample_value("gru_messages_total", {"outcome": "duplicate"}) == len(pairs)


def test_crash_between_state_write_and_produce_loses_no_prediction(clf):
    log, store = FakeLog(), MemoryStateStore()
    sessions = bbc_sessions(8, seed=4)
    pairs = interleave(sessions, seed=4)
    publish(log, pairs)
    with pytest.raises(SystemExit):
        make_worker(clf, log, store, sink=FakeSink(log, crash=True)).run()
    assert not predictions(log) and not log.committed["g"]
    make_worker(clf, log, store).run()  # the restart redelivers the whole batch
    preds = predictions(log)
    assert {(p["session_id"], p["seq"]) for p in preds} == {
        (json.loads(v)["session_id"], json.loads(v)["seq"]) for _, v in pairs}
    assert_matches_offline(clf, sessions, preds, store)


def test_kafka_outage_during_produce_is_retried_then_committed(clf):
    log, store = FakeLog(), MemoryStateStore()
    sessions = bbc_sessions(4, seed=5)
    pairs = interleave(sessions, seed=5)
    publish(log, pairs)
    w = make_worker(clf, log, store, sink=FakeSink(log, fail_times=3),
                    retry={"initial_backoff_s": 0.001, "max_backoff_s": 0.002})
    w.run()
    assert len(predictions(log)) == len(pairs)
    assert w.metrics.registry.get_sample_value("gru_dependency_retries_total", {"dependency": "kafka"}) == 3


def test_zombie_with_stale_epoch_is_fenced_and_writes_nothing(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(3, seed=6)
    publish(log, interleave(sessions, seed=6))
    zombie = make_worker(clf, log, store)
    zombie.source.poll(1, 0)  # joins the group
    zombie.process([])  # claims partition 0 (token 1) before its first batch
    zombie.source.positions = {(IN, 0): 0}
    owner = make_worker(clf, log, store, source=FakeSource(log, IN, group="g"))
    owner.source._assign()  # the rebalance gives partition 0 to the owner...
    owner.process([])  # ...which claims it: token 2
    records = log.records[(IN, 0)]
    zombie.process(records)  # the paused worker wakes up with its old epoch
    zombie.settle()
    assert store.load([s.session_id for s in sessions]) == [None, None, None]
    assert not predictions(log) and not log.committed["g"]
    assert zombie.summary.outcomes["fenced"] == len(records)
    assert zombie.source.rejoins == 1 and not zombie.ownership.tokens
    assert zombie.metrics.registry.get_sample_value("gru_fenced_partitions_total") == 1
    owner.process(records)
    owner.settle()
    assert_matches_offline(clf, sessions, predictions(log), store)


def test_bad_input_is_dead_lettered_and_good_messages_are_unaffected(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(3, seed=7)
    good = interleave(sessions, seed=7)
    bad = [
        (b"x", b"\xff\xfe not json"),
        (b"x", b'{"session_id": "x", "tokens": "notalist"}'),
        (b"x", b'{"session_id": "x", "tokens": []}'),
        (b"x", b'{"session_id": "x", "token_ids": [1, 999999]}'),
        (None, b'{"tokens": ["a"]}'),
        (b"x", json.dumps({"session_id": "x", "tokens": ["a"] * 5000}).encode()),
        (b"other", b'{"session_id": "x", "tokens": ["a"]}'),
        (b"x", b'{"session_id": "x", "seq": -1, "tokens": ["a"]}'),
        (b"x", b'{"session_id": "x", "text": "hi", "tokens": ["a"]}'),
        (b"x", b'{"session_id": "x", "seq": NaN, "tokens": ["a"]}'),
    ]
    mixed = good[:5] + bad + good[5:]
    publish(log, mixed)
    summary = make_worker(clf, log, store).run()
    dlq = [json.loads(v) for v in log.values(DLQ)]
    assert len(dlq) == len(bad) == summary.outcomes["dead_lettered"]
    reasons = [d["reason"] for d in dlq]
    for fragment in ["not valid UTF-8 JSON", "got `str` - at `$.tokens`", "tokens has no tokens",
                     "token_ids[1]=999999 is out of range for vocab size",
                     "missing required field `session_id`", "over max_tokens_per_message=4096",
                     "does not equal session_id", "seq must be an integer",
                     "exactly one of tokens, text, token_ids", "NaN"]:
        assert any(fragment in r for r in reasons), fragment
    assert dlq[0]["value_b64"] and dlq[0]["partition"] == 0 and dlq[0]["offset"] == 5
    assert all(d["topic"] == IN for d in dlq)
    assert_matches_offline(clf, sessions, predictions(log))
    assert len(predictions(log)) == len(good)


def test_end_emits_final_prediction_and_tombstone_rejects_replays(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(2, seed=8)
    publish(log, interleave(sessions, seed=8, end=True))
    make_worker(clf, log, store).run()
    preds = predictions(log)
    finals = [p for p in preds if p["final"]]
    assert sorted(p["session_id"] for p in finals) == sorted(s.session_id for s in sessions)
    for s in sessions:
        st = decode_state(store.load([s.session_id])[0], 1, clf.model.config.state_size, 5)
        assert st.ended and st.h.size == 0  # the hidden state is gone; a tombstone remains
    log.committed["g"].clear()
    summary = make_worker(clf, log, store).run()
    assert summary.outcomes["ok"] == 0 and summary.outcomes["duplicate"] > 0


def test_end_ttl_below_a_minute_is_rejected():
    # 0 used to delete an ended session's key at once; a crash after that write recomputed the
    # whole session from zero on redelivery, so its only final prediction was wrong.
    with pytest.raises(ValueError, match="end_ttl_seconds"):
        Settings(state={"end_ttl_seconds": 0})


def test_mixing_seq_and_offset_numbering_is_rejected(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    publish(log, [(b"m", b'{"session_id": "m", "seq": 0, "tokens": ["a"]}'),
                  (b"m", b'{"session_id": "m", "tokens": ["b"]}')])
    summary = make_worker(clf, log, store).run()
    assert summary.outcomes == {"ok": 1, "dead_lettered": 1, "duplicate": 0, "fenced": 0,
                                "replayed": 0, "rebuilt": 0, "deferred": 0}
    assert "must not mix" in json.loads(log.values(DLQ)[0])["reason"]


def test_max_messages_bounds_the_run(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    publish(log, interleave(bbc_sessions(5, seed=10), seed=10))
    summary = make_worker(clf, log, store, max_messages=7, batch={"max_records": 3}).run()
    assert 7 <= summary.messages <= 9
    assert sum(log.committed["g"].values()) == summary.messages


class LostReplyStore(MemoryStateStore):
    """The first store() lands, then its reply is lost (Redis killed or timed out after
    executing the script): the loop sees a DependencyError and retries the same writes."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 0

    def store(self, marks, writes):
        statuses = super().store(marks, writes)
        if not self.lost:
            self.lost += 1
            from worker.errors import DependencyError
            raise DependencyError("redis", "connection lost after the script ran (simulated)")
        return statuses


def test_write_whose_reply_was_lost_still_produces_its_predictions(clf):
    log, store = FakeLog(), LostReplyStore()
    sessions = bbc_sessions(5, seed=21)
    pairs = interleave(sessions, seed=21)
    publish(log, pairs)
    w = make_worker(clf, log, store, retry={"initial_backoff_s": 0.001, "max_backoff_s": 0.002})
    w.run()
    assert store.lost == 1
    preds = predictions(log)
    # The retry answers STALE (the first attempt already moved the position): the batch's
    # predictions used to be withdrawn as "someone else advanced the session", then its
    # offsets committed, so they were lost for good.
    assert {(p["session_id"], p["seq"]) for p in preds} == {
        (json.loads(v)["session_id"], json.loads(v)["seq"]) for _, v in pairs}
    assert w.summary.outcomes["duplicate"] == 0
    assert_matches_offline(clf, sessions, preds, store)


# --- regressions of issue 10: rebalances, races, reused ids, corrupt values, refusals ------

class RebalanceInPollSource(FakeSource):
    """Its first poll gathers records of every partition, then a rebalance completes inside
    it and revokes partition 1: the batch holds a revoked partition's records next to owned
    ones (kafka-python can hand these over when the rebalance lands mid-poll)."""

    def poll(self, max_records, max_wait_ms):
        first = not self.assigned
        out = super().poll(max_records, max_wait_ms)
        if first:
            self.on_revoked([(self.topic, 1)])
            self.partitions = [p for p in self.partitions if p != 1]
        return out


def test_rebalance_inside_one_poll_drops_the_revoked_records_and_keeps_the_rest(clf):
    log, store = FakeLog(partitions=2), MemoryStateStore()
    sessions = bbc_sessions(8, seed=30)
    pairs = interleave(sessions, seed=30)
    for k, v in pairs:
        log.append(IN, k, v, partition=int(json.loads(v)["session_id"][1]) % 2)
    src = RebalanceInPollSource(log, IN)
    w = make_worker(clf, log, store, source=src)
    w.run()  # used to rejoin, empty the epochs and die with KeyError in the write
    assert src.rejoins == 0
    assert log.committed["g"] == {(IN, 0): len(log.records[(IN, 0)])}
    own = [s for s in sessions if int(s.session_id[1]) % 2 == 0]
    assert_matches_offline(clf, own, predictions(log), store)
    assert {p["partition"] for p in predictions(log)} == {0}


class RacingStore(MemoryStateStore):
    """Runs ``before_first_store`` once, right before the first write: another writer lands
    between this worker's load and its write."""

    def __init__(self, before_first_store=None):
        super().__init__()
        self.before = before_first_store

    def store(self, marks, writes):
        if self.before is not None:
            run, self.before = self.before, None
            run()
        return super().store(marks, writes)


def test_a_stale_write_is_stepped_again_not_lost(clf):
    """Two writers of one session (unkeyed records on two partitions, owned by two workers):
    the loser of the race used to withdraw its predictions and commit, losing its message."""
    log = FakeLog(partitions=2)
    shared = RacingStore()
    body = {"session_id": "race", "seq": 0, "tokens": ["the", "bank", "said"]}
    log.append(IN, None, json.dumps(body).encode(), partition=0)
    body2 = {"session_id": "race", "seq": 1, "tokens": ["shares", "rose", "sharply"]}
    log.append(IN, None, json.dumps(body2).encode(), partition=1)
    lax = {"limits": {"require_key": False}}
    a = make_worker(clf, log, shared, source=FakeSource(log, IN, partitions=[0]), **lax)
    b = make_worker(clf, log, shared, source=FakeSource(log, IN, partitions=[1]), **lax)
    shared.before = a.run  # a writes seq 0 after b loaded nothing and stepped seq 1 alone
    b.run()
    raw = shared.load(["race"])[0]
    st = decode_state(raw, 1, clf.model.config.state_size, len(clf.labels))
    assert (st.last_pos, st.tokens_seen, st.messages) == (1, 6, 2)
    want = clf.classify(body["tokens"] + body2["tokens"])
    last = last_predictions(predictions(log))["race"]
    assert last["seq"] == 1 and last["tokens_seen"] == 6
    assert max(abs(last["probs"][l] - want[l]) for l in want) <= 1e-5
    assert b.summary.outcomes["ok"] == 1 and b.summary.outcomes["deferred"] == 0


class RefusingStore(MemoryStateStore):
    """While ``refusing`` is set, every write of one session finds the stored position moved
    (a writer that keeps winning the race), so the store's own rule refuses it as STALE."""

    def __init__(self, session_id):
        super().__init__()
        self.sid, self.refusing, self.calls = session_id, True, 0

    def store(self, marks, writes):
        import dataclasses
        if self.refusing:
            self.calls += 1
            writes = [dataclasses.replace(w, expected_pos=-7) if w.session_id == self.sid else w
                      for w in writes]
        return super().store(marks, writes)


def test_a_write_that_never_lands_is_rewound_not_committed(clf):
    log = FakeLog(partitions=1)
    sessions = bbc_sessions(4, seed=31)
    pairs = interleave(sessions, seed=31)
    publish(log, pairs)
    victim = sessions[0].session_id
    store = RefusingStore(victim)
    w = make_worker(clf, log, store)
    w.process(w.source.poll(1000, 0))
    w.settle()
    first = next(r.offset for r in log.records[(IN, 0)] if json.loads(r.value)["session_id"] == victim)
    assert store.calls == 4  # the write and three attempts to step the session again
    assert log.committed["g"] == {(IN, 0): first}  # nothing at or after its message
    assert w.source.positions[(IN, 0)] == first  # rewound: redelivered next
    assert w.summary.outcomes["deferred"] == len(sessions[0].chunks)
    assert victim not in {p["session_id"] for p in predictions(log)}
    store.refusing = False
    w.run()
    assert_matches_offline(clf, sessions, predictions(log), store)


def test_crash_after_an_end_write_re_emits_the_true_final_prediction(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(3, seed=32)
    publish(log, interleave(sessions, seed=32, end=True))
    with pytest.raises(SystemExit):
        make_worker(clf, log, store, sink=FakeSink(log, crash=True)).run()
    make_worker(clf, log, store).run()
    finals = {p["session_id"]: p for p in predictions(log) if p["final"]}
    assert set(finals) == {s.session_id for s in sessions}
    for s in sessions:
        assert finals[s.session_id]["tokens_seen"] == len(s.tokens)


def test_a_reused_session_id_never_re_emits_the_old_conversation(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    old = [{"session_id": "r", "seq": i, "tokens": t, **({"end": True} if i == 2 else {})}
           for i, t in enumerate([["the", "match"], ["ended", "in"], ["a", "draw"]])]
    publish(log, [(b"r", json.dumps(m).encode()) for m in old])
    make_worker(clf, log, store).run()
    assert len(predictions(log)) == 3
    # Inside the tombstone's lifetime a new conversation reuses the id and starts at seq 0; the
    # tombstone's outbox used to answer it with the old conversation's predictions.
    new = [{"session_id": "r", "seq": i, "tokens": t} for i, t in enumerate([["shares"], ["fell"]])]
    publish(log, [(b"r", json.dumps(m).encode()) for m in new])
    # ...and a true replay of the old last message, which must still be re-emitted.
    publish(log, [(b"r", json.dumps(old[2]).encode())])
    summary = make_worker(clf, log, store).run()
    dlq = [json.loads(v) for v in log.values(DLQ)]
    assert len(dlq) == 2 and all("reused session id or seq" in d["reason"] for d in dlq)
    preds = predictions(log)
    assert len(preds) == 4 and preds[-1]["seq"] == 2 and preds[-1]["final"]
    assert summary.outcomes["dead_lettered"] == 2 and summary.outcomes["replayed"] == 1


def test_an_empty_stored_value_is_corrupt_not_a_crash(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(3, seed=33)
    publish(log, interleave(sessions, seed=33))
    victim = sessions[0].session_id
    store._data[victim] = (b"", float("inf"))  # not None: the engine read it as "no state"
    w = make_worker(clf, log, store)
    w.run()
    dlq = [json.loads(v) for v in log.values(DLQ)]
    assert len(dlq) == len(sessions[0].chunks)
    assert all("unreadable" in d["reason"] for d in dlq)
    assert w.metrics.registry.get_sample_value("gru_corrupt_states_total") == 1
    assert_matches_offline(clf, sessions[1:], predictions(log))
    assert store.load([victim]) == [b""]  # left for the operator, not overwritten


def test_batch_size_is_bounded_by_the_outbox_count():
    with pytest.raises(ValueError, match="max_records"):
        Settings(batch={"max_records": 70_000})


class SlowClaimStore(MemoryStateStore):
    """Redis is down for the first two claims."""

    def __init__(self):
        super().__init__()
        self.claims = 0

    def claim(self, partitions):
        from worker.errors import DependencyError
        self.claims += 1
        if self.claims <= 2:
            raise DependencyError("redis", "down (simulated)")
        return super().claim(partitions)


def test_the_rebalance_callback_never_waits_on_redis(clf):
    log, store = FakeLog(partitions=2), SlowClaimStore()
    publish(log, interleave(bbc_sessions(3, seed=34), seed=34))
    w = make_worker(clf, log, store, retry={"initial_backoff_s": 0.001, "max_backoff_s": 0.002})
    t0 = time.monotonic()
    w.on_assigned([(IN, 0), (IN, 1)])  # what the client calls inside poll()
    assert time.monotonic() - t0 < 0.01 and store.claims == 0 and not w.ownership.tokens
    w.source.assigned = True
    w.source.positions = {(IN, 0): 0, (IN, 1): 0}
    w.run()
    assert store.claims == 3 and len(predictions(log)) == len(log.records[(IN, 0)]) + len(
        log.records[(IN, 1)])
    assert w.metrics.registry.get_sample_value("gru_dependency_retries_total",
                                               {"dependency": "redis"}) == 2


def test_a_refused_dead_letter_falls_back_and_a_refused_prediction_never_blocks(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(3, seed=35)
    good = interleave(sessions, seed=35)
    bad = (b"x", b"\x01" * 5000)
    victim = sessions[1].session_id.encode()

    def refuse(m):
        if m.topic == DLQ and b"copy_dropped" not in m.value:
            return "MessageSizeTooLargeError (simulated)"
        if m.topic == OUT and m.key == victim:
            return "InvalidRecordError (simulated)"
        return None

    publish(log, good[:3] + [bad] + good[3:])
    w = make_worker(clf, log, store, sink=FakeSink(log, refuse=refuse))
    w.run()
    dlq = [json.loads(v) for v in log.values(DLQ)]
    assert len(dlq) == 1 and dlq[0]["offset"] == 3 and "MessageSizeTooLarge" in dlq[0]["copy_dropped"]
    reg = w.metrics.registry
    assert reg.get_sample_value("gru_dead_letter_fallbacks_total") == 1
    assert reg.get_sample_value("gru_undeliverable_total", {"topic": OUT}) == len(sessions[1].chunks)
    assert log.committed["g"] == {(IN, 0): len(good) + 1}  # the batch was not blocked


class UndecodableSource(FakeSource):
    def __init__(self, *a, fail=2, **kw):
        super().__init__(*a, **kw)
        self.fail = fail

    def poll(self, max_records, max_wait_ms):
        from worker.errors import UndecodableInput
        if self.fail:
            self.fail -= 1
            raise UndecodableInput(IN, 1, 5, RuntimeError("Libraries for zstd compression codec "
                                                          "not found"))
        return super().poll(max_records, max_wait_ms)


def test_an_undecodable_batch_is_counted_and_named_never_silent(clf, caplog):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    publish(log, interleave(bbc_sessions(2, seed=36), seed=36))
    w = make_worker(clf, log, store, source=UndecodableSource(log, IN),
                    retry={"initial_backoff_s": 0.001, "max_backoff_s": 0.002})
    with caplog.at_level("ERROR", logger="worker.loop"):
        w.run()
    assert w.metrics.registry.get_sample_value("gru_undecodable_batches_total",
                                               {"topic": IN, "partition": "1"}) == 2
    assert any("tokens[1] at offset 5" in r.getMessage() and "zstd" in r.getMessage()
               for r in caplog.records)
    assert len(predictions(log)) == len(log.records[(IN, 0)])


# --- issue 11: the log is the truth; Redis may roll back or lose everything ----------------

def _thirds(pairs):
    n = len(pairs) // 3
    return pairs[:n], pairs[n:2 * n], pairs[2 * n:]


def test_redis_rolled_back_after_commits_is_rebuilt_from_the_log(clf):
    log, store = FakeLog(partitions=2), MemoryStateStore()
    sessions = bbc_sessions(20, seed=40)
    pairs = interleave(sessions, seed=40)
    a, b, c = _thirds(pairs)
    publish(log, a)
    make_worker(clf, log, store).run()
    snap = snapshot(store)  # the snapshot a lagging replica or a backup holds
    publish(log, b)
    make_worker(clf, log, store).run()  # b applied, produced and committed
    restore(store, snap)  # failover to the replica: b's writes are gone, its commits are not
    publish(log, c)
    w = make_worker(clf, log, store)
    w.run()
    # Every session exact, as if nothing happened, and b's predictions not produced twice.
    assert_matches_offline(clf, sessions, predictions(log), store)
    assert len(predictions(log)) == len(pairs)
    reg = w.metrics.registry
    assert reg.get_sample_value("gru_state_rebuilds_total", {"reason": "rollback"}) == 2
    assert w.summary.outcomes["rebuilt"] == len(b) == reg.get_sample_value(
        "gru_rebuild_messages_total")
    assert w.summary.outcomes["ok"] == len(c) and not w.recovery.rebuilds


def test_redis_restarted_empty_is_rebuilt_from_the_log(clf):
    log, store = FakeLog(partitions=2), MemoryStateStore()
    sessions = bbc_sessions(20, seed=41)
    pairs = interleave(sessions, seed=41)
    half = len(pairs) // 2
    publish(log, pairs[:half])
    make_worker(clf, log, store).run()
    wipe(store)
    publish(log, pairs[half:])
    w = make_worker(clf, log, store)
    w.run()
    assert_matches_offline(clf, sessions, predictions(log), store)
    assert len(predictions(log)) == len(pairs)
    reg = w.metrics.registry
    assert reg.get_sample_value("gru_state_rebuilds_total", {"reason": "loss"}) == 2
    assert w.summary.outcomes["rebuilt"] == half


class WipingStore(MemoryStateStore):
    """Loses everything right after its ``at``-th write call (Redis restarted without data
    under a running worker)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def store(self, marks, writes):
        out = super().store(marks, writes)
        self.calls += 1
        if self.calls == self.at:
            wipe(self)
        return out


def test_redis_lost_under_a_running_worker_fences_it_and_the_rebuild_follows(clf):
    log, store = FakeLog(partitions=2), WipingStore(at=3)
    sessions = bbc_sessions(15, seed=42)
    pairs = interleave(sessions, seed=42)
    publish(log, pairs)
    w = make_worker(clf, log, store, batch={"max_records": 16})
    w.run()
    assert w.source.rejoins == 1  # its token was gone: fenced, rejoined, claimed again
    assert w.metrics.registry.get_sample_value("gru_state_rebuilds_total", {"reason": "loss"}) >= 1
    assert_matches_offline(clf, sessions, predictions(log), store)


def test_a_session_whose_beginning_was_never_applied_says_so(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    publish(log, [(b"late", json.dumps({"session_id": "late", "seq": 7, "tokens": ["rates"]}).encode()),
                  (b"late", json.dumps({"session_id": "late", "seq": 8, "tokens": ["rose"]}).encode()),
                  (b"new", json.dumps({"session_id": "new", "seq": 0, "tokens": ["goal"]}).encode())])
    w = make_worker(clf, log, store)
    w.run()
    ctx = {(p["session_id"], p["seq"]): p["context"] for p in predictions(log)}
    assert ctx == {("late", 7): "partial", ("late", 8): "partial", ("new", 0): "full"}
    assert w.metrics.registry.get_sample_value("gru_sessions_partial_total") == 1


def test_a_zombie_holding_a_token_from_before_a_rollback_stays_fenced(clf):
    """Integer epochs came back after a rollback: the next INCR handed out the very number a
    zombie held, and its writes passed the fence. Tokens carry a random nonce."""
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(3, seed=43)
    publish(log, interleave(sessions, seed=43))
    first = make_worker(clf, log, store)
    first.source.poll(1, 0)
    first.process([])  # token 1
    snap = snapshot(store)
    zombie = make_worker(clf, log, store)
    zombie.source.poll(1, 0)
    zombie.process([])  # token 2, taken after the snapshot
    zombie.source.positions = {(IN, 0): 0}
    restore(store, snap)  # Redis rolls back: the counter is 1 again
    owner = make_worker(clf, log, store)
    owner.source._assign()
    owner.process([])  # the counter hands out 2 again
    assert owner.ownership.tokens[(IN, 0)].split(":")[0] == zombie.ownership.tokens[(IN, 0)].split(":")[0] == "2"
    zombie.process(log.records[(IN, 0)])
    zombie.settle()
    assert zombie.summary.outcomes["fenced"] == len(log.records[(IN, 0)])
    assert store.load([s.session_id for s in sessions]) == [None] * 3 and not predictions(log)
    owner.run()
    assert_matches_offline(clf, sessions, predictions(log), store)


class RollingBackStore(MemoryStateStore):
    """Takes a snapshot after write call ``snap_at`` and rolls back to it after ``back_at``:
    Redis restored from an older snapshot under a running worker, whose token survives."""

    def __init__(self, snap_at, back_at):
        super().__init__()
        self.snap_at, self.back_at, self.calls, self.snap = snap_at, back_at, 0, None

    def store(self, marks, writes):
        out = super().store(marks, writes)
        self.calls += 1
        if self.calls == self.snap_at:
            self.snap = snapshot(self)
        if self.calls == self.back_at:
            restore(self, self.snap)
        return out


def test_redis_rolled_back_under_a_running_worker_is_caught_by_the_recorded_offset(clf):
    """The restore keeps the worker's token, so nothing fences it: the recorded offset that
    went back is what catches it, at the latest when its partition's next batch arrives,
    before anything is applied on top of the rolled-back states."""
    log, store = FakeLog(partitions=2), RollingBackStore(snap_at=2, back_at=5)
    sessions = bbc_sessions(15, seed=44)
    pairs = interleave(sessions, seed=44)
    cut = 2 * len(pairs) // 3
    publish(log, pairs[:cut])
    w = make_worker(clf, log, store, batch={"max_records": 16})
    w.run()
    publish(log, pairs[cut:])  # every partition gets a later batch
    w.run()
    assert w.source.rejoins == 0  # the token survived the restore: no fence, a rewind
    assert w.metrics.registry.get_sample_value("gru_state_rebuilds_total",
                                               {"reason": "rollback"}) >= 1
    assert w.summary.outcomes["rebuilt"] > 0
    assert_matches_offline(clf, sessions, predictions(log), store)
    assert len(predictions(log)) == len(pairs)  # what was produced is not produced again


class SplitRebalanceSource(FakeSource):
    """kafka-python's way with a rebalance that spans two polls: the first returns records of
    a partition and then revokes it (the join has begun); the second hands the partition back
    to the same member, keeping its position, which is past the records just returned."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = 0

    def poll(self, max_records, max_wait_ms):
        self.calls += 1
        if self.calls == 2:  # records polled, then the rebalance starts
            out = super().poll(5, max_wait_ms)
            self.on_revoked(list(self.positions))
            return out
        if self.calls == 3:  # the join completes: the same partitions, positions kept
            self.on_assigned(list(self.positions))
        return super().poll(max_records, max_wait_ms)


def test_a_rebalance_across_two_polls_loses_no_record(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(6, seed=45)
    pairs = interleave(sessions, seed=45)
    publish(log, pairs)
    src = SplitRebalanceSource(log, IN)
    w = make_worker(clf, log, store, source=src, batch={"max_records": 8})
    w.run()
    assert src.calls >= 3
    # The 5 records polled as the partition was revoked used to be dropped, and the position
    # kept past them: those messages were never applied, their sessions' later ones were.
    assert_matches_offline(clf, sessions, predictions(log), store)
    assert len({(p["session_id"], p["seq"]) for p in predictions(log)}) == len(pairs)


def test_batches_follow_the_latency_budget_and_lift_it_for_a_backlog(clf):
    """The loop asks the budget before each poll, passes the known lag, and exports what it
    chose. A cost model seeded at 1 ms per message allows 10 messages in a 12 ms budget
    (2 ms fixed); a backlog of more than 20 lifts the limit to max_records."""
    from worker.budget import BatchBudget

    class Seeded(BatchBudget):
        def observe(self, *measured):  # keep the seeded model
            pass

    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(4, seed=41)
    publish(log, interleave(sessions, seed=41))
    total = len(log.records[(IN, 0)])
    assert total > 25
    w = make_worker(clf, log, store, batch={"max_records": 64, "target_latency_ms": 12})
    budget = Seeded(0.012, 64, min_records=2, warmup_batches=0)
    for n in (5, 10, 20, 40):
        BatchBudget.observe(budget, n, n, 0.002 + 0.001 * n)
    w.intake.budget = budget
    n = budget.limit(0).records
    assert 8 <= n <= 10
    asked, intervals = [], []
    poll = w.source.poll
    w.source.poll = lambda n, wait: (asked.append(n), intervals.append(sys.getswitchinterval()),
                                     poll(n, wait))[-1]
    before = sys.getswitchinterval()
    try:
        w.run()
    finally:
        sys.setswitchinterval(before)
    # the first poll knows no lag yet; then a backlog while more than 20 wait, then the budget
    assert asked[0] == n and 64 in asked and asked[-1] == n
    # long GIL turns while the backlog lifts the budget, short ones otherwise
    s = w.settings.batch
    assert s.backlog_switch_interval_ms > s.switch_interval_ms
    assert intervals == [pytest.approx((s.backlog_switch_interval_ms if k == 64
                                        else s.switch_interval_ms) / 1000) for k in asked]
    backlog_polls = [i for i, n in enumerate(asked) if n == 64]
    assert backlog_polls == list(range(1, len(backlog_polls) + 1))
    reg = w.metrics.registry
    assert reg.get_sample_value("gru_batch_budget_seconds") == 0.012
    assert reg.get_sample_value("gru_batch_limit_records", {"reason": "budget"}) == n
    assert reg.get_sample_value("gru_batch_limit_records", {"reason": "backlog"}) is None  # stale
    assert reg.get_sample_value("gru_batch_cost_seconds", {"term": "per_message"}) == \
        pytest.approx(0.001, rel=0.1)
    assert_matches_offline(clf, sessions, predictions(log))


def test_commits_are_coalesced_but_never_ahead_of_acknowledgements(clf):
    """With a commit interval, settled batches are committed together; every commit covers
    only acknowledged outputs, and stopping commits everything that was acknowledged."""
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(6, seed=44)
    publish(log, interleave(sessions, seed=44))
    sink = FakeSink(log)
    w = make_worker(clf, log, store, sink=sink, batch={"max_records": 4},
                    kafka={"commit_interval_ms": 60_000})
    commits = []
    commit, commit_async = w.source.commit, w.source.commit_async

    def check(offsets):
        acked = len(log.values(OUT))  # predictions acknowledged so far, one per message here
        assert all(o <= acked for o in offsets.values()), "committed past the acknowledged"
        commits.append(dict(offsets))

    def checked(offsets):
        check(offsets)
        return commit(offsets)

    def checked_async(offsets, done):
        check(offsets)
        return commit_async(offsets, done)
    w.source.commit, w.source.commit_async = checked, checked_async
    w.run()
    total = len(log.records[(IN, 0)])
    assert w.summary.batches > 3 and len(commits) == 1  # one commit, when input paused
    assert commits[-1] == {(IN, 0): total}
    assert_matches_offline(clf, sessions, predictions(log))


def test_a_failed_asynchronous_commit_is_carried_into_the_next(clf):
    """With async_commits the loop sends commits without waiting for the coordinator. A failed one
    (here every one) is sent again with the next; stopping commits synchronously, so all
    that was acknowledged ends up committed, and no commit moves back (FakeSource asserts)."""
    log, store = FakeLog(partitions=2), MemoryStateStore()
    sessions = bbc_sessions(6, seed=45)
    publish(log, interleave(sessions, seed=45))
    w = make_worker(clf, log, store, batch={"max_records": 4}, kafka={"async_commits": True})
    w.source.fail_async = 10**6
    sent = []
    commit_async = w.source.commit_async

    def recorded(offsets, done):
        sent.append(dict(offsets))
        commit_async(offsets, done)
    w.source.commit_async = recorded
    w.run()
    assert len(sent) > 3 and not log.committed["g"].keys() - {(IN, 0), (IN, 1)}
    for earlier, later in itertools.pairwise(sent):  # nothing confirmed, so nothing dropped
        assert all(later.get(tp, -1) >= o for tp, o in earlier.items())
    assert log.committed["g"] == {(IN, p): len(log.records[(IN, p)]) for p in range(2)}
    assert_matches_offline(clf, sessions, predictions(log), store)


class CrashBeforeCommitAnswer(FakeSource):
    """Dies at the poll that would deliver the answer to its ``after``-th asynchronous commit."""

    def __init__(self, *args, after: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after, self.sent = after, 0

    def commit_async(self, offsets, done) -> None:
        self.sent += 1
        super().commit_async(offsets, done)

    def poll(self, max_records, max_wait_ms):
        if self.sent >= self.after and self._answers:
            raise SystemExit("crash with a commit in flight")
        return super().poll(max_records, max_wait_ms)


def test_a_crash_with_an_asynchronous_commit_in_flight_loses_nothing(clf):
    """The commit was sent, not answered: it counts as not made. The restart redelivers from
    the last answered commit; those messages are duplicates, their state is not touched
    again, their predictions come again (at least once), and every session ends as offline."""
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(6, seed=46)
    pairs = interleave(sessions, seed=46)
    publish(log, pairs)
    first = make_worker(clf, log, store, batch={"max_records": 4}, kafka={"async_commits": True},
                        source=CrashBeforeCommitAnswer(log, IN, after=3))
    with pytest.raises(SystemExit):
        first.run()
    committed = log.committed["g"].get((IN, 0), 0)
    written = first._taken  # every batch taken wrote its states before the crash
    assert 0 < committed < written, "the crash should leave written but uncommitted messages"
    again = make_worker(clf, log, store)
    again.run()
    assert again.summary.outcomes["duplicate"] == written - committed
    assert {(p["session_id"], p["seq"]) for p in predictions(log)} == {
        (json.loads(v)["session_id"], json.loads(v)["seq"]) for _, v in pairs}
    assert_matches_offline(clf, sessions, predictions(log), store)
