"""Session state in Redis: the binary codec, the key layout and the fenced, deduplicating write.

A session's value is a 36-byte header, its GRU state ``h`` (L x H, float32 or float16) and an
outbox: the predictions of the messages applied by the last write. The outbox lets a replay
re-emit predictions that a crash kept from being produced (see ``worker.loop``).

Every write goes through one Lua script, atomically, per batch:
  * the partition's fencing epoch must equal the writer's (else FENCED: a zombie writes nothing);
  * the stored ``last_pos`` must equal the one the writer loaded, and the new position must be
    greater (else STALE: a duplicate or a lost race; nothing is written).
"""

from __future__ import annotations

import functools
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

import numpy as np
import redis.exceptions as rex

from .errors import DependencyError

MAGIC = b"GRUS"
_HEADER = struct.Struct("<4sBBHHHqqq")  # magic flags layers hidden labels n_outbox last_pos tokens messages
_OUTBOX = struct.Struct("<qqqB")  # position seq tokens_seen final, then float32 x labels
_F16, _SEQ, _ENDED = 1, 2, 4
LAST_POS_OFFSET = 12  # byte offset of last_pos in the header; the Lua script reads it


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


def encode_state(s: SessionState, num_labels: int, dtype: str = "float32") -> bytes:
    h = np.zeros((0, 0), np.float32) if s.ended else s.h
    layers, hidden = h.shape
    flags = (_F16 if dtype == "float16" else 0) | (_SEQ if s.pos_kind == PosKind.SEQ else 0) \
        | (_ENDED if s.ended else 0)
    parts = [_HEADER.pack(MAGIC, flags, layers, hidden, num_labels, len(s.outbox), s.last_pos,
                          s.tokens_seen, s.messages),
             np.ascontiguousarray(h, dtype="<f2" if dtype == "float16" else "<f4").tobytes()]
    for e in s.outbox:
        parts.append(_OUTBOX.pack(e.position, e.seq, e.tokens_seen, e.final))
        parts.append(np.asarray(e.probs, dtype="<f4").tobytes())
    return b"".join(parts)


def decode_state(raw: bytes, layers: int, hidden: int, num_labels: int,
                 with_outbox: bool = True) -> SessionState:
    """Decode and validate a value. The outbox is only needed when a duplicate arrives, so
    the hot path skips it (``with_outbox=False``) and calls ``decode_outbox`` on demand."""
    if len(raw) < _HEADER.size:
        raise StateCorrupt(f"state value is {len(raw)} bytes, shorter than its header")
    magic, flags, l, hdim, c, n_out, last_pos, tokens, messages = _HEADER.unpack_from(raw)
    ended = bool(flags & _ENDED)
    if magic != MAGIC:
        raise StateCorrupt(f"state value has magic {magic!r}, expected {MAGIC!r}")
    if (l, hdim) != ((0, 0) if ended else (layers, hidden)) or c != num_labels:
        raise StateCorrupt(f"state shape L={l} H={hdim} C={c} does not match the model's "
                           f"L={layers} H={hidden} C={num_labels}")
    width = 2 if flags & _F16 else 4
    h_end = _HEADER.size + l * hdim * width
    if len(raw) != h_end + n_out * (_OUTBOX.size + 4 * c):
        raise StateCorrupt(f"state value is {len(raw)} bytes, header implies "
                           f"{h_end + n_out * (_OUTBOX.size + 4 * c)}")
    h = np.frombuffer(raw, dtype="<f2" if width == 2 else "<f4", count=l * hdim,
                      offset=_HEADER.size).astype(np.float32).reshape(l, hdim)
    return SessionState(h, last_pos, PosKind.SEQ if flags & _SEQ else PosKind.OFFSET, tokens,
                        messages, ended, decode_outbox(raw) if with_outbox else ())


def decode_outbox(raw: bytes) -> tuple[OutboxEntry, ...]:
    """The outbox of a value that ``decode_state`` has already validated."""
    _, flags, l, hdim, c, n_out, *_ = _HEADER.unpack_from(raw)
    entry = _OUTBOX.size + 4 * c
    start = _HEADER.size + l * hdim * (2 if flags & _F16 else 4)
    out = []
    for i in range(n_out):
        at = start + i * entry
        pos, seq, seen, final = _OUTBOX.unpack_from(raw, at)
        probs = np.frombuffer(raw, dtype="<f4", count=c, offset=at + _OUTBOX.size)
        out.append(OutboxEntry(pos, seq, seen, bool(final), tuple(float(p) for p in probs)))
    return tuple(out)


# --- keys --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Keys:
    """Every Redis key the worker touches. State is namespaced by model, so a new model
    never reads an old model's state; epochs by consumer group, topic and partition.

    On a Redis Cluster every key also carries the hash tag ``{topic|partition}``, so the
    epoch of a partition and the states of its sessions share one slot and each write
    script touches a single slot. (A session therefore keeps its state only while the
    input topic keeps its partition count.)
    """

    prefix: str
    model_id: str
    group_id: str
    cluster: bool = False

    def tag(self, partition: "TopicPartition | None") -> str:
        if not self.cluster:
            return ""
        if partition is None:
            raise ValueError("on a Redis Cluster a session key needs its topic partition")
        return f"{{{partition[0]}|{partition[1]}}}:"

    def session(self, session_id: str, partition: "TopicPartition | None" = None) -> str:
        return f"{self.prefix}:{self.model_id}:{self.tag(partition)}s:{session_id}"

    def epoch(self, topic: str, partition: int) -> str:
        if self.cluster:
            return f"{self.prefix}:epoch:{self.group_id}:{{{topic}|{partition}}}"
        return f"{self.prefix}:epoch:{self.group_id}:{topic}:{partition}"


# --- the store ---------------------------------------------------------------------------

class WriteStatus(IntEnum):
    OK = 0
    STALE = 1
    FENCED = 2


TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class StateWrite:
    session_id: str
    partition: TopicPartition
    epoch: int
    expected_pos: int | None  # the last_pos that was loaded; None if the key was absent
    new_pos: int
    value: bytes
    ttl_ms: int  # 0 deletes the key


class StateStore(Protocol):
    def acquire_epochs(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]: ...
    def load(self, session_ids: Sequence[str],
             partitions: Sequence[TopicPartition] | None = None) -> list[bytes | None]: ...
    def store(self, writes: Sequence[StateWrite]) -> list[WriteStatus]: ...
    def ping(self) -> bool: ...


WRITE_SCRIPT = """
-- KEYS: P epoch keys, then one state key per write.
-- ARGV: P, P epochs, then per write: partition index, expected pos ('-' = absent), new pos, ttl ms, value
local np = tonumber(ARGV[1])
local fenced = {}
for i = 1, np do
  fenced[i] = redis.call('GET', KEYS[i]) ~= ARGV[1 + i]
end
local out = {}
local a = np + 2
for k = np + 1, #KEYS do
  local part, expected = tonumber(ARGV[a]), ARGV[a + 1]
  local newpos, ttl, value = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4]
  a = a + 5
  if fenced[part] then
    out[#out + 1] = 2
  else
    local cur = redis.call('GET', KEYS[k])
    local curpos = nil
    if cur then curpos = struct.unpack('<i8', cur, %d) end
    local ok
    if expected == '-' then ok = (cur == false) else ok = (curpos ~= nil and curpos == tonumber(expected)) end
    if ok and curpos ~= nil and newpos <= curpos then ok = false end
    if not ok then
      out[#out + 1] = 1
    elseif ttl > 0 then
      redis.call('SET', KEYS[k], value, 'PX', ttl)
      out[#out + 1] = 0
    else
      redis.call('DEL', KEYS[k])
      out[#out + 1] = 0
    end
  end
end
return out
""" % (LAST_POS_OFFSET + 1)


def _transient(fn):
    """Turn redis-py's connection-level errors into the loop's retryable DependencyError."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, rex.TryAgainError,
                rex.ReadOnlyError, rex.ClusterDownError) as e:
            raise DependencyError("redis", f"{fn.__name__} failed: {e!r}") from e
    return wrapper


class RedisStateStore:
    """The production store: one MGET per load and one script call per store, or, on a
    Redis Cluster, one script call per partition (each in its own slot)."""

    def __init__(self, client, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._write = client.register_script(WRITE_SCRIPT)

    @_transient
    def acquire_epochs(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        if self.keys.cluster:
            return {tp: int(self.client.incr(self.keys.epoch(*tp))) for tp in partitions}
        pipe = self.client.pipeline(transaction=False)
        for topic, p in partitions:
            pipe.incr(self.keys.epoch(topic, p))
        return {tp: int(e) for tp, e in zip(partitions, pipe.execute())}

    @_transient
    def load(self, session_ids: Sequence[str],
             partitions: Sequence[TopicPartition] | None = None) -> list[bytes | None]:
        if not session_ids:
            return []
        parts = partitions if partitions is not None else [None] * len(session_ids)
        keys = [self.keys.session(s, tp) for s, tp in zip(session_ids, parts)]
        if self.keys.cluster:
            return self.client.mget_nonatomic(keys)
        return self.client.mget(keys)

    @_transient
    def store(self, writes: Sequence[StateWrite]) -> list[WriteStatus]:
        if not writes:
            return []
        if not self.keys.cluster:
            return self._store(writes)
        by_partition: dict[TopicPartition, list[int]] = {}
        for i, w in enumerate(writes):
            by_partition.setdefault(w.partition, []).append(i)
        out: list[WriteStatus] = [WriteStatus.STALE] * len(writes)
        for idx in by_partition.values():
            for i, status in zip(idx, self._store([writes[i] for i in idx])):
                out[i] = status
        return out

    def _store(self, writes: Sequence[StateWrite]) -> list[WriteStatus]:
        parts = list(dict.fromkeys((w.partition, w.epoch) for w in writes))
        index = {pe: i + 1 for i, pe in enumerate(parts)}
        keys = [self.keys.epoch(*tp) for tp, _ in parts] + [
            self.keys.session(w.session_id, w.partition) for w in writes]
        args: list = [len(parts), *(str(e) for _, e in parts)]
        for w in writes:
            args += [index[(w.partition, w.epoch)], "-" if w.expected_pos is None else w.expected_pos,
                     w.new_pos, w.ttl_ms, w.value]
        return [WriteStatus(int(s)) for s in self._write(keys=keys, args=args)]

    @_transient
    def ping(self) -> bool:
        if self.keys.cluster:  # ready only if every node answers, not just one
            return bool(self.client.ping(target_nodes=self.client.ALL_NODES))
        return bool(self.client.ping())


@dataclass
class MemoryStateStore:
    """The same contract in process memory, for tests and the Redis-less demo.
    Expiry is checked on read, with an injectable clock."""

    clock: callable = time.monotonic
    _data: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    _epochs: dict[TopicPartition, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire_epochs(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        with self._lock:
            for tp in partitions:
                self._epochs[tp] = self._epochs.get(tp, 0) + 1
            return {tp: self._epochs[tp] for tp in partitions}

    def _get(self, sid: str) -> bytes | None:
        item = self._data.get(sid)
        if item is None:
            return None
        if item[1] <= self.clock():
            del self._data[sid]
            return None
        return item[0]

    def load(self, session_ids: Sequence[str],
             partitions: Sequence[TopicPartition] | None = None) -> list[bytes | None]:
        with self._lock:
            return [self._get(s) for s in session_ids]

    def store(self, writes: Sequence[StateWrite]) -> list[WriteStatus]:
        with self._lock:
            out = []
            for w in writes:
                if self._epochs.get(w.partition) != w.epoch:
                    out.append(WriteStatus.FENCED)
                    continue
                cur = self._get(w.session_id)
                cur_pos = None if cur is None else _HEADER.unpack_from(cur)[6]
                ok = cur is None if w.expected_pos is None else cur_pos == w.expected_pos
                if not ok or (cur_pos is not None and w.new_pos <= cur_pos):
                    out.append(WriteStatus.STALE)
                elif w.ttl_ms > 0:
                    self._data[w.session_id] = (w.value, self.clock() + w.ttl_ms / 1000)
                    out.append(WriteStatus.OK)
                else:
                    self._data.pop(w.session_id, None)
                    out.append(WriteStatus.OK)
            return out

    def ping(self) -> bool:
        return True

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for s in list(self._data) if self._get(s) is not None)
