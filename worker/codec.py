"""The byte format of a session's state value, and the write rule every store applies.

A value is a 36-byte header, the GRU state ``h`` (L x H, float32 or float16) and an outbox: the
predictions of the messages applied by the last write, each with a digest of its tokens, so a
redelivered duplicate can re-emit its prediction (``worker.loop``) and a reused position with
other tokens is told apart. The engine uses this module without knowing where values live.

Header, little-endian: magic ``GRS2``, flags (float16, seq-numbered, ended, partial), layers,
hidden, labels, outbox count, last position (byte 12), tokens seen, messages applied.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .ports import WriteStatus

MAGIC = b"GRS2"
HEADER = struct.Struct("<4sBBHHHqqq")
OUTBOX_ENTRY = struct.Struct("<qqqB8s")  # position seq tokens_seen final digest, then f32 x labels
LAST_POS_OFFSET = 12  # byte offset of last_pos in the header; the Lua write script reads it too
F16, SEQ, ENDED, PARTIAL = 1, 2, 4, 8
MAX_OUTBOX = 2**16 - 1  # the header's outbox count is 16 bits


class PosKind(IntEnum):
    OFFSET = 0
    SEQ = 1


class StateCorrupt(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    position: int
    seq: int
    tokens_seen: int
    final: bool
    digest: bytes  # token_digest() of the message that produced it
    probs: tuple[float, ...]


@dataclass(slots=True)
class SessionState:
    h: np.ndarray  # (L, H) float32; (0, 0) once the session has ended
    last_pos: int
    pos_kind: PosKind
    tokens_seen: int = 0
    messages: int = 0
    ended: bool = False
    outbox: tuple[OutboxEntry, ...] = ()
    partial: bool = False  # the session's first messages were never applied (see README)


def token_digest(token_ids: Sequence[int], end: bool) -> bytes:
    """8 bytes that tell one message's content from another's at the same position."""
    return hashlib.blake2b(np.asarray(token_ids, "<i4").tobytes() + (b"\x01" if end else b"\x00"),
                           digest_size=8).digest()


def encode_state(s: SessionState, num_labels: int, dtype: str = "float32") -> bytes:
    if len(s.outbox) > MAX_OUTBOX:
        raise ValueError(f"an outbox holds at most {MAX_OUTBOX} entries, got {len(s.outbox)}")
    h = np.zeros((0, 0), np.float32) if s.ended else s.h
    layers, hidden = h.shape
    flags = (F16 if dtype == "float16" else 0) | (SEQ if s.pos_kind == PosKind.SEQ else 0) \
        | (ENDED if s.ended else 0) | (PARTIAL if s.partial else 0)
    parts = [HEADER.pack(MAGIC, flags, layers, hidden, num_labels, len(s.outbox), s.last_pos,
                         s.tokens_seen, s.messages),
             np.ascontiguousarray(h, dtype="<f2" if dtype == "float16" else "<f4").tobytes()]
    for e in s.outbox:
        parts.append(OUTBOX_ENTRY.pack(e.position, e.seq, e.tokens_seen, e.final, e.digest))
        parts.append(np.asarray(e.probs, dtype="<f4").tobytes())
    return b"".join(parts)


def stored_position(raw: bytes) -> int:
    """The last applied position of a stored value; the one definition both stores use (the
    Lua script reads the same 8 bytes). Raises StateCorrupt if the value is not a state."""
    if len(raw) < HEADER.size or raw[:4] != MAGIC:
        raise StateCorrupt(f"stored value of {len(raw)} bytes is not a state value "
                           f"(magic {raw[:4]!r}, expected {MAGIC!r})")
    return struct.unpack_from("<q", raw, LAST_POS_OFFSET)[0]


def write_status(current: bytes | None, expected_pos: int | None, new_pos: int) -> WriteStatus:
    """Whether a write lands on the current value: the stored position must be the one the
    writer loaded (absent if it loaded nothing) and the new position must be greater. The Lua
    script in ``worker.state`` is this rule in Lua; tests/test_state.py runs both on one table."""
    if current is None:
        return WriteStatus.OK if expected_pos is None else WriteStatus.STALE
    try:
        pos = stored_position(current)
    except StateCorrupt:
        return WriteStatus.CORRUPT
    if expected_pos is None or pos != expected_pos or new_pos <= pos:
        return WriteStatus.STALE
    return WriteStatus.OK


def mark_status(stored_token: str | None, stored_next: int | None, token: str,
                expected_next: int | None) -> WriteStatus:
    """Whether a writer may write a partition: its token must be the stored one (else FENCED),
    and the recorded next offset must not be behind the one it last saw recorded (else
    BEHIND: Redis lost writes under it). The Lua script applies the same rule."""
    if stored_token != token:
        return WriteStatus.FENCED
    if expected_next is not None and (stored_next is None or stored_next < expected_next):
        return WriteStatus.BEHIND
    return WriteStatus.OK


def decode_state(raw: bytes, layers: int, hidden: int, num_labels: int,
                 with_outbox: bool = True) -> SessionState:
    """Decode and validate a value. The outbox is only needed when a duplicate arrives, so
    the hot path skips it (``with_outbox=False``) and calls ``decode_outbox`` on demand."""
    if len(raw) < HEADER.size:
        raise StateCorrupt(f"state value is {len(raw)} bytes, shorter than its header")
    magic, flags, l, hdim, c, n_out, last_pos, tokens, messages = HEADER.unpack_from(raw)
    ended = bool(flags & ENDED)
    if magic != MAGIC:
        raise StateCorrupt(f"state value has magic {magic!r}, expected {MAGIC!r}")
    if (l, hdim) != ((0, 0) if ended else (layers, hidden)) or c != num_labels:
        raise StateCorrupt(f"state shape L={l} H={hdim} C={c} does not match the model's "
                           f"L={layers} H={hidden} C={num_labels}")
    width = 2 if flags & F16 else 4
    h_end = HEADER.size + l * hdim * width
    if len(raw) != h_end + n_out * (OUTBOX_ENTRY.size + 4 * c):
        raise StateCorrupt(f"state value is {len(raw)} bytes, header implies "
                           f"{h_end + n_out * (OUTBOX_ENTRY.size + 4 * c)}")
    h = np.frombuffer(raw, dtype="<f2" if width == 2 else "<f4", count=l * hdim,
                      offset=HEADER.size).astype(np.float32).reshape(l, hdim)
    return SessionState(h, last_pos, PosKind.SEQ if flags & SEQ else PosKind.OFFSET, tokens,
                        messages, ended, decode_outbox(raw) if with_outbox else (),
                        bool(flags & PARTIAL))


def decode_outbox(raw: bytes) -> tuple[OutboxEntry, ...]:
    """The outbox of a value that ``decode_state`` has already validated."""
    _, flags, l, hdim, c, n_out, *_ = HEADER.unpack_from(raw)
    entry = OUTBOX_ENTRY.size + 4 * c
    start = HEADER.size + l * hdim * (2 if flags & F16 else 4)
    out = []
    for i in range(n_out):
        at = start + i * entry
        pos, seq, seen, final, digest = OUTBOX_ENTRY.unpack_from(raw, at)
        probs = np.frombuffer(raw, dtype="<f4", count=c, offset=at + OUTBOX_ENTRY.size)
        out.append(OutboxEntry(pos, seq, seen, bool(final), digest,
                               tuple(float(p) for p in probs)))
    return tuple(out)
