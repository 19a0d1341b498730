"""A Redis for the simulator: ``MemoryStateStore`` (the same contract as the Lua scripts, expiry
on simulated time) with what Redis does to a worker: lose everything, roll back to an
earlier snapshot, apply a write and lose its reply, refuse calls during an outage.

``StoreView`` is one worker's view, in which "the current model" (namespace None) is that
worker's model id, as ``state.Keys`` makes it for Redis: workers on two models then see each
other's namespaces as they would in Redis (tests/test_rollout.py's ``ModelKeyed``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from worker.codec import ENDED, F16, HEADER, HEADER_V2, MAGIC, MAGIC_V2
from worker.errors import DependencyError
from worker.ports import Claim, PartitionMark, StateWrite, StoreResult, TopicPartition
from worker.state import MemoryStateStore

from .clock import SimClock

Snapshot = tuple[dict, dict]


class SimRedis:
    def __init__(self, clock: SimClock, snapshot_every_s: float = 5.0,
                 snapshots_kept: int = 24) -> None:
        self.clock = clock
        self.memory = MemoryStateStore(clock=clock.time)
        self.down_until = -1.0
        self.lose_reply: set[str] = set()  # "claim", "store": apply the next one, then fail
        self.snapshot_every_s, self.snapshots_kept = snapshot_every_s, snapshots_kept
        self.snapshots: list[tuple[float, Snapshot]] = []

    # --- what Redis does to the worker -----------------------------------------------------

    def _check(self, op: str) -> None:
        if self.clock.now < self.down_until:
            raise DependencyError("redis", f"{op} failed: connection refused (simulated)")

    def _reply(self, op: str) -> None:
        if op in self.lose_reply:
            self.lose_reply.discard(op)
            raise DependencyError("redis", f"{op}: reply lost after the call ran (simulated)")

    def maybe_snapshot(self) -> None:
        """An RDB snapshot every ``snapshot_every_s`` (what a backup or a lagging replica holds)."""
        if self.snapshots and self.clock.now - self.snapshots[-1][0] < self.snapshot_every_s:
            return
        m = self.memory
        self.snapshots.append((self.clock.now, (dict(m._data),
                                                {tp: dict(v) for tp, v in m._marks.items()})))
        del self.snapshots[:-self.snapshots_kept]

    def wipe(self) -> None:
        """Redis restarted empty: every state and every mark is gone."""
        self.memory._data, self.memory._marks = {}, {}

    def rollback(self, age_s: float) -> float | None:
        """Restore the newest snapshot at least ``age_s`` old; returns its time (None: none)."""
        old = [(t, s) for t, s in self.snapshots if t <= self.clock.now - age_s]
        if not old:
            return None
        t, (data, marks) = old[-1]
        self.memory._data = dict(data)
        self.memory._marks = {tp: dict(v) for tp, v in marks.items()}
        return t

    def downgrade(self, ttl_s: float, end_ttl_s: float) -> int:
        """Rewrite every state value in the old GRS2 format (an upgrade from a worker that
        wrote it); returns how many.

        A GRS2 value has no record timestamp, so its key's TTL is its only expiry: a previous
        release wrote it as the record came, a TTL from then. A key the current worker wrote
        for longer (a state rebuilt by a replay is kept a whole TTL from the replay, the
        engine judging expiry by the timestamp in its header) expires as that writer's
        would have, its TTL after its record's timestamp (plus the grace of a live write):
        left longer, it would bring back, with no timestamp to tell, a state that no
        previous release kept."""
        n = 0
        for key, (raw, expiry) in list(self.memory._data.items()):
            if raw[:4] == MAGIC:
                last_ts = HEADER.unpack_from(raw)[-1]
                if last_ts >= 0:
                    ttl = end_ttl_s if raw[4] & ENDED else ttl_s
                    expiry = min(expiry, last_ts / 1000 + ttl + min(60.0, ttl / 10))
                self.memory._data[key] = (to_grs2(raw), expiry)
                n += 1
        return n

    # --- the StateStore port ---------------------------------------------------------------

    def claim(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, Claim]:
        self._check("claim")
        out = self.memory.claim(partitions)
        self._reply("claim")
        return out

    def load(self, session_ids: Sequence[str], partitions: Sequence[TopicPartition] | None = None,
             models: Sequence[str | None] = (None,)) -> list[bytes | None]:
        self._check("load")
        return self.memory.load(session_ids, partitions, models)

    def store(self, marks: Mapping[TopicPartition, PartitionMark],
              writes: Sequence[StateWrite]) -> StoreResult:
        self._check("store")
        out = self.memory.store(marks, writes)
        self._reply("store")
        return out

    def count_sessions(self, models: Sequence[str | None]) -> dict[str | None, tuple[int, int]]:
        self._check("count_sessions")
        return self.memory.count_sessions(models)

    def ping(self) -> bool:
        self._check("ping")
        return True

    def value(self, session_id: str, model_id: str) -> bytes | None:
        """What a session's key holds now, outside any fault (for the oracle)."""
        return self.memory.load([session_id], None, [model_id])[0]


class StoreView:
    """A worker's view of ``SimRedis`` with its current model's id for namespace None."""

    def __init__(self, redis: SimRedis, model_id: str) -> None:
        self.redis, self.model_id = redis, model_id

    def _ids(self, models: Sequence[str | None]) -> list[str]:
        return [self.model_id if m is None else m for m in models]

    def claim(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, Claim]:
        return self.redis.claim(partitions)

    def load(self, session_ids: Sequence[str], partitions: Sequence[TopicPartition] | None = None,
             models: Sequence[str | None] = (None,)) -> list[bytes | None]:
        return self.redis.load(session_ids, partitions, self._ids(models))

    def store(self, marks: Mapping[TopicPartition, PartitionMark],
              writes: Sequence[StateWrite]) -> StoreResult:
        return self.redis.store(marks, [dataclasses.replace(w, model=w.model or self.model_id)
                                        for w in writes])

    def count_sessions(self, models: Sequence[str | None]) -> dict[str | None, tuple[int, int]]:
        ids = self._ids(models)
        counts = self.redis.count_sessions(ids)
        return {m: counts[i] for m, i in zip(models, ids)}

    def ping(self) -> bool:
        return self.redis.ping()


def to_grs2(raw: bytes) -> bytes:
    """A current value in the GRS2 layout: the 36-byte header (no last emitted label, no
    lineage) and no first-seen counts (worker/codec.py)."""
    magic, flags, layers, hidden, labels, n_out, last_pos, tokens, messages, *_ = \
        HEADER.unpack_from(raw)
    assert magic == MAGIC
    h_bytes = layers * hidden * (2 if flags & F16 else 4)
    first = 4 * labels if layers else 0
    body = raw[HEADER.size:HEADER.size + h_bytes]
    rest = raw[HEADER.size + h_bytes + first:]
    return HEADER_V2.pack(MAGIC_V2, flags, layers, hidden, labels, n_out, last_pos, tokens,
                          messages) + body + rest
