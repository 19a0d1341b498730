"""Which partitions this worker holds, and the fencing token it writes each one with.

The group assigns and revokes partitions inside the client's poll; the rebalance callbacks
only note it here (``assigned``, ``revoked``). The loop claims the noted partitions before
its next write (``claimed``): a claim takes a new, never reused token per partition in the
state store, so any older owner is fenced from then on. ``recorded`` is the partition's
``next_offset`` as this worker last saw it recorded in the store: a write finding the
store's one behind it means the store lost writes under this worker (``WriteStatus.BEHIND``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from .metrics import Metrics
from .ports import Claim, PartitionMark, StoreResult, TopicPartition

log = logging.getLogger("worker.loop")


class Ownership:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.owned: set[TopicPartition] = set()  # assigned to us by the group
        self.unclaimed: set[TopicPartition] = set()  # assigned, token not taken yet
        self.tokens: dict[TopicPartition, str] = {}  # our fencing token per claimed partition
        self.recorded: dict[TopicPartition, int | None] = {}  # next_offset last seen recorded

    # --- the group's decisions (inside poll: note them, nothing more) ---------------------

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        self.owned |= set(partitions)
        self.unclaimed |= set(partitions)
        self.metrics.assigned.set(len(self.owned))

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self.owned.discard(tp)
            self.unclaimed.discard(tp)
            self.tokens.pop(tp, None)
            self.recorded.pop(tp, None)
        self.metrics.assigned.set(len(self.owned))

    # --- claims and writes -------------------------------------------------------------------

    def claimed(self, tp: TopicPartition, claim: Claim) -> None:
        self.tokens[tp] = claim.token
        self.recorded[tp] = claim.next_offset
        self.unclaimed.discard(tp)

    def holds(self, tp: TopicPartition) -> bool:
        """Claimed and not revoked or fenced since: its records are ours to apply."""
        return tp in self.tokens

    def mark(self, tp: TopicPartition, next_offset: int) -> PartitionMark:
        """What a write of this partition carries: our token, the next offset it applies, and
        the next offset we last saw recorded (which the store's must not be behind)."""
        return PartitionMark(self.tokens[tp], next_offset, self.recorded.get(tp))

    def note_recorded(self, marks: Mapping[TopicPartition, PartitionMark],
                      result: StoreResult) -> None:
        for tp in result.recorded:
            prev = self.recorded.get(tp)
            self.recorded[tp] = max(marks[tp].next_offset, -1 if prev is None else prev)

    def fenced(self, partitions: Iterable[TopicPartition]) -> None:
        """Another owner took these (or the store forgot our token): we hold them no more."""
        n = 0
        for tp in partitions:
            log.error("fenced on %s[%d]: another worker owns it now, or Redis lost its token; "
                      "dropping it, writing nothing, rejoining the group", *tp)
            self.tokens.pop(tp, None)
            n += 1
        self.metrics.fenced_partitions.inc(n)

    def describe(self, partitions: Iterable[TopicPartition]) -> str:
        return ", ".join(f"{t}[{p}]@{self.tokens[(t, p)].split(':')[0]}" for t, p in partitions)
