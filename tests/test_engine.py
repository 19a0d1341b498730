"""Tier 1: the columnar engine against the per-value codec it replaces on the hot path.

The engine decodes a batch of loaded values at once and encodes the new ones as structured
arrays; ``worker.codec`` is the per-value reference. Both must agree byte for byte."""

from __future__ import annotations

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


def msg(sid, seq, ids, end=False, offset=0):
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
