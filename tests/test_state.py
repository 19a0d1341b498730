"""Tier 1 and 3: the state codec, and the write script's cases on both store implementations."""

import uuid

import numpy as np
import pytest
import redis
from hypothesis import given, settings, strategies as st

from worker.state import (Keys, MemoryStateStore, OutboxEntry, PosKind, RedisStateStore,
                          SessionState, StateCorrupt, StateWrite, WriteStatus, decode_state,
                          encode_state)


@settings(max_examples=50, deadline=None)
@given(layers=st.integers(1, 3), hidden=st.integers(1, 40), labels=st.integers(1, 6),
       n_out=st.integers(0, 3), pos=st.integers(0, 2**53 - 1), ended=st.booleans(),
       seed=st.integers(0, 2**31))
def test_codec_roundtrip(layers, hidden, labels, n_out, pos, ended, seed):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((layers, hidden)).astype(np.float32)
    outbox = tuple(OutboxEntry(pos - i, i, 10 * i, i == 0, tuple(float(x) for x in
                   rng.random(labels).astype(np.float32))) for i in range(n_out))
    s = SessionState(h, pos, PosKind.SEQ, 123, 4, ended, outbox)
    raw = encode_state(s, labels)
    back = decode_state(raw, layers, hidden, labels)
    assert back.last_pos == pos and back.pos_kind == PosKind.SEQ and back.ended == ended
    assert back.tokens_seen == 123 and back.messages == 4 and back.outbox == outbox
    if ended:
        assert back.h.shape == (0, 0)
    else:
        assert np.array_equal(back.h, h)
    assert len(raw) == 36 + (0 if ended else layers * hidden * 4) + n_out * (25 + 4 * labels)


def test_float16_state_is_half_the_size_and_close():
    h = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32) / 3
    s = SessionState(h, 5, PosKind.OFFSET)
    raw16, raw32 = encode_state(s, 5, "float16"), encode_state(s, 5)
    assert len(raw16) - 36 == (len(raw32) - 36) // 2
    assert np.abs(decode_state(raw16, 2, 128, 5).h - h).max() < 1e-3


def test_corrupt_values_are_named():
    good = encode_state(SessionState(np.zeros((1, 4), np.float32), 1, PosKind.SEQ), 3)
    with pytest.raises(StateCorrupt, match="magic"):
        decode_state(b"XXXX" + good[4:], 1, 4, 3)
    with pytest.raises(StateCorrupt, match="does not match the model"):
        decode_state(good, 1, 8, 3)
    with pytest.raises(StateCorrupt, match="header implies"):
        decode_state(good[:-1], 1, 4, 3)
    with pytest.raises(StateCorrupt, match="shorter than its header"):
        decode_state(good[:10], 1, 4, 3)


def value(pos):
    return encode_state(SessionState(np.ones((1, 2), np.float32) * pos, pos, PosKind.SEQ), 2)


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryStateStore()
        return
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    yield RedisStateStore(client, Keys(prefix, "m1", "g"))
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


TP = ("tokens", 0)


def test_write_script_cases(store):
    (epoch,) = store.acquire_epochs([TP]).values()
    w = lambda sid, exp, new, ttl=60_000, e=epoch: StateWrite(sid, TP, e, exp, new, value(new), ttl)  # noqa: E731
    assert store.store([w("a", None, 0), w("b", None, 3)]) == [WriteStatus.OK, WriteStatus.OK]
    assert store.load(["a", "b", "c"]) == [value(0), value(3), None]
    # at or before the stored position: rejected, value unchanged
    assert store.store([w("a", 0, 0), w("b", 3, 2)]) == [WriteStatus.STALE, WriteStatus.STALE]
    # expected position must match what is stored (a lost race)
    assert store.store([w("a", 5, 6), w("c", 1, 2), w("a", None, 9)]) == [WriteStatus.STALE] * 3
    assert store.store([w("a", 0, 1)]) == [WriteStatus.OK]
    assert store.load(["a", "b"]) == [value(1), value(3)]
    # ttl 0 deletes
    assert store.store([w("b", 3, 4, ttl=0)]) == [WriteStatus.OK]
    assert store.load(["b"]) == [None]
    # a newer epoch fences the older writer, whatever the state
    (newer,) = store.acquire_epochs([TP]).values()
    assert newer == epoch + 1
    assert store.store([w("a", 1, 2), w("z", None, 0)]) == [WriteStatus.FENCED] * 2
    assert store.load(["a", "z"]) == [value(1), None]
    assert store.store([w("a", 1, 2, e=newer)]) == [WriteStatus.OK]


def test_epochs_are_per_partition(store):
    e = store.acquire_epochs([("t", 0), ("t", 1)])
    e2 = store.acquire_epochs([("t", 1)])
    assert e2[("t", 1)] == e[("t", 1)] + 1
    ok = StateWrite("s", ("t", 0), e[("t", 0)], None, 1, value(1), 1000)
    assert store.store([ok]) == [WriteStatus.OK]


def test_redis_ttl_is_set_and_keys_are_namespaced():
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    keys = Keys(f"test-{uuid.uuid4().hex[:8]}", "model9", "grp")
    store = RedisStateStore(client, keys)
    try:
        (e,) = store.acquire_epochs([TP]).values()
        store.store([StateWrite("sess", TP, e, None, 1, value(1), 5000)])
        assert 0 < client.pttl(keys.session("sess")) <= 5000
        assert keys.session("sess") == f"{keys.prefix}:model9:s:sess"
        assert sorted(k.decode() for k in client.scan_iter(f"{keys.prefix}:*")) == sorted(
            [keys.session("sess"), keys.epoch("tokens", 0)])
    finally:
        client.delete(*client.scan_iter(f"{keys.prefix}:*"))


def test_memory_store_expires_with_its_clock():
    now = [0.0]
    store = MemoryStateStore(clock=lambda: now[0])
    (e,) = store.acquire_epochs([TP]).values()
    store.store([StateWrite("s", TP, e, None, 1, value(1), 1000)])
    now[0] = 0.999
    assert store.load(["s"]) == [value(1)]
    now[0] = 1.0
    assert store.load(["s"]) == [None] and len(store) == 0
