"""Tier 1 and 3: the state codec, and the write rule on both store implementations."""

import uuid

import numpy as np
import pytest
import redis
from hypothesis import given, settings, strategies as st

from worker.codec import (HEADER, OUTBOX_ENTRY, OutboxEntry, PosKind, SessionState, StateCorrupt,
                          decode_state, encode_state, token_digest, write_status)
from worker.ports import PartitionMark, StateWrite, WriteStatus
from worker.state import Keys, MemoryStateStore, RedisStateStore

from .services_support import REDIS_URL


@pytest.mark.unit
@settings(max_examples=50, deadline=None)
@given(layers=st.integers(1, 3), hidden=st.integers(1, 40), labels=st.integers(1, 6),
       n_out=st.integers(0, 3), pos=st.integers(0, 2**53 - 1), ended=st.booleans(),
       partial=st.booleans(), seed=st.integers(0, 2**31))
def test_codec_roundtrip(layers, hidden, labels, n_out, pos, ended, partial, seed):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((layers, hidden)).astype(np.float32)
    outbox = tuple(OutboxEntry(pos - i, i, 10 * i, i == 0, token_digest([i, 2], i == 0),
                               tuple(float(x) for x in rng.random(labels).astype(np.float32)),
                               suppressed=bool(i % 2), partial=bool(i % 3 == 1))
                   for i in range(n_out))
    last_label = int(rng.integers(0, labels)) if seed % 3 else None
    first = tuple(int(x) for x in rng.integers(0, 1000, labels))
    s = SessionState(h, pos, PosKind.SEQ, 123, 4, ended, outbox, partial, last_label, first)
    raw = encode_state(s, labels)
    back = decode_state(raw, layers, hidden, labels)
    assert back.last_pos == pos and back.pos_kind == PosKind.SEQ and back.ended == ended
    assert back.tokens_seen == 123 and back.messages == 4 and back.outbox == outbox
    assert back.partial == partial and back.last_label == last_label
    if ended:
        assert back.h.shape == (0, 0) and back.first_seen is None
    else:
        assert np.array_equal(back.h, h) and back.first_seen == first
    assert len(raw) == HEADER.size + (0 if ended else layers * hidden * 4 + 4 * labels) + n_out * (
        OUTBOX_ENTRY.size + 4 * labels)


def encode_v2(s: SessionState, num_labels: int) -> bytes:
    """A value as workers before the GRS3 format wrote it: 36-byte header, no first-seen
    counts, outbox marks holding only the final bit."""
    from worker.codec import ENDED, HEADER_V2, PARTIAL, SEQ
    flags = (SEQ if s.pos_kind == PosKind.SEQ else 0) | (ENDED if s.ended else 0) | (
        PARTIAL if s.partial else 0)
    h = np.zeros((0, 0), np.float32) if s.ended else s.h
    parts = [HEADER_V2.pack(b"GRS2", flags, *h.shape, num_labels, len(s.outbox), s.last_pos,
                            s.tokens_seen, s.messages), h.astype("<f4").tobytes()]
    for e in s.outbox:
        parts += [OUTBOX_ENTRY.pack(e.position, e.seq, e.tokens_seen, e.final, e.digest),
                  np.asarray(e.probs, "<f4").tobytes()]
    return b"".join(parts)


@pytest.mark.unit
@pytest.mark.parametrize("ended", [False, True])
def test_values_of_the_previous_format_are_still_read(ended):
    """An upgrade must not cut live sessions: GRS2 values decode (no first-seen counts, no
    lineage; the last emitted label is the top label of the outbox's last emitted entry, so
    ``emit=change`` goes on comparing with it), per value and in the engine's batch decode,
    and pass the write rule."""
    from worker.engine import decode_states
    h = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = (OutboxEntry(7, 7, 30, ended, token_digest([1], ended), (0.25, 0.75)),)
    s = SessionState(h, 7, PosKind.SEQ, 30, 8, ended, out, False)
    raw = encode_v2(s, 2)
    back = decode_state(raw, 2, 3, 2)
    assert (back.last_pos, back.tokens_seen, back.messages, back.ended, back.outbox) == (
        7, 30, 8, ended, out)
    assert back.last_label == 1 and back.first_seen is None
    assert (back.start_offset, back.last_offset, back.last_ts) == (-1, -1, -1)
    if not ended:
        assert np.array_equal(back.h, h)
    got = decode_states([raw, None], 2, 3, 2)
    assert got.exists[0] and not got.corrupt and got.last_pos[0] == 7 and got.ended[0] == ended
    assert got.last_label[0] == 1 and not got.first[0].any() and got.start_offset[0] == -1
    assert write_status(raw, 7, 8) == WriteStatus.OK


@pytest.mark.unit
@pytest.mark.parametrize("ended", [False, True])
def test_values_of_the_grs3_format_are_still_read(ended):
    """GRS3 (no lineage) decodes with its last label and first-seen counts; the lineage is
    unknown (-1)."""
    from worker.codec import ENDED, HEADER_V3, SEQ
    from worker.engine import decode_states
    h = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = OutboxEntry(7, 7, 30, ended, token_digest([1], ended), (0.25, 0.75))
    flags = SEQ | (ENDED if ended else 0)
    hh = np.zeros((0, 0), np.float32) if ended else h
    parts = [HEADER_V3.pack(b"GRS3", flags, *hh.shape, 2, 1, 7, 30, 8, 0, 0),
             hh.astype("<f4").tobytes()]
    if not ended:
        parts.append(np.asarray([3, 0], "<u4").tobytes())
    parts += [OUTBOX_ENTRY.pack(7, 7, 30, int(ended), out.digest), np.asarray(out.probs, "<f4").tobytes()]
    raw = b"".join(parts)
    back = decode_state(raw, 2, 3, 2)
    assert back.last_label == 0 and back.outbox == (out,) and back.start_offset == -1
    assert back.first_seen == (None if ended else (3, 0))
    got = decode_states([raw], 2, 3, 2)
    assert got.exists[0] and not got.corrupt and got.last_label[0] == 0
    assert got.last_ts[0] == -1 and write_status(raw, 7, 8) == WriteStatus.OK


@pytest.mark.unit
def test_a_grs2_value_with_change_emits_only_when_the_label_changes():
    """B8: a session stored as GRS2 continues on the new worker with emit=change; its first
    message after the upgrade is emitted only if its label differs from the one the outbox
    says was last emitted."""
    import torch
    from model.gru import GRUClassifier, ModelConfig
    from worker.engine import Engine
    from worker.messages import TokenMessage
    from worker.output import OutputPolicy
    from worker.ports import Record
    torch.manual_seed(0)
    m = GRUClassifier(ModelConfig(vocab_size=20, embed_dim=4, hidden_size=3, num_layers=1,
                                  num_labels=2, dropout=0.0, mean_dim=0))
    eng = Engine(m, output=OutputPolicy("change"))
    h = np.zeros((1, m.config.state_size), np.float32)
    msg = TokenMessage("s", 1, [5], False, Record("t", 0, 1, b"s", b"{}", 1000))
    probs = eng.apply([msg], {"s": None}).updates[0].table.probs[0]
    label = int(np.argmax(probs))
    for stored_label, emitted in ((label, False), (1 - label, True)):
        p = [0.0, 0.0]
        p[stored_label] = 1.0
        entry = OutboxEntry(0, 0, 1, False, token_digest([1], False), tuple(p))
        raw = encode_v2(SessionState(h, 0, PosKind.SEQ, 1, 1, False, (entry,), False),
                        m.config.num_labels)
        u = eng.apply([msg], {"s": raw}).updates[0]
        assert bool(u.table.emit[0]) is emitted


@pytest.mark.unit
def test_token_digest_tells_messages_apart():
    assert token_digest([1, 2, 3], False) == token_digest([1, 2, 3], False)
    assert len({token_digest([1, 2, 3], False), token_digest([1, 2, 3], True),
                token_digest([1, 2], False), token_digest([3, 2, 1], False)}) == 4


@pytest.mark.unit
def test_float16_state_is_half_the_size_and_close():
    h = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32) / 3
    s = SessionState(h, 5, PosKind.OFFSET)
    raw16, raw32 = encode_state(s, 5, "float16"), encode_state(s, 5)
    head = HEADER.size + 4 * 5
    assert len(raw16) - head == (len(raw32) - head) // 2
    assert np.abs(decode_state(raw16, 2, 128, 5).h - h).max() < 1e-3


@pytest.mark.unit
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


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.unit),
                        pytest.param("redis", marks=pytest.mark.services)])
def store(request):
    """Each store: in memory (tier 1) and on the shared Redis (tier 3)."""
    if request.param == "memory":
        yield MemoryStateStore()
        return
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    yield RedisStateStore(client, Keys(prefix, "m1", "g"))
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


TP = ("tokens", 0)


def put(store, sid, raw):
    """Place a raw value under a session's key, bypassing the write rule."""
    if isinstance(store, MemoryStateStore):
        store._data[sid] = (raw, float("inf"))
    else:
        store.client.set(store.keys.session(sid, TP), raw)


# (stored value, expected position, new position[, replaces]) -> status. The one rule both
# stores apply: codec.write_status in Python (the memory store), the WRITE_SCRIPT in Lua (Redis).
RULE_TABLE = [
    (None, None, 0, WriteStatus.OK),  # a new session
    (None, 3, 4, WriteStatus.STALE),  # we loaded a state that is gone
    (value(3), 3, 4, WriteStatus.OK),  # the position we loaded, moving forward
    (value(3), 3, 3, WriteStatus.STALE),  # not forward: a duplicate
    (value(3), 3, 2, WriteStatus.STALE),
    (value(3), 2, 5, WriteStatus.STALE),  # someone moved it since we loaded: a lost race
    (value(3), None, 5, WriteStatus.STALE),  # we loaded nothing, something is there now
    (b"", None, 1, WriteStatus.CORRUPT),  # an empty value used to crash the Lua script
    (b"", 0, 1, WriteStatus.CORRUPT),
    (b"XXXX" + value(3)[4:], 3, 4, WriteStatus.CORRUPT),  # another program's value
    (value(3)[:20], 3, 4, WriteStatus.CORRUPT),  # shorter than a header
    (b"GRS2" + value(3)[4:36], 3, 4, WriteStatus.OK),  # the previous format's header
    (b"GRS3" + value(3)[4:40], 3, 4, WriteStatus.OK),
    # the loaded value expired in event time: a new conversation may go back, but only over
    # exactly the value loaded
    (value(3), 3, 0, WriteStatus.OK, True),
    (value(3), 2, 0, WriteStatus.STALE, True),
    (value(3), None, 0, WriteStatus.STALE, True),
]


@pytest.mark.unit
@pytest.mark.parametrize("case", RULE_TABLE)
def test_write_rule_table_in_python(case):
    current, expected, new, status, *replaces = case
    assert write_status(current, expected, new, *replaces) == status


def test_write_rule_table_on_both_stores(store):
    (claim,) = store.claim([TP]).values()
    mark = {TP: PartitionMark(claim.token, 1)}
    for i, (current, expected, new, status, *replaces) in enumerate(RULE_TABLE):
        sid = f"case{i}"
        if current is not None:
            put(store, sid, current)
        got = store.store(mark, [StateWrite(sid, TP, expected, new, value(new), 60_000,
                                            replaces=bool(replaces and replaces[0]))])
        assert got.statuses == [status], (i, current[:8] if current else None, expected, new)
        want = value(new) if status == WriteStatus.OK else current
        assert store.load([sid], [TP]) == [want], i


def test_write_script_cases(store):
    (claim,) = store.claim([TP]).values()
    assert claim.next_offset is None
    m = lambda nxt, token=claim.token: {TP: PartitionMark(token, nxt)}  # noqa: E731
    w = lambda sid, exp, new: StateWrite(sid, TP, exp, new, value(new), 60_000)  # noqa: E731
    res = store.store(m(10), [w("a", None, 0), w("b", None, 3)])
    assert res.statuses == [WriteStatus.OK, WriteStatus.OK] and not res.fenced
    assert store.load(["a", "b", "c"], [TP] * 3) == [value(0), value(3), None]
    # a refused write keeps the partition's next offset where it was
    assert store.store(m(20), [w("a", 0, 0), w("b", 3, 4)]).statuses == [WriteStatus.STALE,
                                                                          WriteStatus.OK]
    assert store.load(["b"], [TP]) == [value(4)]
    (again,) = store.claim([TP]).values()
    assert again.next_offset == 10
    # the old token is fenced: nothing of its call lands, nor its offset
    res = store.store(m(30), [w("a", 0, 1), w("z", None, 0)])
    assert res.fenced == {TP} and res.statuses == [WriteStatus.FENCED] * 2
    assert store.load(["a", "z"], [TP, TP]) == [value(0), None]
    # a call with no writes still records the offset (a batch of duplicates and dead letters)
    assert store.store(m(40, again.token), []).statuses == []
    assert store.store(m(35, again.token), []).statuses == []  # never backwards
    (third,) = store.claim([TP]).values()
    assert third.next_offset == 40


def test_tokens_are_per_partition_and_never_reused(store):
    c = store.claim([("t", 0), ("t", 1)])
    c2 = store.claim([("t", 1)])
    assert c2[("t", 1)].token.split(":")[0] == "2" and c[("t", 0)].token.split(":")[0] == "1"
    ok = StateWrite("s", ("t", 0), None, 1, value(1), 1000)
    assert store.store({("t", 0): PartitionMark(c[("t", 0)].token, 1)}, [ok]).statuses == [
        WriteStatus.OK]
    # A Redis that forgot the counter hands out the same number again, never the same token:
    # a zombie holding "1:..." from before the loss stays fenced.
    fresh = type(store)() if isinstance(store, MemoryStateStore) else store
    if fresh is store:
        store.client.delete(store.keys.mark("t", 0))
    (after,) = fresh.claim([("t", 0)]).values()
    assert after.token.split(":")[0] == "1" and after.token != c[("t", 0)].token
    old = {("t", 0): PartitionMark(c[("t", 0)].token, 2)}
    assert fresh.store(old, [StateWrite("s2", ("t", 0), None, 1, value(1), 1000)]).fenced


def test_a_write_for_an_unmarked_partition_is_a_bug(store):
    with pytest.raises(ValueError, match="without a mark"):
        store.store({}, [StateWrite("s", TP, None, 1, value(1), 1000)])


@pytest.mark.services
def test_redis_ttl_is_set_and_keys_are_namespaced():
    client = redis.Redis.from_url(REDIS_URL)
    keys = Keys(f"test-{uuid.uuid4().hex[:8]}", "model9", "grp")
    store = RedisStateStore(client, keys)
    try:
        (c,) = store.claim([TP]).values()
        store.store({TP: PartitionMark(c.token, 1)}, [StateWrite("sess", TP, None, 1, value(1), 5000)])
        assert 0 < client.pttl(keys.session("sess")) <= 5000
        assert keys.session("sess") == f"{keys.prefix}:model9:grp:s:sess"
        assert keys.mark("tokens", 0) == f"{keys.prefix}:p:grp:tokens:0"
        assert client.pttl(keys.mark("tokens", 0)) == -1  # marks never expire
        assert sorted(k.decode() for k in client.scan_iter(f"{keys.prefix}:*")) == sorted(
            [keys.session("sess"), keys.mark("tokens", 0)])
    finally:
        client.delete(*client.scan_iter(f"{keys.prefix}:*"))


@pytest.mark.unit
def test_cluster_keys_start_with_the_partition_tag_whatever_the_group():
    keys = Keys("gru", "m", "team{a}", cluster=True)
    assert keys.session("s{x}", ("tokens", 3)) == "gru:{tokens|3}:m:team{a}:s:s{x}"
    assert keys.mark("tokens", 3) == "gru:{tokens|3}:p:team{a}:tokens:3"


@pytest.mark.unit
def test_memory_store_expires_with_its_clock():
    now = [0.0]
    store = MemoryStateStore(clock=lambda: now[0])
    (c,) = store.claim([TP]).values()
    store.store({TP: PartitionMark(c.token, 1)}, [StateWrite("s", TP, None, 1, value(1), 1000)])
    now[0] = 0.999
    assert store.load(["s"]) == [value(1)]
    now[0] = 1.0
    assert store.load(["s"]) == [None] and len(store) == 0


def set_next_offset(store, tp, value):
    """Move a partition's recorded offset back, as a restore from an older snapshot does."""
    if isinstance(store, MemoryStateStore):
        store._marks[tp]["next_offset"] = value
    else:
        store.client.hset(store.keys.mark(*tp), "next_offset", value)


def test_a_recorded_offset_that_went_back_refuses_the_whole_partition(store):
    """Redis restored under a running writer: its token is the same, but the states behind
    it lost writes. Writing on top of them would silently drop the lost tokens."""
    (c,) = store.claim([TP]).values()
    w = lambda sid, new: StateWrite(sid, TP, None, new, value(new), 60_000)  # noqa: E731
    first = store.store({TP: PartitionMark(c.token, 10)}, [w("a", 0)])
    assert first.recorded == {TP} and not first.behind
    second = store.store({TP: PartitionMark(c.token, 20, expected=10)}, [w("b", 0)])
    assert second.recorded == {TP}
    set_next_offset(store, TP, 10)
    res = store.store({TP: PartitionMark(c.token, 30, expected=20)}, [w("c", 0)])
    assert res.behind == {TP: 10} and res.statuses == [WriteStatus.BEHIND] and not res.recorded
    assert store.load(["c"], [TP]) == [None]
    (again,) = store.claim([TP]).values()
    assert again.next_offset == 10


MARK_TABLE = [  # (stored token, stored next, token, expected next) -> status
    ("1:a", 5, "1:a", None, WriteStatus.OK),
    ("1:a", 5, "1:a", 5, WriteStatus.OK),
    ("1:a", 9, "1:a", 5, WriteStatus.OK),  # ahead: our own write whose reply was lost
    ("1:a", 4, "1:a", 5, WriteStatus.BEHIND),
    ("1:a", None, "1:a", 5, WriteStatus.BEHIND),
    ("2:b", 5, "1:a", 5, WriteStatus.FENCED),
    (None, None, "1:a", None, WriteStatus.FENCED),  # Redis lost everything
]


@pytest.mark.unit
@pytest.mark.parametrize("stored_token, stored_next, token, expected, status", MARK_TABLE)
def test_mark_rule_table_in_python(stored_token, stored_next, token, expected, status):
    from worker.codec import mark_status
    assert mark_status(stored_token, stored_next, token, expected) == status


def test_mark_rule_table_on_both_stores(store):
    for i, (stored_token, stored_next, token, expected, status) in enumerate(MARK_TABLE):
        tp = ("m", i)
        if stored_token is not None:
            (c,) = store.claim([tp]).values()
            token = c.token if token == stored_token else "1:not-the-stored-token"
            if stored_next is not None:
                set_next_offset(store, tp, stored_next)
        got = store.store({tp: PartitionMark(token, 100, expected)}, [])
        want = {WriteStatus.OK: got.recorded, WriteStatus.FENCED: got.fenced,
                WriteStatus.BEHIND: set(got.behind)}[status]
        assert want == {tp}, (i, got)
