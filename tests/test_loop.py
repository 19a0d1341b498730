"""Tier 2: the whole loop with in-memory fakes for Kafka and the state store."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

import model
from worker.config import Settings
from worker.engine import Engine
from worker.loop import Worker
from worker.metrics import Metrics
from worker.state import MemoryStateStore, decode_state

from .fakes import FakeLog, FakeSink, FakeSource
from .streams import bbc_sessions, interleave

IN, OUT, DLQ = "tokens", "predictions", "tokens.dlq"


@pytest.fixture(scope="module")
def clf(tiny_model_dir):
    return model.load(tiny_model_dir)


def make_worker(clf, log, store, sink=None, source=None, **settings):
    s = Settings(idle_exit_s=0.05, **settings)
    engine = Engine(clf.model, ttl_ms=s.redis.ttl_seconds * 1000,
                    end_ttl_ms=s.redis.end_ttl_seconds * 1000)
    metrics = Metrics(CollectorRegistry())
    return Worker(s, engine, store, source or FakeSource(log, IN), sink or FakeSink(log), metrics,
                  clf.labels, clf.model_id, clf.encode, len(clf.vocab))


def publish(log, pairs):
    for key, value in pairs:
        log.append(IN, key, value)


def predictions(log):
    return [json.loads(v) for v in log.values(OUT)]


def final_by_session(preds):
    last = {}
    for p in preds:
        if p["session_id"] not in last or p["seq"] >= last[p["session_id"]]["seq"]:
            last[p["session_id"]] = p
    return last


def assert_matches_offline(clf, sessions, preds, store=None):
    last = final_by_session(preds)
    for s in sessions:
        want = clf.classify(s.tokens)
        got = last[s.session_id]
        assert got["tokens_seen"] == len(s.tokens)
        assert max(abs(got["probs"][l] - want[l]) for l in want) <= 1e-5, s.session_id
        if store is not None:
            raw = store.load([s.session_id])[0]
            st = decode_state(raw, 1, clf.model.config.hidden_size, len(clf.labels))
            assert st.tokens_seen == len(s.tokens)


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
    zombie.source.poll(1, 0)  # joins: takes epoch 1 for partition 0, reads nothing yet
    zombie.source.positions = {(IN, 0): 0}
    owner = make_worker(clf, log, store, source=FakeSource(log, IN, group="g"))
    owner.source._assign()  # the rebalance gives partition 0 to the owner: epoch 2
    records = log.records[(IN, 0)]
    zombie.process(records)  # the paused worker wakes up with its old epoch
    assert store.load([s.session_id for s in sessions]) == [None, None, None]
    assert not predictions(log) and not log.committed["g"]
    assert zombie.summary.outcomes["fenced"] == len(records)
    assert zombie.source.rejoins == 1 and not zombie.epochs
    assert zombie.metrics.registry.get_sample_value("gru_fenced_partitions_total") == 1
    owner.process(records)
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
    for fragment in ["not valid UTF-8 JSON", "tokens must be a list", "tokens has no tokens",
                     "token_ids[1]=999999 is out of range for vocab size",
                     "session_id is required", "over max_tokens_per_message=4096",
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
        st = decode_state(store.load([s.session_id])[0], 1, 32, 5)
        assert st.ended and st.h.size == 0  # the hidden state is gone; a tombstone remains
    log.committed["g"].clear()
    summary = make_worker(clf, log, store).run()
    assert summary.outcomes["ok"] == 0 and summary.outcomes["duplicate"] > 0


def test_end_with_zero_end_ttl_deletes_the_key(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(2, seed=9)
    publish(log, interleave(sessions, seed=9, end=True))
    make_worker(clf, log, store, redis={"end_ttl_seconds": 0}).run()
    assert store.load([s.session_id for s in sessions]) == [None, None]
    assert len(store) == 0


def test_mixing_seq_and_offset_numbering_is_rejected(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    publish(log, [(b"m", b'{"session_id": "m", "seq": 0, "tokens": ["a"]}'),
                  (b"m", b'{"session_id": "m", "tokens": ["b"]}')])
    summary = make_worker(clf, log, store).run()
    assert summary.outcomes == {"ok": 1, "dead_lettered": 1, "duplicate": 0, "fenced": 0, "replayed": 0}
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

    def store(self, writes):
        statuses = super().store(writes)
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
