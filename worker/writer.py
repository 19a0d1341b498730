"""Step 3 of the order of effects: write a batch's session states, fenced and deduplicated.

One script call writes every session update of the batch together with each partition's
mark (our fencing token, the next offset applied). A write refused as STALE or CORRUPT (another
writer, a rollback since the load) is loaded and stepped again, up to ``RESTEP_ATTEMPTS``
times; what still does not land is rewound (its partition is committed only below it). A
partition whose token is gone is dropped (FENCED); one whose recorded offset went back is
rebuilt (BEHIND, ``worker.recovery``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .clock import Clock
from .engine import BatchResult, SessionUpdate
from .messages import TokenMessage
from .metrics import Metrics
from .models import ModelSet
from .ownership import Ownership
from .ports import (
    PartitionMark,
    Record,
    Source,
    StateStore,
    StateWrite,
    StoreResult,
    TopicPartition,
    WriteStatus,
)
from .recovery import Recovery
from .retry import Retrier

log = logging.getLogger("worker.loop")

RESTEP_ATTEMPTS = 3  # reloads of a session whose write was refused as STALE, per batch
GRACE_MS = 60_000  # how long a key outlives its event-time expiry (at most a tenth of its TTL)


def store_ttl_ms(ttl_ms: int, last_ts: int, now_ms: int) -> int:
    """How long the store keeps a state: until its TTL has passed since its last message's
    record timestamp (event time, as the engine judges expiry), plus a grace for the lag of
    a worker and the skew of a producer's clock. A state rebuilt from old records so expires
    when the original would have, not a whole TTL after the replay."""
    grace = min(GRACE_MS, ttl_ms // 10)
    if last_ts < 0:  # no record timestamp: from now
        return ttl_ms
    return max(0, min(ttl_ms, ttl_ms - (now_ms - last_ts))) + grace


@dataclass
class Written:
    """What step 3 leaves for steps 4 and 5."""

    result: BatchResult
    fenced: set[TopicPartition]  # another owner took them: nothing produced or committed
    behind: set[TopicPartition]  # Redis lost writes: rewound, replayed from what it holds
    held: dict[TopicPartition, int]  # rewound to this offset (a write that never landed)
    deferred: int = 0  # messages of held sessions, redelivered later

    @property
    def skipped(self) -> set[TopicPartition]:
        return self.fenced | self.behind


class StateWriter:
    def __init__(self, store: StateStore, source: Source, models: ModelSet,
                 ownership: Ownership, recovery: Recovery, retrier: Retrier,
                 metrics: Metrics, clock: Clock) -> None:
        self.store, self.source, self.models = store, source, models
        self.ownership, self.recovery, self.retry, self.metrics = (ownership, recovery,
                                                                   retrier, metrics)
        self.clock = clock

    def write(self, records: Sequence[Record], messages: Sequence[TokenMessage],
              result: BatchResult) -> Written:
        """Write every session update with the batch's partition marks; re-step sessions
        whose write was refused as STALE or CORRUPT; rewind what still does not land, and the
        partitions whose recorded offset went back under us."""
        next_offset: dict[TopicPartition, int] = {}
        first: dict[TopicPartition, int] = {}
        for r in records:
            tp = (r.topic, r.partition)
            first[tp] = min(r.offset, first.get(tp, r.offset))
            next_offset[tp] = max(r.offset + 1, next_offset.get(tp, 0))
        marks = {tp: self.ownership.mark(tp, nxt) for tp, nxt in next_offset.items()}
        res = self._store(marks, result.updates)
        fenced, behind = set(res.fenced), dict(res.behind)
        refused = self._refused(result.updates, res)
        for _ in range(RESTEP_ATTEMPTS):
            if not refused:
                break
            sids = set(refused)
            log.warning("%d session writes refused (another writer or a Redis rollback "
                        "since the load): stepping them again", len(sids))
            skip = fenced | set(behind)
            again_msgs = [m for m in messages if m.session_id in sids
                          and (m.record.topic, m.record.partition) not in skip]
            again = self.models.reapply(again_msgs, refused, self.recovery.hints()[1])
            result = result.without_sessions(sids)
            result.merge(again)
            parts = {(m.record.topic, m.record.partition) for m in again_msgs}
            res = self._store({tp: marks[tp] for tp in parts}, again.updates)
            fenced |= res.fenced
            behind.update(res.behind)
            refused = self._refused(again.updates, res)
        held: dict[TopicPartition, int] = {}
        deferred = 0
        if refused:
            result = result.without_sessions(set(refused))
            for m in messages:
                tp = (m.record.topic, m.record.partition)
                if m.session_id in refused and tp not in fenced and tp not in behind:
                    held[tp] = min(held.get(tp, m.record.offset), m.record.offset)
                    deferred += 1
            for tp, offset in held.items():
                log.error("%s[%d]: %d session writes still refused after %d attempts: rewinding "
                          "to offset %d to apply them again", *tp, len(refused),
                          RESTEP_ATTEMPTS, offset)
                self.source.seek(tp, offset)
        for tp in set(marks) - fenced - set(behind) - set(held):
            # every write of the partition landed, some on a retry that found its first
            # attempt already in (a lost reply): the script recorded the offset that time
            self.ownership.recorded[tp] = max(marks[tp].next_offset,
                                              self.ownership.recorded.get(tp) or -1)
        if behind:
            self.recovery.rewind_behind(behind, first)
        if fenced:
            self.ownership.fenced(fenced)
            self.source.rejoin()
        return Written(result, fenced, set(behind), held, deferred)

    def _store(self, marks: dict[TopicPartition, PartitionMark],
               updates: Sequence[SessionUpdate]) -> StoreResult:
        now_ms = int(self.clock.time() * 1000)
        writes = [StateWrite(u.session_id, u.partition, u.expected_pos, u.new_pos, u.value,
                             u.ttl_ms if self._replayed(u) else
                             store_ttl_ms(u.ttl_ms, u.last_ts, now_ms), u.model, u.replaces)
                  for u in updates]
        res = self.retry.call(lambda: self.store.store(marks, writes))
        self.ownership.note_recorded(marks, res)
        return res

    def _replayed(self, u: SessionUpdate) -> bool:
        """Whether ``u`` rebuilds a state from records being replayed. Its store TTL then
        counts a whole TTL from now, not from its last record's timestamp: a replay runs
        behind event time by as long as it takes (a crash loop, an outage), and the state
        must outlive it until the session's next message, which may lie anywhere up to a TTL
        after that record, is applied. The engine judges expiry by record timestamps, so a
        key kept longer changes nothing but memory."""
        return self.recovery.suppressed(u.table.records[u.steps[-1]])

    def _refused(self, updates: Sequence[SessionUpdate],
                 res: StoreResult) -> dict[str, tuple[str | None, bytes | None]]:
        """Sessions whose write did not land, with the model namespace they were written
        under and their value there now. A refusal can be our own write: the first attempt
        ran, its reply was lost (Redis restarted or timed out) and the retry found the
        position already moved. The stored value is then byte-for-byte ours, so it counts
        as written."""
        bad = [u for u, st in zip(updates, res.statuses)
               if st in (WriteStatus.STALE, WriteStatus.CORRUPT)]
        out: dict[str, tuple[str | None, bytes | None]] = {}
        for model in {u.model for u in bad}:
            these = [u for u in bad if u.model == model]
            current = self.retry.call(lambda: self.store.load(
                [u.session_id for u in these], [u.partition for u in these], (model,)))
            out.update({u.session_id: (model, value) for u, value in zip(these, current)
                        if value != u.value})
        return out
