"""Tier 1: the input decoder and output encoders."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from worker.config import LimitSettings
from worker.messages import (DEAD_LETTER_KEY_MAX_BYTES, DEAD_LETTER_MAX_BYTES, Prediction,
                             Rejection, TokenMessage, dead_letter_key, decode, encode_dead_letter,
                             encode_prediction, minimal_dead_letter)
from worker.ports import Record

pytestmark = pytest.mark.unit

LIMITS = LimitSettings(max_tokens_per_message=10, max_session_id_len=8, max_message_bytes=2000)
VOCAB = {"hello": 2, "world": 3}


def enc(tokens):
    return [VOCAB.get(t, 1) for t in tokens]


def rec(value, key=b"s1", offset=7):
    if not isinstance(value, (bytes, type(None))):
        value = json.dumps(value).encode()
    return Record("tokens", 0, offset, key, value, 123)


def dec(value, key=b"s1"):
    return decode(rec(value, key), 100, enc, LIMITS)


def test_three_payload_forms():
    m = dec({"session_id": "s1", "seq": 4, "tokens": ["hello", "zzz"], "end": True})
    assert isinstance(m, TokenMessage)
    assert (m.session_id, m.seq, m.token_ids, m.end, m.position) == ("s1", 4, [2, 1], True, 4)
    assert dec({"session_id": "s1", "text": "Hello, WORLD!"}).token_ids == [2, 3]
    m = dec({"session_id": "s1", "token_ids": [5, 99]})
    assert m.token_ids == [5, 99] and m.seq is None and m.position == 7


def test_key_must_be_the_session_id_unless_allowed():
    # Unkeyed sessions spread over partitions, and partitions come back in no order: seq 1 could
    # be applied before seq 0, which was then dropped as a duplicate and committed.
    r = dec({"session_id": "s1", "tokens": ["a"]}, key=None)
    assert isinstance(r, Rejection) and "key is missing" in r.reason
    r = dec({"session_id": "s1", "tokens": ["a"]}, key=b"s2")
    assert isinstance(r, Rejection) and "does not equal session_id" in r.reason
    lax = LIMITS.model_copy(update={"require_key": False})
    assert isinstance(decode(rec({"session_id": "s1", "tokens": ["a"]}, key=None), 100, enc, lax),
                      TokenMessage)
    r = decode(rec({"session_id": "s1", "tokens": ["a"]}, key=b"s2"), 100, enc, lax)
    assert isinstance(r, Rejection) and "does not equal session_id" in r.reason


def test_limits():
    assert "over max_session_id_len=8" in dec({"session_id": "x" * 9, "tokens": ["a"]}, key=None).reason
    assert "11 tokens, over max_tokens_per_message=10" in dec({"session_id": "s1", "tokens": ["a"] * 11}).reason
    assert "over max_message_bytes=2000" in dec({"session_id": "s1", "text": "a " * 1000}).reason


def test_rules_name_the_field():
    cases = {
        "Expected `int | null`, got `bool` - at `$.seq`": {"session_id": "s1", "seq": True, "tokens": ["a"]},
        "seq must be an integer in [0, 2^53)": {"session_id": "s1", "seq": -1, "tokens": ["a"]},
        "Expected `bool`, got `int` - at `$.end`": {"session_id": "s1", "end": 1, "tokens": ["a"]},
        "Expected `int`, got `float` - at `$.token_ids[0]`": {"session_id": "s1", "token_ids": [1.5]},
        "token_ids[1]=100 is out of range for vocab size 100": {"session_id": "s1", "token_ids": [0, 100]},
        "unknown field `extra`; allowed:": {"session_id": "s1", "tokens": ["a"], "extra": 1},
        "Expected `object`, got `array`": [1, 2],
        "missing required field `session_id`": {"tokens": ["a"]},
        "text has no tokens": {"session_id": "s1", "text": "..."},
    }
    for fragment, value in cases.items():
        r = dec(value)
        assert isinstance(r, Rejection) and fragment in r.reason, (fragment, r)
    assert "tombstone" in dec(None).reason
    for deep in (b"[" * 100000 + b"]" * 100000, b'{"a":' * 50000 + b"1" + b"}" * 50000):
        assert isinstance(decode(rec(deep), 100, enc, LimitSettings(max_message_bytes=10**6)),
                          Rejection)
    assert "NaN" in dec(b'{"session_id":"s1","seq":NaN,"tokens":["a"]}').reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.sampled_from(["session_id", "seq", "tokens", "text", "token_ids", "end", "x"]), c, max_size=5),
    max_leaves=20))
def test_decode_is_total(value):
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    out = decode(rec(raw), 100, enc, LIMITS)
    assert isinstance(out, (TokenMessage, Rejection))
    if isinstance(out, TokenMessage):
        assert 1 <= len(out.token_ids) <= 10 and all(0 <= t < 100 for t in out.token_ids)
    else:
        json.loads(encode_dead_letter(out))  # every rejection can be dead-lettered


@settings(max_examples=200, deadline=None)
@given(sid=st.text(min_size=1, max_size=20), seq=st.integers(0, 2**53),
       probs=st.lists(st.floats(0, 1, width=32), min_size=3, max_size=3),
       labels=st.lists(st.text(min_size=1, max_size=8), min_size=3, max_size=3, unique=True),
       final=st.booleans())
def test_fast_prediction_encoder_matches_the_documented_object(sid, seq, probs, labels, final):
    """msgspec writes the same JSON object as json.dumps of the documented dict: the same
    keys in the same order, the same values (numbers may be spelled 1e-6 for 1e-06)."""
    p = Prediction(sid, seq, tuple(probs), 5, final, rec(b"x"))
    best = max(range(3), key=probs.__getitem__)
    want = {"session_id": sid, "seq": seq, "label": labels[best],
            "confidence": round(probs[best], 6),
            "probs": {l: round(x, 6) for l, x in zip(labels, probs)},
            "tokens_seen": 5, "final": final, "context": "full", "model_id": "m\"1",
            "partition": 0, "offset": 7}
    got = json.loads(encode_prediction(p, labels, 'm"1'))
    assert got == want and list(got) == list(want) and list(got["probs"]) == labels


def test_prediction_and_dead_letter_encoding():
    r = rec(b"\xff", key=b"k")
    p = json.loads(encode_prediction(Prediction("s1", 3, (0.1, 0.9), 12, True, r), ["a", "b"], "m1"))
    assert p == {"session_id": "s1", "seq": 3, "label": "b", "confidence": 0.9,
                 "probs": {"a": 0.1, "b": 0.9}, "tokens_seen": 12, "final": True,
                 "context": "full", "model_id": "m1", "partition": 0, "offset": 7}
    partial = Prediction("s1", 3, (0.1, 0.9), 12, True, r, partial=True)
    assert json.loads(encode_prediction(partial, ["a", "b"], "m1"))["context"] == "partial"
    d = json.loads(encode_dead_letter(Rejection(r, "bad")))
    assert d == {"reason": "bad", "topic": "tokens", "partition": 0, "offset": 7,
                 "timestamp_ms": 123, "key": "k", "value_b64": "/w=="}


def test_integer_literals_past_pythons_digit_limit_are_rejected_not_raised():
    # json.loads raises a plain ValueError (not JSONDecodeError) for ints over 4300 digits;
    # it used to escape decode() and crash the worker on every redelivery (a poison pill).
    raw = b'{"session_id": "s1", "seq": ' + b"7" * 5000 + b', "tokens": ["a"]}'
    out = decode(rec(raw), 100, enc, LimitSettings())
    assert isinstance(out, Rejection) and "out of range - at `$.seq`" in out.reason


def test_session_id_with_a_lone_surrogate_is_rejected():
    # Valid JSON ("\ud800"), but not encodable as UTF-8: the Redis key and the prediction key
    # could not be written, and the worker crashed on every redelivery.
    out = dec(b'{"session_id": "a\\ud800", "tokens": ["a"]}', key=None)
    assert isinstance(out, Rejection) and "surrogate" in out.reason
    assert isinstance(dec(b'{"session_id": "a\\u00e9\\ud83d\\ude00", "tokens": ["a"]}',
                          key="a\u00e9\U0001f600".encode()), TokenMessage)


def test_dead_letter_of_a_huge_record_stays_under_the_producer_limit():
    # A 1 MB input rejected as too large (or as bad JSON) used to be copied whole into its dead
    # letter; JSON escaping or base64 made it larger than the producer's max_request_size
    # (1,048,576), send() raised MessageSizeTooLargeError and the loop retried it forever,
    # blocking the partition.
    for value in (b"\x01" * 1_000_000, b"\xff" * 1_000_000, b'"' * 999_999):
        r = Rejection(rec(value, key=b"k" * 300_000), "too big")
        out = encode_dead_letter(r)
        assert len(out) < 1_000_000
        d = json.loads(out)
        assert d["value_truncated"] is True and d["value_bytes"] == len(value)
        assert d["key_truncated"] is True and d["key_bytes"] == 300_000
    small = json.loads(encode_dead_letter(Rejection(rec(b"abc"), "bad")))
    assert small["value"] == "abc" and "value_truncated" not in small


def test_dead_letters_are_bounded_by_their_encoded_size():
    # Two records that made dead letters over kafka-python's 1 MiB request limit, retried for
    # ever: a reason naming many non-ASCII unknown fields (3.16 MB), and a record of control
    # bytes in key and value, whose JSON escaping grew 6x (1.69 MB).
    fields = {f"\u00e9\u4e16{i:06d}" * 4: 1 for i in range(18_000)}
    big = json.dumps({"session_id": "s1", "tokens": ["a"], **fields}, ensure_ascii=False).encode()
    assert 900_000 < len(big) < 1_000_000
    r = decode(rec(big), 100, enc, LimitSettings())
    assert isinstance(r, Rejection) and "unknown field" in r.reason and len(r.reason) < 2000
    ctrl = Rejection(rec(b"\x01" * 260_000, key=b"\x01" * 260_000), "bad")
    for rej in (r, ctrl):
        out = encode_dead_letter(rej)
        assert len(out) <= DEAD_LETTER_MAX_BYTES
        json.loads(out)
    assert dead_letter_key(ctrl.record) is None  # too long to be the dead letter's Kafka key


@settings(max_examples=60, deadline=None)
@given(key=st.none() | st.binary(max_size=64), key_times=st.integers(1, 20_000),
       value=st.binary(min_size=1, max_size=64), value_times=st.integers(1, 20_000),
       reason=st.text(max_size=50), reason_times=st.integers(1, 5_000))
def test_every_dead_letter_fits_the_producer_limit(key, key_times, value, value_times, reason,
                                                   reason_times):
    """Arbitrary keys and values up to max_message_bytes (1 MB), any reason: the dead letter,
    its Kafka key included, fits well under the producer's 1 MiB request limit."""
    k = None if key is None else (key * key_times)[:1_000_000]
    v = (value * value_times)[:1_000_000]
    rej = Rejection(rec(v, key=k), reason * reason_times)
    out = encode_dead_letter(rej)
    d = json.loads(out)
    assert len(out) <= DEAD_LETTER_MAX_BYTES
    assert len(dead_letter_key(rej.record) or b"") <= DEAD_LETTER_KEY_MAX_BYTES
    assert d["offset"] == 7 and d["reason"].startswith((reason * reason_times)[:100])
    assert len(minimal_dead_letter(rej, "MessageSizeTooLargeError")) < 16_384
