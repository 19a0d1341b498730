"""Tier 1: the columnar engine against the per-value codec it replaces on the hot path.

The engine decodes a batch of loaded values at once and encodes the new ones as structured
arrays; ``worker.codec`` is the per-value reference. Both must agree byte for byte."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from model.gru import GRUClassifier, ModelConfig
from worker.codec import (OutboxEntry, PosKind, SessionState, decode_outbox, decode_state,
                          encode_state, token_digest)
from worker.engine import Engine, decode_states
from worker.messages import TokenMessage
from worker.ports import Record

pytestmark = pytest.mark.unit

L, H, C = 2, 6, 3


def state(rng, ended=False, partial=False, n_out=1, seq=True) -> SessionState:
    h = rng.standard_normal((L, H)).astype(np.float32)
    out = tuple(OutboxEntry(10 + i, i, 5 * i, ended and i == n_out - 1, token_digest([i, 1], False),
                            tuple(rng.random(C).astype(np.float32).tolist())) for i in range(n_out))
    label = int(rng.integers(-1, C))
    return SessionState(h, 10 + n_out, PosKind.SEQ if seq else PosKind.OFFSET, 42, 7, ended, out,
                        partial, None if label < 0 else label,
                        tuple(int(x) for x in rng.integers(0, 99, C)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 12), f16=st.booleans())
def test_batch_decode_equals_the_per_value_decode(seed, n, f16):
    rng = np.random.default_rng(seed)
    raws: list[bytes | None] = []
    for i in range(n):
        kind = rng.integers(0, 6)
        if kind == 0:
            raws.append(None)
        elif kind == 1:
            raws.append(bytes(rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8)))
        else:
            s = state(rng, ended=bool(kind == 2), partial=bool(rng.integers(0, 2)),
                      n_out=int(rng.integers(0, 4)), seq=bool(rng.integers(0, 2)))
            raw = encode_state(s, C, "float16" if f16 else "float32")
            raws.append(raw if kind != 5 else raw[:-1])  # kind 5: truncated, corrupt
    got = decode_states(raws, L, H, C)
    for i, raw in enumerate(raws):
        if raw is None:
            assert not got.exists[i] and i not in got.corrupt
            continue
        try:
            want = decode_state(raw, L, H, C)
        except ValueError as e:
            assert got.corrupt[i] == str(e)
            continue
        assert got.exists[i] and i not in got.corrupt
        assert (got.last_pos[i], bool(got.seq_kind[i]), got.tokens[i], got.messages[i],
                bool(got.ended[i]), bool(got.partial[i])) == (
            want.last_pos, want.pos_kind == PosKind.SEQ, want.tokens_seen, want.messages,
            want.ended, want.partial)
        assert got.last_label[i] == (-1 if want.last_label is None else want.last_label)
        if not want.ended:
            assert np.array_equal(got.h[i], want.h)
            assert got.first[i].tolist() == list(want.first_seen)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = GRUClassifier(ModelConfig(vocab_size=50, num_labels=C, embed_dim=8, hidden_size=H,
                                      num_layers=L))
    return Engine(model)


_offsets = itertools.count(1000)


def msg(sid, seq, ids, end=False, offset=None):
    """A message at the next offset of the partition (records never share one)."""
    offset = next(_offsets) if offset is None else offset
    return TokenMessage(sid, seq, ids, end, Record("t", 0, offset, sid.encode(), b"", 1))


def test_engine_values_equal_the_codec_encoding(engine):
    """Whatever the batch (several messages per session, an end, seq and offset numbering,
    a session with a state and one without), each new value is what encode_state writes."""
    rng = np.random.default_rng(1)
    loaded = {"a": encode_state(state(rng), C), "b": None, "c": None}
    msgs = [msg("a", 12, [1, 2, 3]), msg("b", 0, [4]), msg("a", 13, [5, 6], end=True),
            msg("c", None, [7, 8], offset=40), msg("c", None, [9], offset=41),
            msg("b", 3, [10, 11, 12, 13])]
    res = engine.apply(msgs, loaded)
    assert {u.session_id for u in res.updates} == {"a", "b", "c"}
    for u in res.updates:
        st_ = decode_state(u.value, L, H, C)
        assert encode_state(st_, C) == u.value
        preds = u.predictions
        assert [e.position for e in decode_outbox(u.value)] == [
            (p.seq if u.session_id != "c" else p.record.offset) for p in preds]
        assert [e.digest for e in decode_outbox(u.value)] == [
            token_digest(m.token_ids, m.end) for m in msgs if m.session_id == u.session_id]
    a = next(u for u in res.updates if u.session_id == "a")
    assert decode_state(a.value, L, H, C).ended and a.predictions[-1].final
    b = next(u for u in res.updates if u.session_id == "b")
    assert decode_state(b.value, L, H, C).tokens_seen == 5


def test_engine_step_equals_the_model_offline(engine):
    """Three messages of one session in one batch (three rounds) equal one forward pass."""
    msgs = [msg("s", 0, [1, 2]), msg("s", 1, [3]), msg("s", 2, [4, 5, 6])]
    res = engine.apply(msgs, {"s": None})
    with torch.inference_mode():
        logits = engine.stepper.model(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    want = torch.softmax(logits[0, -1], -1).numpy()
    got = np.array(res.updates[0].predictions[-1].probs)
    assert np.abs(got - want).max() <= 1e-5


def test_a_seq_jump_past_max_seq_gap_is_dead_lettered_and_changes_nothing(engine):
    """Issue 26, F2: one record with seq 2^53 - 1 used to move a session so far ahead that its
    own next messages were silent duplicates for as long as the state lived. A jump of more
    than max_seq_gap past the session's last position (in the store, or earlier in the
    batch) is rejected with the reason, and the session goes on as if it never came."""
    gap = engine.max_seq_gap
    first = engine.apply([msg("s", 0, [1, 2]), msg("s", 1, [3])], {"s": None})
    stored = first.updates[0].value
    batch = [msg("s", 2**53 - 1, [4]), msg("s", 2 + gap, [5]), msg("s", 2, [6]),
             msg("s", 3 + gap, [7]), msg("s", 2 + gap, [8])]
    res = engine.apply(batch, {"s": stored})
    reasons = [r.reason for r in res.rejections]
    assert len(reasons) == 3 and all(f"more than max_seq_gap={gap}" in r for r in reasons)
    assert "seq 9007199254740991 of session 's' jumps 9007199254740990 past its last " \
           "position 1" in reasons[0]
    assert [p.seq for p in res.updates[0].predictions] == [2, 2 + gap]
    assert decode_state(res.updates[0].value, L, H, C).last_pos == 2 + gap
    # nothing of a rejected record reaches the state: the same as without it
    clean = engine.apply([batch[2], batch[4]], {"s": stored})
    assert res.updates[0].value == clean.updates[0].value


def test_the_seq_gap_also_bounds_an_ended_sessions_next_conversation(engine):
    """An ended session's id may begin a new conversation numbered after its tombstone, but
    not past it by more than the gap; a session with nothing stored may begin at any seq
    (after expiry or a loss, it goes on marked partial), and offsets are not the producer's
    to choose."""
    gap = engine.max_seq_gap
    ended = engine.apply([msg("e", 0, [1]), msg("e", 1, [2], end=True)], {"e": None})
    tomb = ended.updates[0].value
    res = engine.apply([msg("e", 2 + gap, [3])], {"e": tomb})
    assert not res.updates and "max_seq_gap" in res.rejections[0].reason
    res = engine.apply([msg("e", 1 + gap, [3])], {"e": tomb})
    assert res.updates[0].started and not res.rejections
    fresh = engine.apply([msg("n", 10**9, [1])], {"n": None})
    assert fresh.updates and fresh.partial_sessions == {"n"}
    offsets = engine.apply([msg("o", None, [1], offset=5), msg("o", None, [2], offset=10**9)],
                           {"o": None})
    assert not offsets.rejections and len(offsets.updates[0].predictions) == 2


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), buckets=st.booleans())
def test_any_batch_equals_stepping_each_message_in_turn(engine, seed, buckets):
    """However a batch mixes them (one short message, several of one session, long ones, an
    empty closing message, a conversation begun again after an end), each prediction and
    each new state equal the model stepped one message at a time, in order; also through
    the bucketed (CUDA-graph shaped) step."""
    rng = np.random.default_rng(seed)
    model = engine.stepper.model
    msgs, want = [], {}
    for s in range(int(rng.integers(1, 7))):
        sid, seq, h, ended = f"s{s}", 0, model.initial_state(1), False
        for _ in range(int(rng.integers(1, 6))):
            n = int(rng.choice([0, 1, 3, 17, 40, 90]))
            end = n == 0 or bool(rng.random() < 0.2)
            ids = rng.integers(1, 50, n).tolist()
            if ended:
                h = model.initial_state(1)
            h, p = model.step(h, torch.tensor([ids or [0]]), torch.tensor([n]))
            msgs.append(msg(sid, seq, ids, end=end))
            want[(sid, seq)] = p[0].numpy()
            seq, ended = seq + 1, end
        want[sid] = None if ended else h[:, 0].numpy()
    order = rng.permutation(len(msgs))  # interleaved, each session's order kept
    by_sid: dict = {}
    for m in msgs:
        by_sid.setdefault(m.session_id, []).append(m)
    mixed = [by_sid[msgs[i].session_id].pop(0) for i in order]
    saved, engine.stepper.buckets = engine.stepper.buckets, buckets
    try:
        res = engine.apply(mixed, {m.session_id: None for m in mixed})
    finally:
        engine.stepper.buckets = saved
    assert not res.rejections
    for u in res.updates:
        for p in u.predictions:
            assert np.abs(np.array(p.probs) - want[(u.session_id, p.seq)]).max() <= 1e-5
        st_ = decode_state(u.value, L, H, C)
        if want[u.session_id] is None:
            assert st_.ended
        else:
            assert np.abs(st_.h - want[u.session_id]).max() <= 1e-5
