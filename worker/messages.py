"""The message contract: decode input records, encode predictions and dead letters.

Decoding is pure and total: every record becomes either a ``TokenMessage`` or a
``Rejection`` whose reason names the field and the rule it broke. Nothing here raises on
bad input, so one bad record can never stop a partition.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from model.tokenizer import tokenize

from .config import LimitSettings
from .ports import Record
from .tenants import TenantError, TenantRule, split


@dataclass(frozen=True, slots=True)
class TokenMessage:
    session_id: str  # with a tenant header: <tenant>/<session_id> (worker.tenants)
    seq: int | None
    token_ids: list[int]
    end: bool
    record: Record
    decoded_by: str | None = None  # the model whose tokenizer made token_ids (None: current)

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


class _Input(msgspec.Struct, forbid_unknown_fields=True):
    """The input value's JSON object, typed: msgspec (C) checks types and unknown fields."""

    session_id: str
    seq: int | None = None
    tokens: list[str] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    end: bool = False


_FIELDS = ("session_id", "seq", "tokens", "text", "token_ids", "end")
_INPUT = msgspec.json.Decoder(_Input)


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
        obj = _INPUT.decode(raw)
    except msgspec.ValidationError as e:  # types, required and unknown fields
        text = _cut(str(e))
        if "unknown field" in text:
            text += f"; allowed: {list(_FIELDS)}"
        raise _BadInput(f"value breaks the message contract: {text}") from None
    except msgspec.DecodeError as e:  # not UTF-8, not JSON (NaN and Infinity are not JSON)
        constant = next((c for c in ("NaN", "Infinity") if c.encode() in raw[:4096]), None)
        extra = f" (it contains {constant}, which is not valid JSON)" if constant else ""
        raise _BadInput(f"value is not valid UTF-8 JSON: {e}{extra}") from None

    sid = obj.session_id
    if not sid:
        raise _BadInput("session_id is required and must be a non-empty string")
    if len(sid) > limits.max_session_id_len:
        raise _BadInput(f"session_id has {len(sid)} characters, over "
                        f"max_session_id_len={limits.max_session_id_len}")
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
    if limits.tenant_header is not None:
        secret = limits.tenant_secret
        try:
            sid = _tenant_rule(limits.tenant_header,
                               None if secret is None else secret.get_secret_value()
                               ).scope(record, sid)
        except TenantError as e:
            raise _BadInput(str(e)) from None

    seq = obj.seq
    if seq is not None and not 0 <= seq < 2**53:
        raise _BadInput(f"seq must be an integer in [0, 2^53), got {seq!r:.80}")

    given = [f for f, v in (("tokens", obj.tokens), ("text", obj.text), ("token_ids", obj.token_ids))
             if v is not None]
    if len(given) != 1:
        raise _BadInput(f"exactly one of tokens, text, token_ids is required; got {given or 'none'}")
    if obj.text is not None:
        if len(obj.text) > limits.max_tokens_per_message * 64:
            raise _BadInput(f"text is {len(obj.text)} characters, too long for "
                            f"max_tokens_per_message={limits.max_tokens_per_message}")
        tokens = tokenize(obj.text)
        _check_count(len(tokens), limits, "text", obj.end)
        ids = encode(tokens)
    elif obj.tokens is not None:
        _check_count(len(obj.tokens), limits, "tokens", obj.end)
        ids = encode(obj.tokens)
    else:
        ids = obj.token_ids
        _check_count(len(ids), limits, "token_ids", obj.end)
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            i, t = next((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size)
            raise _BadInput(f"token_ids[{i}]={t!r:.40} is out of range for vocab size {vocab_size}")
    return TokenMessage(sid, seq, ids, obj.end, record)


@functools.lru_cache(maxsize=8)
def _tenant_rule(header: str, secret: str | None) -> TenantRule:
    return TenantRule(header, None if secret is None else secret.encode())


def _check_count(n: int, limits: LimitSettings, field: str, end: bool) -> None:
    if n == 0 and not end:  # a closing message may be empty: it ends the session as it is
        raise _BadInput(f"{field} has no tokens (only a message with end=true may have none)")
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
    model_id: str = ""  # the model that produced it ("" in tools and tests: the encoder's)


class _PredictionOut(msgspec.Struct, omit_defaults=True):
    """The prediction's JSON object, its fields in the documented order (``tenant`` only
    with a tenant header)."""

    session_id: str
    seq: int
    label: str
    confidence: float
    probs: Any
    tokens_seen: int
    final: bool
    context: str
    model_id: str
    partition: int
    offset: int
    tenant: str | None = None


class PredictionEncoder:
    """Encodes predictions as JSON with msgspec (C), a batch at a time: probabilities are
    rounded to 6 decimals with numpy, and ``probs`` is a struct whose fields are the labels."""

    def __init__(self, labels: Sequence[str], model_id: str, tenants: bool = False) -> None:
        self.labels = list(labels)
        self.model_id = model_id
        self.tenants = tenants  # session ids are <tenant>/<session_id>: written apart
        # A struct whose fields f0, f1, ... are renamed to the labels (fast); msgspec refuses
        # names with quotes, backslashes or control characters: those labels take a dict.
        try:
            self._probs = msgspec.defstruct(
                "Probs", [(f"f{i}", float) for i in range(len(self.labels))],
                rename={f"f{i}": l for i, l in enumerate(self.labels)})
        except ValueError:
            self._probs = lambda *row: dict(zip(self.labels, row))
        self._json = msgspec.json.Encoder()

    def encode(self, p: Prediction) -> bytes:
        return self._encode(p.session_id, p.seq, list(p.probs), p.tokens_seen, p.final,
                            p.partial, p.record)[0]

    def encode_rows(self, table, rows: Sequence[int]) -> list[bytes]:
        """The predictions of rows ``rows`` of a ``StepTable`` (worker.engine)."""
        if not len(rows):
            return []
        r = np.asarray(rows)
        return self._encode([table.session_ids[i] for i in rows], table.seq[r].tolist(),
                            table.probs[r], table.tokens_seen[r].tolist(),
                            table.final[r].tolist(), table.partial[r].tolist(),
                            [table.records[i] for i in rows])

    def _encode(self, sids, seqs, probs, seen, final, partial, records) -> list[bytes]:
        if isinstance(sids, str):
            sids, seqs, seen, final, partial, records = [sids], [seqs], [seen], [final], \
                [partial], [records]
            probs = [probs]
        raw = np.asarray(probs, np.float64)
        best = raw.argmax(axis=1).tolist()  # on the exact values, as the model ranks them
        p = np.round(raw, 6)
        rows = p.tolist()
        labels, make, enc, mid = self.labels, self._probs, self._json.encode, self.model_id
        tenants = [split(s) for s in sids] if self.tenants else [(None, s) for s in sids]
        return [enc(_PredictionOut(sid, sq, labels[b], row[b], make(*row), sn, fn,
                                   "partial" if pa else "full", mid, rec.partition, rec.offset,
                                   tenant))
                for (tenant, sid), sq, row, b, sn, fn, pa, rec in zip(
                    tenants, seqs, rows, best, seen, final, partial, records)]


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
