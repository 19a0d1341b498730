"""Session state in Redis: the key layout, the fencing claim and the fenced, deduplicating write.

Each input partition has a small hash, its *mark*: the fencing token of its current owner
(the hash field is named ``epoch``, kept so that workers of every version fence each other),
a counter, and ``next_offset``, the next input offset whose effect the states hold. Every
batch goes through one Lua script call that, atomically,

  * refuses every write of a partition whose token is not the writer's (FENCED: a zombie, or a
    Redis that forgot or rolled back the token, writes nothing);
  * refuses a write whose stored position is not the one the writer loaded, or not older
    than the new one (STALE), or whose stored value is not a state (CORRUPT);
  * records ``next_offset`` for each partition whose writes all landed.

``next_offset`` is how a restarted worker tells that Redis lost writes that Kafka's committed
offsets say were done (``worker.loop``, "claim"). The value format is ``worker.codec``.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import redis.exceptions as rex

from .codec import (
    ENDED,
    LAST_POS_OFFSET,
    MAGICS,
    MIN_HEADER,
    mark_status,
    write_status,
)
from .errors import DependencyError
from .ports import (
    Claim,
    PartitionMark,
    StateWrite,
    StoreResult,
    TopicPartition,
    WriteStatus,
)


@dataclass(frozen=True)
class Keys:
    """Every Redis key the worker touches. States are namespaced by model and by ``namespace``
    (the consumer group id unless ``GRU_STATE__NAMESPACE`` says otherwise: a new model never
    reads an old model's state, and two groups never share one); marks by namespace, topic
    and partition, so workers that share a namespace share its fencing tokens too.

    On a Redis Cluster every key starts, right after the prefix, with the hash tag
    ``{topic|partition}``, so a partition's mark and its sessions' states share one slot and
    each write script touches a single slot, whatever the group or session id contains.
    (A session therefore keeps its state only while the input topic keeps its partition count.)
    """

    prefix: str
    model_id: str
    namespace: str
    cluster: bool = False

    def tag(self, partition: TopicPartition | None) -> str:
        if not self.cluster:
            return ""
        if partition is None:
            raise ValueError("on a Redis Cluster a key needs its topic partition")
        return f"{{{partition[0]}|{partition[1]}}}:"

    def session(self, session_id: str, partition: TopicPartition | None = None,
                model_id: str | None = None) -> str:
        """A session's state key under ``model_id`` (None: this worker's current model)."""
        model = self.model_id if model_id is None else model_id
        return f"{self.prefix}:{self.tag(partition)}{model}:{self.namespace}:s:{session_id}"

    def session_pattern(self) -> str:
        """A SCAN pattern matching every session key of the namespace, whatever the model."""
        tag = "{*}:" if self.cluster else ""
        return f"{_glob(self.prefix)}:{tag}*:{_glob(self.namespace)}:s:*"

    def model_of(self, key: str) -> str | None:
        """The model id in a key that ``session_pattern`` matched (None: not a session key)."""
        rest = key[len(self.prefix) + 1:]
        if self.cluster:
            rest = rest.split("}:", 1)[-1]
        model, _, tail = rest.partition(":")
        return model if tail.startswith(f"{self.namespace}:s:") else None

    def mark(self, topic: str, partition: int) -> str:
        return f"{self.prefix}:{self.tag((topic, partition))}p:{self.namespace}:{topic}:{partition}"


CLAIM_SCRIPT = """
-- KEYS: one mark per partition. ARGV: one random nonce per partition.
-- Returns, per partition: the new token, and the recorded next offset ('' when absent).
local out = {}
for i = 1, #KEYS do
  local n = redis.call('HINCRBY', KEYS[i], 'counter', 1)
  local token = n .. ':' .. ARGV[i]
  redis.call('HSET', KEYS[i], 'epoch', token)
  out[#out + 1] = token
  out[#out + 1] = redis.call('HGET', KEYS[i], 'next_offset') or ''
end
return out
"""

WRITE_SCRIPT = """
-- KEYS: P partition marks, then one state key per write.
-- ARGV: P; per partition: token, next offset, expected next offset ('-': none);
--       per write: partition index, expected pos ('-' = absent), new pos ('~' before it:
--       the write replaces a value expired in event time, so it may go back), ttl ms, value.
-- Returns per partition: its status (0 recorded, 2 fenced, 4 behind, 5 not recorded because a
-- write was refused) and its stored next offset ('' if none); then one status per write
-- (codec.write_status: 0 ok, 1 stale, 3 corrupt; or the partition's 2 fenced, 4 behind).
local MAGICS = {%(magics)s}
local np = tonumber(ARGV[1])
local pstatus, stored, clean, out = {}, {}, {}, {}
for i = 1, np do
  local b = 3 * i - 1
  local mark = redis.call('HMGET', KEYS[i], 'epoch', 'next_offset')
  stored[i] = mark[2]
  if mark[1] ~= ARGV[b] then
    pstatus[i] = 2
  elseif ARGV[b + 2] ~= '-' and ((not mark[2]) or tonumber(mark[2]) < tonumber(ARGV[b + 2])) then
    pstatus[i] = 4
  else
    pstatus[i] = 0
  end
  clean[i] = true
  out[2 * i - 1] = pstatus[i]
  out[2 * i] = mark[2] or ''
end
local a = 3 * np + 2
for k = np + 1, #KEYS do
  local part, expected = tonumber(ARGV[a]), ARGV[a + 1]
  local replaces = string.sub(ARGV[a + 2], 1, 1) == '~'
  local newpos = tonumber(replaces and string.sub(ARGV[a + 2], 2) or ARGV[a + 2])
  local ttl, value = tonumber(ARGV[a + 3]), ARGV[a + 4]
  a = a + 5
  local status = pstatus[part]
  if status == 0 then
    local cur = redis.call('GET', KEYS[k])
    if not cur then
      status = (expected == '-') and 0 or 1
    elseif #cur < %(header)d or not MAGICS[string.sub(cur, 1, 4)] then
      status = 3
    else
      local curpos = struct.unpack('<i8', cur, %(pos)d)
      if expected == '-' or curpos ~= tonumber(expected) or (newpos <= curpos and not replaces) then
        status = 1
      end
    end
    if status == 0 then
      redis.call('SET', KEYS[k], value, 'PX', ttl)
    else
      clean[part] = false
    end
  end
  out[#out + 1] = status
end
for i = 1, np do
  if pstatus[i] == 0 then
    if clean[i] then
      local new = tonumber(ARGV[3 * i])
      if new > tonumber(stored[i] or '-1') then
        redis.call('HSET', KEYS[i], 'next_offset', ARGV[3 * i])
      end
    else
      out[2 * i - 1] = 5
    end
  end
end
return out
""" % {"header": MIN_HEADER, "magics": ", ".join(f"{m.decode()}=true" for m in MAGICS),
       "pos": LAST_POS_OFFSET + 1}


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


def _glob(text: str) -> str:
    """``text`` with Redis glob metacharacters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def new_nonce() -> str:
    return secrets.token_hex(8)


class RedisStateStore:
    """The production store: one MGET per load and one script call per store, or, on a
    Redis Cluster, one script call per partition (each in its own slot)."""

    def __init__(self, client, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._write = client.register_script(WRITE_SCRIPT)

    @_transient
    def claim(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, Claim]:
        groups = [[tp] for tp in partitions] if self.keys.cluster else [list(partitions)]
        out: dict[TopicPartition, Claim] = {}
        for tps in groups:
            if not tps:
                continue
            flat = self._claim(keys=[self.keys.mark(*tp) for tp in tps],
                               args=[new_nonce() for _ in tps])
            for i, tp in enumerate(tps):
                token, nxt = flat[2 * i], flat[2 * i + 1]
                out[tp] = Claim(_text(token), _offset(nxt))
        return out

    @_transient
    def load(self, session_ids: Sequence[str], partitions: Sequence[TopicPartition],
             models: Sequence[str | None] = (None,)) -> list[bytes | None]:
        if not session_ids:
            return []
        keys = [self.keys.session(s, tp, m) for m in models
                for s, tp in zip(session_ids, partitions)]
        if self.keys.cluster:
            return self.client.mget_nonatomic(keys)
        return self.client.mget(keys)

    @_transient
    def store(self, marks: Mapping[TopicPartition, PartitionMark],
              writes: Sequence[StateWrite]) -> StoreResult:
        _check_marked(marks, writes)
        if not self.keys.cluster:
            return self._store(list(marks), marks, writes)
        by_partition: dict[TopicPartition, list[int]] = {tp: [] for tp in marks}
        for i, w in enumerate(writes):
            by_partition[w.partition].append(i)
        statuses: list[WriteStatus] = [WriteStatus.STALE] * len(writes)
        parts: list[StoreResult] = []
        for tp, idx in by_partition.items():
            res = self._store([tp], marks, [writes[i] for i in idx])
            parts.append(res)
            for i, status in zip(idx, res.statuses):
                statuses[i] = status
        return StoreResult(statuses, frozenset().union(*(r.fenced for r in parts)),
                           {tp: n for r in parts for tp, n in r.behind.items()},
                           frozenset().union(*(r.recorded for r in parts)))

    def _store(self, parts: list[TopicPartition], marks: Mapping[TopicPartition, PartitionMark],
               writes: Sequence[StateWrite]) -> StoreResult:
        index = {tp: i + 1 for i, tp in enumerate(parts)}
        keys = [self.keys.mark(*tp) for tp in parts] + [
            self.keys.session(w.session_id, w.partition, w.model) for w in writes]
        args: list = [len(parts)]
        for tp in parts:
            m = marks[tp]
            args += [m.token, m.next_offset, "-" if m.expected is None else m.expected]
        for w in writes:
            args += [index[w.partition], "-" if w.expected_pos is None else w.expected_pos,
                     f"~{w.new_pos}" if w.replaces else w.new_pos, w.ttl_ms, w.value]
        flat = self._write(keys=keys, args=args)
        head = flat[:2 * len(parts)]
        by_part = {tp: (int(head[2 * i]), _offset(head[2 * i + 1])) for i, tp in enumerate(parts)}
        return StoreResult(
            [WriteStatus(int(s)) for s in flat[2 * len(parts):]],
            frozenset(tp for tp, (st, _) in by_part.items() if st == WriteStatus.FENCED),
            {tp: nxt for tp, (st, nxt) in by_part.items() if st == WriteStatus.BEHIND},
            frozenset(tp for tp, (st, _) in by_part.items() if st == 0))

    @_transient
    def count_sessions(self, models: Sequence[str | None]) -> dict[str | None, tuple[int, int]]:
        """SCAN the namespace's session keys (every node of a cluster), and read each one's
        flags byte (ended or not), a page of keys per pipelined round trip."""
        ids = {self.keys.model_id if m is None else m: m for m in models}
        counts = {m: [0, 0] for m in models}
        page: list[tuple[str | None, bytes]] = []

        def flush() -> None:
            pipe = self.client.pipeline(transaction=False)
            for _, key in page:
                pipe.getrange(key, 4, 4)
            for (m, _), flags in zip(page, pipe.execute()):
                if flags:  # gone since the scan saw it: nothing to count
                    counts[m][1 if flags[0] & ENDED else 0] += 1
            page.clear()

        for key in self.client.scan_iter(match=self.keys.session_pattern(), count=1000):
            model = self.keys.model_of(_text(key))
            if model in ids:
                page.append((ids[model], key))
                if len(page) >= 1000:
                    flush()
        if page:
            flush()
        return {m: (c[0], c[1]) for m, c in counts.items()}

    @_transient
    def ping(self) -> bool:
        if self.keys.cluster:  # ready only if every node answers, not just one
            return bool(self.client.ping(target_nodes=self.client.ALL_NODES))
        return bool(self.client.ping())


def _check_marked(marks: Mapping[TopicPartition, PartitionMark],
                  writes: Sequence[StateWrite]) -> None:
    missing = {w.partition for w in writes} - set(marks)
    if missing:
        raise ValueError(f"writes for partitions without a mark (no fencing token): {missing}")


def _offset(v) -> int | None:
    return None if v in (b"", "", None) else int(v)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class MemoryStateStore:
    """The same contract in process memory, for tests and the Redis-less demo. Expiry is
    checked on read, with an injectable clock; the write rule is ``codec.write_status``.
    A value is keyed by its session id under the current model, by ``(model, session id)``
    under another (``StateWrite.model``)."""

    clock: Callable[[], float] = time.monotonic
    _data: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    _marks: dict[TopicPartition, dict[str, object]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, Claim]:
        with self._lock:
            out = {}
            for tp in partitions:
                mark = self._marks.setdefault(tp, {"counter": 0})
                mark["counter"] = int(mark["counter"]) + 1
                mark["epoch"] = f"{mark['counter']}:{new_nonce()}"
                out[tp] = Claim(str(mark["epoch"]), mark.get("next_offset"))  # type: ignore[arg-type]
            return out

    @staticmethod
    def _key(sid: str, model: str | None):
        return sid if model is None else (model, sid)

    def _get(self, sid) -> bytes | None:
        item = self._data.get(sid)
        if item is None:
            return None
        if item[1] <= self.clock():
            del self._data[sid]
            return None
        return item[0]

    def load(self, session_ids: Sequence[str],
             partitions: Sequence[TopicPartition] | None = None,
             models: Sequence[str | None] = (None,)) -> list[bytes | None]:
        with self._lock:
            return [self._get(self._key(s, m)) for m in models for s in session_ids]

    def count_sessions(self, models: Sequence[str | None]) -> dict[str | None, tuple[int, int]]:
        with self._lock:
            out = {}
            for m in models:
                values = [v for k in list(self._data)
                          if (k[0] == m if isinstance(k, tuple) else m is None)
                          and (v := self._get(k)) is not None]
                ended = sum(1 for v in values if len(v) > 4 and v[4] & ENDED)
                out[m] = (len(values) - ended, ended)
            return out

    def store(self, marks: Mapping[TopicPartition, PartitionMark],
              writes: Sequence[StateWrite]) -> StoreResult:
        _check_marked(marks, writes)
        with self._lock:
            pstatus = {}
            for tp, m in marks.items():
                mark = self._marks.get(tp, {})
                pstatus[tp] = mark_status(mark.get("epoch"), mark.get("next_offset"),  # type: ignore[arg-type]
                                          m.token, m.expected)
            clean = {tp for tp, st in pstatus.items() if st == WriteStatus.OK}
            out = []
            for w in writes:
                status = pstatus[w.partition]
                if status == WriteStatus.OK:
                    key = self._key(w.session_id, w.model)
                    status = write_status(self._get(key), w.expected_pos, w.new_pos, w.replaces)
                    if status == WriteStatus.OK:
                        self._data[key] = (w.value, self.clock() + w.ttl_ms / 1000)
                    else:
                        clean.discard(w.partition)
                out.append(status)
            for tp in clean:
                mark = self._marks[tp]
                mark["next_offset"] = max(int(mark.get("next_offset", -1)), marks[tp].next_offset)  # type: ignore[arg-type]
            return StoreResult(
                out, frozenset(tp for tp, st in pstatus.items() if st == WriteStatus.FENCED),
                {tp: self._marks[tp].get("next_offset") for tp, st in pstatus.items()  # type: ignore[misc]
                 if st == WriteStatus.BEHIND},
                frozenset(clean))

    def ping(self) -> bool:
        return True

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for s in list(self._data) if self._get(s) is not None)
