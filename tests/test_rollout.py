"""Rollout with session continuity (issue 16, part 1), tier 2: the loop with in-memory fakes.

A worker on model A takes the first part of a stream; then a worker on model B with A as the
previous model takes the rest, and new sessions. Sessions begun before the switch must equal
model A offline over all their tokens, those begun after model B, none reset; predictions say
which model made them; replays after the switch go to the model that applied the message;
once nothing is left under A (ended sessions' tombstones expired) A is unloaded.
"""

from __future__ import annotations

import json

import pytest

from worker.config import Settings
from worker.state import MemoryStateStore
from worker.writer import GRACE_MS

from .fakes import FakeLog
from .streams import assert_exact, bbc_sessions, interleave, split_stream
from .workers import ModelKeyed, make_worker, predictions, publish, rollout_worker

pytestmark = pytest.mark.fakes


def test_a_rollout_keeps_live_sessions_on_the_previous_model_until_they_drain(clf, clf_b):
    assert clf.model_id != clf_b.model_id and clf.vocab.itos != clf_b.vocab.itos
    now = [1000.0]
    log, store = FakeLog(partitions=2), MemoryStateStore(clock=lambda: now[0])
    old = bbc_sessions(10, seed=80, max_chunk=12, max_tokens=120, prefix="old")
    new = bbc_sessions(8, seed=81, max_chunk=12, max_tokens=120, prefix="new")
    before, after = split_stream(old, seed=80)
    publish(log, before)
    make_worker(clf, log, ModelKeyed(store, clf.model_id),
                batch={"max_records": 8}).run()  # model A serves
    n_before = len(predictions(log))
    assert {p["model_id"] for p in predictions(log)} == {clf.model_id}

    # The rollout: B is current, A previous; the old sessions go on, new ones begin.
    publish(log, interleave(new, seed=81, end=True) + after)
    w = rollout_worker(clf_b, clf, log, store, batch={"max_records": 8})
    summary = w.run()
    preds = predictions(log)
    assert summary.outcomes["ok"] == len(after) + sum(len(s.chunks) for s in new)
    assert summary.outcomes["dead_lettered"] == 0
    by_model = {}
    for p in preds:
        by_model.setdefault(p["session_id"].startswith("old"), set()).add(p["model_id"])
    assert by_model == {True: {clf.model_id}, False: {clf_b.model_id}}
    assert_exact(clf, old, preds)  # every token of the old sessions, none reset
    assert_exact(clf_b, new, preds)
    assert len(preds) == n_before + len(after) + sum(len(s.chunks) for s in new)
    reg = w.metrics.registry
    active = {m: reg.get_sample_value("gru_model_active_sessions", {"model_id": m})
              for m in (clf.model_id, clf_b.model_id)}
    assert active == {clf.model_id: len(old), clf_b.model_id: len(new)}

    # A replay of everything after the switch: each message goes to the model that applied
    # it (A's tombstones answer the old sessions), nothing is applied again.
    log.committed["g"].clear()
    replay = rollout_worker(clf_b, clf, log, store, batch={"max_records": 64})
    again = replay.run()
    assert again.outcomes["ok"] == 0 and again.outcomes["dead_lettered"] == 0
    assert again.outcomes["duplicate"] == len(before) + len(after) + sum(
        len(s.chunks) for s in new)
    re_emitted = predictions(log)[len(preds):]
    assert re_emitted and all(p["model_id"] == (clf.model_id if p["session_id"].startswith(
        "old") else clf_b.model_id) for p in re_emitted)

    # Draining: every old session has ended, their tombstones still answer replays.
    models = replay.models
    view = replay.store
    models.check_drain(view)
    assert reg.get_sample_value("gru_model_drain_progress", {"model_id": clf.model_id}) is None
    rreg = replay.metrics.registry
    assert rreg.get_sample_value("gru_model_stored_sessions",
                                 {"model_id": clf.model_id, "state": "ended"}) == len(old)
    assert rreg.get_sample_value("gru_model_stored_sessions",
                                 {"model_id": clf_b.model_id, "state": "ended"}) == len(new)
    assert rreg.get_sample_value("gru_model_drain_progress", {"model_id": clf.model_id}) == 0
    models.between_batches()
    assert models.previous is not None  # not drained: still loaded
    now[0] += Settings().state.end_ttl_seconds + GRACE_MS / 1000 + 1  # the tombstones expire
    models.check_drain(view)
    assert rreg.get_sample_value("gru_model_drain_progress", {"model_id": clf.model_id}) == 1
    models.between_batches()
    assert models.previous is None and models.namespaces == (None,)
    assert rreg.get_sample_value("gru_models_unloaded_total") == 1
    assert rreg.get_sample_value("gru_model_info", {"model_id": clf.model_id, "device": "cpu",
                                                    "role": "previous"}) is None


def test_a_live_old_session_is_served_by_the_old_model_and_a_reused_id_by_the_new(clf, clf_b):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    msgs = [{"session_id": "live", "seq": 0, "tokens": ["the", "match", "ended"]},
            {"session_id": "done", "seq": 0, "tokens": ["shares", "fell"], "end": True}]
    publish(log, [(m["session_id"].encode(), json.dumps(m).encode()) for m in msgs])
    make_worker(clf, log, ModelKeyed(store, clf.model_id)).run()
    later = [{"session_id": "live", "seq": 1, "tokens": ["in", "a", "draw"]},
             # a new conversation under an ended session's id, numbered after it
             {"session_id": "done", "seq": 1, "tokens": ["profits", "rose"]},
             {"session_id": "fresh", "seq": 0, "tokens": ["the", "film", "won"]}]
    publish(log, [(m["session_id"].encode(), json.dumps(m).encode()) for m in later])
    rollout_worker(clf_b, clf, log, store).run()
    last = {p["session_id"]: p for p in predictions(log)[2:]}
    assert last["live"]["model_id"] == clf.model_id and last["live"]["tokens_seen"] == 6
    assert last["done"]["model_id"] == clf_b.model_id and last["done"]["tokens_seen"] == 2
    assert last["fresh"]["model_id"] == clf_b.model_id
    want = clf.classify(["the", "match", "ended", "in", "a", "draw"])
    assert max(abs(last["live"]["probs"][l] - want[l]) for l in want) <= 1e-5
    # Stored: "live" under A only, "done" and "fresh" under B (and "done"'s tombstone under A).
    under_a = store.load(["live", "done", "fresh"], None, (clf.model_id,))
    under_b = store.load(["live", "done", "fresh"], None, (clf_b.model_id,))
    assert [v is not None for v in under_a] == [True, True, False]
    assert [v is not None for v in under_b] == [False, True, True]
