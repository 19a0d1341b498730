"""Output control (issue 16, part 3): ``GRU_OUTPUT__EMIT`` and ``MIN_CONFIDENCE``.

Tier 1: the decision function on hand-made steps. Tier 2: the loop with in-memory fakes: for
each policy the emitted predictions are exactly the expected subset, computed offline, also
across small batches (the last emitted label comes from the stored state), a restart, a crash
between the state write and the produce, and a replay of the whole input (a suppressed
prediction is never emitted later by a replay).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from worker.config import Settings
from worker.output import OutputPolicy, decide

from worker.state import MemoryStateStore

from .fakes import FakeLog, FakeSink
from .streams import bbc_sessions, interleave
from .workers import IN, make_worker, predictions, publish


# --- tier 1 -------------------------------------------------------------------------------

def run(policy, labels, conf, final, segment, init):
    return decide(policy, np.array(labels), np.array(conf, np.float32), np.array(final, bool),
                  np.array(segment), np.array(init)).emit.tolist()


@pytest.mark.unit
def test_change_emits_the_first_label_and_each_change_per_segment():
    labels = [0, 0, 1, 1, 0, 2, 2, 2]
    conf = [.9] * 8
    final = [0, 0, 0, 0, 1, 0, 0, 0]
    segment = [0, 0, 0, 0, 0, 1, 1, 2]  # seg 1: a new conversation; seg 2: another session
    init = [-1, -1, 2]  # segment 2 continues a state whose last emitted label was 2
    assert run(OutputPolicy("change"), labels, conf, final, segment, init) == [
        True, False, True, False, True, True, False, False]
    d = decide(OutputPolicy("change"), np.array(labels), np.array(conf), np.array(final, bool),
               np.array(segment), np.array(init))
    assert d.last_label.tolist() == [0, 2, 2]


@pytest.mark.unit
def test_min_confidence_applies_to_every_policy_and_change_compares_with_what_was_emitted():
    labels = [0, 1, 0, 1, 1]
    conf = [.9, .4, .9, .95, .3]
    final = [0, 0, 0, 0, 1]
    seg = [0] * 5
    every = OutputPolicy("every", 0.5)
    assert run(every, labels, conf, final, seg, [-1]) == [True, False, True, True, False]
    # Label 1 at step 1 was not emitted (too unsure), so step 2's label 0 is no change.
    change = OutputPolicy("change", 0.5)
    assert run(change, labels, conf, final, seg, [-1]) == [True, False, False, True, False]
    assert run(OutputPolicy("final"), labels, conf, final, seg, [-1]) == [0, 0, 0, 0, 1]
    assert run(OutputPolicy("final", 0.5), labels, conf, final, seg, [-1]) == [0] * 5
    last = decide(change, np.array(labels), np.array(conf), np.array(final, bool),
                  np.array(seg), np.array([-1])).last_label
    assert last.tolist() == [1]


@pytest.mark.unit
def test_settings_default_to_every_and_reject_unknown_policies():
    assert Settings().output.emit == "every" and Settings().output.min_confidence == 0.0
    with pytest.raises(ValueError):
        Settings(output={"emit": "sometimes"})
    with pytest.raises(ValueError):
        Settings(output={"min_confidence": 1.5})


# --- tier 2 -------------------------------------------------------------------------------

def expected(clf, sessions, policy: OutputPolicy) -> tuple[set, dict]:
    """The (session, seq) pairs a policy emits, from the model run offline over each prefix;
    and each one's label."""
    want, labels = set(), {}
    for s in sessions:
        last, seen = None, []
        for seq, chunk in enumerate(s.chunks):
            seen += chunk
            probs = clf.classify(seen)
            label = max(probs, key=probs.get)
            conf = probs[label]
            assert abs(conf - policy.min_confidence) > 1e-4, "too close to call"
            final = seq == len(s.chunks) - 1
            ok = conf >= policy.min_confidence
            emit = ok and (policy.emit == "every" or (policy.emit == "final" and final)
                           or (policy.emit == "change" and label != last))
            if ok and policy.emit == "change":
                last = label
            if emit:
                want.add((s.session_id, seq))
                labels[(s.session_id, seq)] = label
    return want, labels


def emitted(log) -> list[tuple[str, int]]:
    return [(p["session_id"], p["seq"]) for p in predictions(log)]


POLICIES = [OutputPolicy("every"), OutputPolicy("change"), OutputPolicy("final"),
            OutputPolicy("every", 0.55), OutputPolicy("change", 0.55)]


@pytest.mark.fakes
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.emit}-{p.min_confidence}")
def test_each_policy_emits_exactly_the_expected_subset_across_restart_crash_and_replay(clf, policy):
    log, store = FakeLog(partitions=2), MemoryStateStore()
    sessions = bbc_sessions(12, seed=60, max_chunk=12, max_tokens=120)
    pairs = interleave(sessions, seed=60, end=True)
    publish(log, pairs)
    want, labels = expected(clf, sessions, policy)
    out = {"emit": policy.emit, "min_confidence": policy.min_confidence}
    small = {"max_records": 5}
    # 1. A worker stops a third of the way (a restart: state survives, decisions go on).
    first = make_worker(clf, log, store, output=out, batch=small, max_messages=len(pairs) // 3)
    first.run()
    # 2. The next one crashes after writing its first batch, before producing it.
    with pytest.raises(SystemExit):
        make_worker(clf, log, store, output=out, batch=small,
                    sink=FakeSink(log, crash=True)).run()
    # 3. The next one finishes: the crashed batch is redelivered, re-emitted from outboxes.
    last = make_worker(clf, log, store, output=out, batch=small)
    last.run()
    got = emitted(log)
    assert set(got) == want
    for p in predictions(log):
        assert p["label"] == labels[(p["session_id"], p["seq"])]
    # 4. The whole input is replayed (a group reset): only duplicates, and what is
    # re-emitted from the outboxes is among what was emitted, never a suppressed one.
    n = len(got)
    log.committed["g"].clear()
    replay = make_worker(clf, log, store, output=out, batch={"max_records": 64})
    summary = replay.run()
    assert summary.outcomes["duplicate"] == len(pairs) and summary.outcomes["ok"] == 0
    again = emitted(log)[n:]
    assert set(again) <= want and len(again) == summary.outcomes["replayed"]
    if policy.emit == "final" or policy.min_confidence:
        assert len(want) < len(pairs)  # the test does exercise suppression


@pytest.mark.fakes
def test_suppressed_predictions_are_counted_by_reason(clf):
    log, store = FakeLog(partitions=1), MemoryStateStore()
    sessions = bbc_sessions(6, seed=61, max_chunk=10, max_tokens=80)
    pairs = interleave(sessions, seed=61, end=True)
    publish(log, pairs)
    policy = OutputPolicy("change", 0.55)
    want, _ = expected(clf, sessions, policy)
    w = make_worker(clf, log, store, output={"emit": "change", "min_confidence": 0.55})
    summary = w.run()
    reg = w.metrics.registry
    low = reg.get_sample_value("gru_predictions_suppressed_total", {"reason": "min_confidence"})
    pol = reg.get_sample_value("gru_predictions_suppressed_total", {"reason": "policy"})
    assert low + pol == len(pairs) - len(want) and low > 0 and pol > 0
    assert reg.get_sample_value("gru_predictions_total") == len(want) == len(predictions(log))
    assert summary.outcomes["ok"] == len(pairs)  # applied, whether emitted or not
    assert {json.loads(v)["session_id"] for _, v in pairs} >= {s for s, _ in want}
    assert log.committed["g"] == {(IN, 0): len(pairs)}
