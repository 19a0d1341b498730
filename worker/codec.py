"""The byte format of a session's state value, and the write rule every store applies.

A value is a 64-byte header, the GRU state ``h`` (L x H, float32 or float16), the token count
at which each label was first predicted (C x uint32, 0: not yet; live sessions only) and an
outbox: the predictions of the messages applied by the last write (and of the duplicates it
re-emitted, until they are acknowledged), each with a digest of its tokens and whether it was
emitted, so a redelivered duplicate re-emits exactly what was emitted (``worker.loop``) and a
reused position with other tokens is told apart. The engine uses this module without knowing
where values live.

Header, little-endian: magic ``GRS4``, flags (float16, seq-numbered, ended, partial), layers,
hidden, labels, outbox count, last position (byte 12), tokens seen, messages applied, the last
emitted label (``NO_LABEL``: none yet; what ``GRU_OUTPUT__EMIT=change`` compares with), 2 spare
bytes, then the session's *lineage*: the input offset of its first message, the offset and the
record timestamp (ms) of its last one (-1: unknown). Recovery needs them: where a session
began bounds how far back a rebuild replays, and its last timestamp says when it expires in
event time (``worker.recovery``). Values written before (``GRS3``: no lineage; ``GRS2``: a
36-byte header, no first-seen counts, no last label) are still read, so an upgrade cuts no
session; they are rewritten as ``GRS4`` on their next write.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .ports import WriteStatus

MAGIC = b"GRS4"
MAGIC_V3 = b"GRS3"  # read, never written
MAGIC_V2 = b"GRS2"  # read, never written
MAGICS = (MAGIC, MAGIC_V3, MAGIC_V2)
HEADER = struct.Struct("<4sBBHHHqqqHHqqq")
HEADER_V3 = struct.Struct("<4sBBHHHqqqHH")
HEADER_V2 = struct.Struct("<4sBBHHHqqq")
OUTBOX_ENTRY = struct.Struct("<qqqBQ")  # position seq tokens_seen marks digest, then f32 x labels
NO_LABEL = 0xFFFF  # the header's last emitted label before any was emitted
# The same layouts as numpy structured dtypes, for whole batches at once (worker.engine).
_HEADER_FIELDS = [("magic", "S4"), ("flags", "u1"), ("layers", "u1"), ("hidden", "<u2"),
                  ("labels", "<u2"), ("n_out", "<u2"), ("last_pos", "<i8"), ("tokens", "<i8"),
                  ("messages", "<i8")]
HEADER_V3_DTYPE = np.dtype(_HEADER_FIELDS + [("last_label", "<u2"), ("spare", "<u2")])
HEADER_DTYPE = np.dtype(HEADER_V3_DTYPE.descr + [("start_offset", "<i8"),
                                                 ("last_offset", "<i8"), ("last_ts", "<i8")])
HEADER_V2_DTYPE = np.dtype(_HEADER_FIELDS)
assert (HEADER_DTYPE.itemsize, HEADER_V3_DTYPE.itemsize, HEADER_V2_DTYPE.itemsize) == (
    HEADER.size, HEADER_V3.size, HEADER_V2.size)


@dataclass(frozen=True, slots=True)
class Format:
    """One readable value format: its header, and which parts it has."""

    magic: bytes
    header: struct.Struct
    dtype: np.dtype
    first_seen: bool  # first-seen counts after h, and the last emitted label in the header
    lineage: bool  # start offset, last offset and last timestamp in the header


FORMATS = {f.magic: f for f in (Format(MAGIC, HEADER, HEADER_DTYPE, True, True),
                                Format(MAGIC_V3, HEADER_V3, HEADER_V3_DTYPE, True, False),
                                Format(MAGIC_V2, HEADER_V2, HEADER_V2_DTYPE, False, False))}
# An outbox entry's marks: the message ended its session; its prediction was not emitted
# (GRU_OUTPUT__EMIT, GRU_OUTPUT__MIN_CONFIDENCE), so a replay must not emit it either.
OUT_FINAL, OUT_SUPPRESSED = 1, 2
OUT_PARTIAL = 4  # GRS4: the prediction said "partial" (a replay says what it said)
SEEN_MAX = 2**32 - 1  # first-seen token counts saturate here


def entry_dtype(num_labels: int) -> np.dtype:
    return np.dtype([("position", "<i8"), ("seq", "<i8"), ("seen", "<i8"), ("marks", "u1"),
                     ("digest", "<u8"), ("probs", "<f4", (num_labels,))])


def value_dtype(layers: int, hidden: int, num_labels: int, n_out: int, f16: bool) -> np.dtype:
    """A whole state value with ``n_out`` outbox entries (``layers`` = 0: an ended session)."""
    fields: list = [("hdr", HEADER_DTYPE)]
    if layers:
        fields.append(("h", "<f2" if f16 else "<f4", (layers, hidden)))
        fields.append(("first", "<u4", (num_labels,)))
    if n_out:
        fields.append(("out", entry_dtype(num_labels), (n_out,)))
    return np.dtype(fields)


LAST_POS_OFFSET = 12  # byte offset of last_pos in the header; the Lua write script reads it too
N_OUT_OFFSET = 10  # byte offset of the outbox count
MIN_HEADER = HEADER_V2.size  # the shortest header a readable value has (GRS2)
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
    digest: int  # token_digest() of the message that produced it
    probs: tuple[float, ...]
    suppressed: bool = False  # not emitted when applied: a replay does not emit it either
    partial: bool | None = None  # its context was partial (None: a value from before GRS4)


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
    last_label: int | None = None  # the last label emitted for the session
    first_seen: tuple[int, ...] | None = None  # per label: tokens seen when first predicted
    start_offset: int = -1  # input offset of the session's first message (-1: unknown)
    last_offset: int = -1  # input offset of the last message applied (-1: unknown)
    last_ts: int = -1  # its record timestamp, ms (-1: unknown)


_BASE = np.uint64(0x100000001B3)
_K_LEN, _K_END = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
_POWERS = np.ones(1, np.uint64)


def _powers(n: int) -> np.ndarray:
    global _POWERS
    if len(_POWERS) < n:
        p = np.full(max(n, 2 * len(_POWERS)), _BASE, np.uint64)
        p[0] = 1
        _POWERS = np.cumprod(p, dtype=np.uint64)  # wraps modulo 2^64, on purpose
    return _POWERS[:n]


def token_digests(flat_ids: np.ndarray, lengths: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A 64-bit digest per message, for a batch at once: ``flat_ids`` holds every message's
    token ids back to back, ``lengths`` (each >= 0) and ``ends`` say where each ends and
    whether it closes its session. It tells one message's content from another's at the same
    position (a reused session id); it is not a cryptographic hash."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    within = np.arange(len(flat_ids), dtype=np.int64) - np.repeat(starts, lengths)
    x = (np.asarray(flat_ids, np.int64).astype(np.uint64) + np.uint64(1)) * _powers(int(lengths.max(initial=1)))[within]
    # reduceat gives an empty segment the next element, not 0: sum over the cumulative sum
    cum = np.concatenate([np.zeros(1, np.uint64), np.cumsum(x, dtype=np.uint64)])
    h = cum[starts + lengths] - cum[starts]  # wraps modulo 2^64 like the sum itself
    h ^= lengths.astype(np.uint64) * _K_LEN
    h ^= np.asarray(ends, np.uint64) * _K_END
    h ^= h >> np.uint64(30)  # splitmix64's finaliser
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def token_digest(token_ids: Sequence[int], end: bool) -> int:
    """``token_digests`` of one message."""
    return int(token_digests(np.asarray(token_ids, np.int64), np.array([len(token_ids)]),
                             np.array([end]))[0])


def encode_state(s: SessionState, num_labels: int, dtype: str = "float32") -> bytes:
    if len(s.outbox) > MAX_OUTBOX:
        raise ValueError(f"an outbox holds at most {MAX_OUTBOX} entries, got {len(s.outbox)}")
    h = np.zeros((0, 0), np.float32) if s.ended else s.h
    layers, hidden = h.shape
    flags = (F16 if dtype == "float16" else 0) | (SEQ if s.pos_kind == PosKind.SEQ else 0) \
        | (ENDED if s.ended else 0) | (PARTIAL if s.partial else 0)
    parts = [HEADER.pack(MAGIC, flags, layers, hidden, num_labels, len(s.outbox), s.last_pos,
                         s.tokens_seen, s.messages,
                         NO_LABEL if s.last_label is None else s.last_label, 0,
                         s.start_offset, s.last_offset, s.last_ts),
             np.ascontiguousarray(h, dtype="<f2" if dtype == "float16" else "<f4").tobytes()]
    if not s.ended:
        first = s.first_seen if s.first_seen is not None else (0,) * num_labels
        parts.append(np.asarray(first, dtype="<u4").tobytes())
    for e in s.outbox:
        marks = _marks(e)
        parts.append(OUTBOX_ENTRY.pack(e.position, e.seq, e.tokens_seen, marks, e.digest))
        parts.append(np.asarray(e.probs, dtype="<f4").tobytes())
    return b"".join(parts)


def stored_position(raw: bytes) -> int:
    """The last applied position of a stored value; the one definition both stores use (the
    Lua script reads the same 8 bytes). Raises StateCorrupt if the value is not a state."""
    if len(raw) < MIN_HEADER or raw[:4] not in MAGICS:
        raise StateCorrupt(f"stored value of {len(raw)} bytes is not a state value "
                           f"(magic {raw[:4]!r}, expected {MAGIC!r})")
    return struct.unpack_from("<q", raw, LAST_POS_OFFSET)[0]


def last_timestamp(raw: bytes) -> int:
    """The record timestamp (ms) of a stored value's last message; -1 when unknown."""
    fmt = _format(raw)
    if not fmt.lineage or len(raw) < fmt.header.size:
        return -1
    return struct.unpack_from("<q", raw, fmt.header.size - 8)[0]


def last_offset(raw: bytes) -> int:
    """The input offset of a stored value's last message; -1 when unknown (or unreadable)."""
    fmt = FORMATS.get(bytes(raw[:4]))
    if fmt is None or not fmt.lineage or len(raw) < fmt.header.size:
        return -1
    return struct.unpack_from("<q", raw, fmt.header.size - 16)[0]


def write_status(current: bytes | None, expected_pos: int | None, new_pos: int,
                 replaces: bool = False) -> WriteStatus:
    """Whether a write lands on the current value: the stored position must be the one the
    writer loaded (absent if it loaded nothing) and the new position must be greater, unless
    the write ``replaces`` a value that expired in event time (a new conversation under the
    id may start again at seq 0). The Lua
    script in ``worker.state`` is this rule in Lua; tests/test_state.py runs both on one table."""
    if current is None:
        return WriteStatus.OK if expected_pos is None else WriteStatus.STALE
    try:
        pos = stored_position(current)
    except StateCorrupt:
        return WriteStatus.CORRUPT
    if expected_pos is None or pos != expected_pos or (new_pos <= pos and not replaces):
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


def _format(raw: bytes) -> Format:
    fmt = FORMATS.get(bytes(raw[:4]))
    if fmt is None:
        raise StateCorrupt(f"state value has magic {bytes(raw[:4])!r}, expected {MAGIC!r}")
    return fmt


def decode_state(raw: bytes, layers: int, hidden: int, num_labels: int,
                 with_outbox: bool = True) -> SessionState:
    """Decode and validate a value. The outbox is only needed when a duplicate arrives, so
    the hot path skips it (``with_outbox=False``) and calls ``decode_outbox`` on demand."""
    if len(raw) < MIN_HEADER:
        raise StateCorrupt(f"state value is {len(raw)} bytes, shorter than its header")
    fmt = _format(raw)
    header = fmt.header
    if len(raw) < header.size:
        raise StateCorrupt(f"state value is {len(raw)} bytes, shorter than its header")
    magic, flags, l, hdim, c, n_out, last_pos, tokens, messages, *rest = header.unpack_from(raw)
    ended = bool(flags & ENDED)
    if (l, hdim) != ((0, 0) if ended else (layers, hidden)) or c != num_labels:
        raise StateCorrupt(f"state shape L={l} H={hdim} C={c} does not match the model's "
                           f"L={layers} H={hidden} C={num_labels}")
    width = 2 if flags & F16 else 4
    h_end = header.size + l * hdim * width
    first_end = h_end + (4 * c if fmt.first_seen and not ended else 0)
    if len(raw) != first_end + n_out * (OUTBOX_ENTRY.size + 4 * c):
        raise StateCorrupt(f"state value is {len(raw)} bytes, header implies "
                           f"{first_end + n_out * (OUTBOX_ENTRY.size + 4 * c)}")
    h = np.frombuffer(raw, dtype="<f2" if width == 2 else "<f4", count=l * hdim,
                      offset=header.size).astype(np.float32).reshape(l, hdim)
    first = (tuple(np.frombuffer(raw, "<u4", count=c, offset=h_end).tolist())
             if first_end > h_end else None)
    outbox = decode_outbox(raw) if with_outbox or not fmt.first_seen else ()
    if fmt.first_seen:
        last_label = rest[0] if rest[0] != NO_LABEL else None
    else:  # GRS2 kept no last label: the last emitted entry of its outbox says it
        last_label = outbox_label(outbox)
        outbox = outbox if with_outbox else ()
    start, last_offset, last_ts = rest[2:5] if fmt.lineage else (-1, -1, -1)
    return SessionState(h, last_pos, PosKind.SEQ if flags & SEQ else PosKind.OFFSET, tokens,
                        messages, ended, outbox, bool(flags & PARTIAL), last_label, first,
                        start, last_offset, last_ts)


def outbox_label(outbox: Sequence[OutboxEntry]) -> int | None:
    """The label of the last emitted prediction in an outbox (None: none was emitted)."""
    for e in reversed(outbox):
        if not e.suppressed:
            return int(np.argmax(e.probs))
    return None


def decode_outbox(raw: bytes) -> tuple[OutboxEntry, ...]:
    """The outbox of a value that ``decode_state`` has already validated."""
    fmt = _format(raw)
    _, flags, l, hdim, c, n_out, *_ = fmt.header.unpack_from(raw)
    entry = OUTBOX_ENTRY.size + 4 * c
    start = fmt.header.size + l * hdim * (2 if flags & F16 else 4) + (
        4 * c if fmt.first_seen and l else 0)
    out = []
    for i in range(n_out):
        at = start + i * entry
        pos, seq, seen, marks, digest = OUTBOX_ENTRY.unpack_from(raw, at)
        probs = np.frombuffer(raw, dtype="<f4", count=c, offset=at + OUTBOX_ENTRY.size)
        out.append(OutboxEntry(pos, seq, seen, bool(marks & OUT_FINAL), digest,
                               tuple(float(p) for p in probs), bool(marks & OUT_SUPPRESSED),
                               bool(marks & OUT_PARTIAL) if fmt.lineage else None))
    return tuple(out)


def with_carried(raw: bytes, entries: Sequence[OutboxEntry], num_labels: int) -> bytes:
    """A value just encoded (``GRS4``) with ``entries`` put first in its outbox: predictions
    re-emitted from the stored outbox in the same batch, kept until they are acknowledged."""
    n_out = struct.unpack_from("<H", raw, N_OUT_OFFSET)[0]
    entry = OUTBOX_ENTRY.size + 4 * num_labels
    if n_out + len(entries) > MAX_OUTBOX:
        raise ValueError(f"an outbox holds at most {MAX_OUTBOX} entries")
    at = len(raw) - n_out * entry
    carried = b"".join(
        OUTBOX_ENTRY.pack(e.position, e.seq, e.tokens_seen,
                          _marks(e),
                          e.digest) + np.asarray(e.probs, "<f4").tobytes() for e in entries)
    head = bytearray(raw[:at])
    struct.pack_into("<H", head, N_OUT_OFFSET, n_out + len(entries))
    return bytes(head) + carried + raw[at:]


def _marks(e: OutboxEntry) -> int:
    return ((OUT_FINAL if e.final else 0) | (OUT_SUPPRESSED if e.suppressed else 0)
            | (OUT_PARTIAL if e.partial else 0))
