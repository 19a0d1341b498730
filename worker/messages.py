"""The message contract: decode input records, encode predictions and dead letters.

Decoding is pure and total: every record becomes either a ``TokenMessage`` or a
``Rejection`` whose reason names the field and the rule it broke. Nothing here raises on
bad input, so one bad record can never stop a partition.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model.tokenizer import tokenize

from .config import LimitSettings
from .ports import Record


@dataclass(frozen=True, slots=True)
class TokenMessage:
    session_id: str
    seq: int | None
    token_ids: list[int]
    end: bool
    record: Record

    @property
    def position(self) -> int:
        """What replay protection orders by: ``seq`` when given, else the partition offset."""
        return self.seq if self.seq is not None else self.record.offset


@dataclass(frozen=True, slots=True)
class Rejection:
    record: Record
    reason: str
    session_id: str | None = None  # set when the engine rejects a decoded message


class _BadInput(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _BadInput(f"value contains {name}, which is not valid JSON")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_FIELDS = {"session_id", "seq", "tokens", "text", "token_ids", "end"}


def decode(record: Record, vocab_size: int, encode: Callable[[Sequence[str]], list[int]],
           limits: LimitSettings) -> TokenMessage | Rejection:
    """Validate one input record against the contract (README, "Message contract")."""
    try:
        return _decode(record, vocab_size, encode, limits)
    except _BadInput as e:
        return Rejection(record, str(e))


def _decode(record: Record, vocab_size: int, encode: Callable[[Sequence[str]], list[int]],
            limits: LimitSettings) -> TokenMessage:
    raw = record.value
    if raw is None:
        raise _BadInput("value is empty (a tombstone record)")
    if len(raw) > limits.max_message_bytes:
        raise _BadInput(f"value is {len(raw)} bytes, over max_message_bytes={limits.max_message_bytes}")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except _BadInput:
        raise
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, and a plain ValueError for
        # integer literals over Python's int digit limit (4300 digits)
        raise _BadInput(f"value is not valid UTF-8 JSON ({e.__class__.__name__}: {e})") from None
    except RecursionError:
        raise _BadInput("value is nested too deeply to decode") from None
    if not isinstance(obj, dict):
        raise _BadInput(f"value must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - _FIELDS
    if unknown:
        shown = ", ".join(repr(f[:40]) for f in sorted(unknown)[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise _BadInput(f"unknown field(s) {shown}{more}; allowed: {sorted(_FIELDS)}")

    sid = obj.get("session_id")
    if not isinstance(sid, str) or not sid:
        raise _BadInput("session_id is required and must be a non-empty string")
    if len(sid) > limits.max_session_id_len:
        raise _BadInput(f"session_id has {len(sid)} characters, over "
                        f"max_session_id_len={limits.max_session_id_len}")
    try:
        sid.encode("utf-8")  # it becomes the Redis key and the prediction's Kafka key
    except UnicodeEncodeError:
        raise _BadInput("session_id is not valid Unicode (it contains a lone surrogate)") from None
    if record.key is None:
        if limits.require_key:
            raise _BadInput("key is missing: a session's messages must be keyed by their "
                            "session_id, so that they share one partition and its order "
                            "(GRU_LIMITS__REQUIRE_KEY=false accepts unkeyed records)")
    else:
        try:
            key = record.key.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadInput("key is not valid UTF-8") from None
        if key != sid:
            raise _BadInput(f"key {key[:80]!r} does not equal session_id {sid[:80]!r}")

    seq = obj.get("seq")
    if seq is not None and (not _is_int(seq) or seq < 0 or seq >= 2**53):
        raise _BadInput(f"seq must be an integer in [0, 2^53), got {seq!r:.80}")
    end = obj.get("end", False)
    if not isinstance(end, bool):
        raise _BadInput(f"end must be a boolean, got {type(end).__name__}")

    given = [f for f in ("tokens", "text", "token_ids") if obj.get(f) is not None]
    if len(given) != 1:
        raise _BadInput(f"exactly one of tokens, text, token_ids is required; got {given or 'none'}")
    field = given[0]
    payload = obj[field]
    if field == "text":
        if not isinstance(payload, str):
            raise _BadInput(f"text must be a string, got {type(payload).__name__}")
        if len(payload) > limits.max_tokens_per_message * 64:
            raise _BadInput(f"text is {len(payload)} characters, too long for "
                            f"max_tokens_per_message={limits.max_tokens_per_message}")
        tokens = tokenize(payload)
        _check_count(len(tokens), limits, "text")
        ids = encode(tokens)
    elif field == "tokens":
        if not isinstance(payload, list) or not all(isinstance(t, str) for t in payload):
            raise _BadInput("tokens must be a list of strings")
        _check_count(len(payload), limits, "tokens")
        ids = encode(payload)
    else:
        if not isinstance(payload, list):
            raise _BadInput(f"token_ids must be a list of integers, got {type(payload).__name__}")
        _check_count(len(payload), limits, "token_ids")
        for i, t in enumerate(payload):
            if not _is_int(t):
                raise _BadInput(f"token_ids[{i}]={t!r:.40} is not an integer")
            if not 0 <= t < vocab_size:
                raise _BadInput(f"token_ids[{i}]={t} is out of range for vocab size {vocab_size}")
        ids = payload
    return TokenMessage(sid, seq, ids, end, record)


def _check_count(n: int, limits: LimitSettings, field: str) -> None:
    if n == 0:
        raise _BadInput(f"{field} has no tokens")
    if n > limits.max_tokens_per_message:
        raise _BadInput(f"{field} has {n} tokens, over max_tokens_per_message="
                        f"{limits.max_tokens_per_message}")


# --- output ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Prediction:
    session_id: str
    seq: int
    probs: tuple[float, ...]
    tokens_seen: int
    final: bool
    record: Record
    replayed: bool = False  # re-emitted from the state's outbox after a replay
    partial: bool = False  # the session's first messages were never applied to its state


_CONTEXT = {False: '"full"', True: '"partial"'}


class PredictionEncoder:
    """Encodes predictions as JSON with the label keys escaped once, not per message.
    The bytes equal ``json.dumps`` of the documented object (compact separators)."""

    def __init__(self, labels: Sequence[str], model_id: str) -> None:
        self.labels = list(labels)
        self._keys = [json.dumps(l) + ":" for l in self.labels]
        self._model_id = json.dumps(model_id)

    def encode(self, p: Prediction) -> bytes:
        probs = [round(x, 6) for x in p.probs]
        best = max(range(len(probs)), key=p.probs.__getitem__)
        dist = ",".join(k + repr(x) for k, x in zip(self._keys, probs))
        return (f'{{"session_id":{json.dumps(p.session_id)},"seq":{p.seq},'
                f'"label":{self._keys[best][:-1]},"confidence":{probs[best]!r},'
                f'"probs":{{{dist}}},"tokens_seen":{p.tokens_seen},'
                f'"final":{"true" if p.final else "false"},'
                f'"context":{_CONTEXT[p.partial]},"model_id":{self._model_id},'
                f'"partition":{p.record.partition},"offset":{p.record.offset}}}').encode()


def encode_prediction(p: Prediction, labels: Sequence[str], model_id: str) -> bytes:
    return PredictionEncoder(labels, model_id).encode(p)


# Dead letters are bounded by their encoded size, not by their input's: JSON escaping can grow
# a copied byte 6x (control bytes become \u00XX) and base64 4/3x. A dead letter over the
# producer's request limit (1 MiB) or the broker's message limit (1 MB by default) could never be
# produced, and retrying it would block its partition.
DEAD_LETTER_MAX_BYTES = 256 * 1024  # the whole encoded value
DEAD_LETTER_COPY_BYTES = 128 * 1024  # at most this much of the rejected key and value is copied
DEAD_LETTER_KEY_MAX_BYTES = 1024  # a longer key is not reused as the dead letter's Kafka key
REASON_MAX_CHARS = 1000


def _cut(reason: str) -> str:
    if len(reason) <= REASON_MAX_CHARS:
        return reason
    return reason[:REASON_MAX_CHARS] + f"... ({len(reason)} characters, cut)"


def _dead_letter_body(r: Rejection, copy_bytes: int) -> bytes:
    rec = r.record
    body: dict = {"reason": _cut(r.reason), "topic": rec.topic, "partition": rec.partition,
                  "offset": rec.offset, "timestamp_ms": rec.timestamp_ms}
    for name, raw in (("key", rec.key), ("value", rec.value)):
        if raw is None:
            body[name] = None
            continue
        if len(raw) > copy_bytes:
            body[name + "_truncated"] = True
            body[name + "_bytes"] = len(raw)
            raw = raw[:copy_bytes]
        try:
            body[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            body[name + "_b64"] = base64.b64encode(raw).decode()
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def encode_dead_letter(r: Rejection, max_bytes: int = DEAD_LETTER_MAX_BYTES) -> bytes:
    """The dead letter of a rejection: reason, source coordinates and as much of the key and
    value as fits in ``max_bytes`` once encoded (``*_truncated``/``*_bytes`` when cut)."""
    copy = DEAD_LETTER_COPY_BYTES
    while True:
        out = _dead_letter_body(r, copy)
        if len(out) <= max_bytes or copy == 0:
            return out
        copy = min(copy // 2, copy * max_bytes // len(out))


def minimal_dead_letter(r: Rejection, why: str) -> bytes:
    """The fallback when a dead letter itself was refused for good: reason and coordinates."""
    rec = r.record
    return json.dumps({"reason": _cut(r.reason), "topic": rec.topic, "partition": rec.partition,
                       "offset": rec.offset, "timestamp_ms": rec.timestamp_ms,
                       "copy_dropped": _cut(why)}, separators=(",", ":")).encode()


def dead_letter_key(record: Record) -> bytes | None:
    """The dead letter's Kafka key: the rejected record's own, unless it is too long to copy."""
    key = record.key
    return key if key is not None and len(key) <= DEAD_LETTER_KEY_MAX_BYTES else None
