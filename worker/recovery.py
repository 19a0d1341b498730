"""Recovery: what a worker checks when it takes a partition, and the replay that rebuilds
states the state store lost.

A session's state is a pure function of its messages, and its messages are in Kafka: the
input topic is the states' changelog, Redis a cache of it that the worker checks.

* **At a claim** (``claim``), the partition's ``next_offset`` in the store (the next input
  offset whose effect the states hold) is compared with the group's committed offset. Behind
  it, the store lost writes (a restore, a failover): replay from ``next_offset``. No record at
  all while Kafka has a committed offset: the store lost everything: replay from the first
  offset inside the state TTL.
* **Under a running worker** (``rewind_behind``), a write finding ``next_offset`` behind the
  one this worker last saw recorded means the same: replay from what the store holds.
* **The replay** applies the records up to the committed offset again; deduplication by
  position makes it exact; their outputs are *suppressed* (``suppressed``: they were produced
  before). It ends when the partition reaches the committed offset (``advanced``); until then
  the worker is not ready. Commits never move the group back during a replay.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .clock import Clock
from .config import StateSettings
from .metrics import Metrics
from .ownership import Ownership
from .ports import Record, Source, StateStore, TopicPartition
from .retry import Retrier

log = logging.getLogger("worker.loop")


@dataclass
class Rebuild:
    """A partition being replayed: records below ``until`` (the group's committed offset)
    are applied again with their outputs suppressed."""

    reason: str  # "rollback" (the store is behind the commits) or "loss" (it has nothing)
    start: int
    until: int
    began: float
    messages: int = 0


class Recovery:
    def __init__(self, settings: StateSettings, store: StateStore, source: Source,
                 ownership: Ownership, retrier: Retrier, metrics: Metrics, clock: Clock) -> None:
        self.settings, self.store, self.source = settings, store, source
        self.ownership, self.retry, self.metrics, self.clock = ownership, retrier, metrics, clock
        self.rebuilds: dict[TopicPartition, Rebuild] = {}

    # --- at a claim ---------------------------------------------------------------------------

    def claim(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Take tokens; compare what the store holds with what Kafka says was done. Returns
        where each partition resumes: the committed offset (or where the reset policy starts
        when nothing was committed), or earlier to rebuild what the store lost."""
        claims = self.retry.call(lambda: self.store.claim(tps))
        committed = self.retry.call(lambda: self.source.committed(tps))
        fresh = [tp for tp in tps if committed.get(tp) is None]
        policy = self.retry.call(lambda: self.source.reset_offsets(fresh)) if fresh else {}
        starts: dict[TopicPartition, int] = {}
        for tp in tps:
            claim, done = claims[tp], committed.get(tp)
            self.ownership.claimed(tp, claim)
            starts[tp] = done if done is not None else policy[tp]
            start, reason = None, ""
            if claim.next_offset is not None:
                if done is not None and claim.next_offset < done:
                    start, reason = claim.next_offset, "rollback"
            elif done is not None and done > 0:
                found = self._ttl_window_start(tp)
                if found is not None and found < done:
                    start, reason = found, "loss"
            if start is None:
                continue
            starts[tp] = start
            self._begin(tp, reason, start, done)
            log.error("%s[%d]: Redis holds this partition's states up to offset %s, but the "
                      "group committed %d (%s): replaying offsets %d..%d to rebuild them, "
                      "outputs suppressed", tp[0], tp[1], claim.next_offset, done,
                      "Redis lost writes" if reason == "rollback" else "Redis lost everything",
                      start, done - 1)
        log.info("claimed %s", self.ownership.describe(tps))
        return starts

    def _ttl_window_start(self, tp: TopicPartition) -> int | None:
        since = int(self.clock.time() * 1000) - self.settings.ttl_seconds * 1000
        return self.retry.call(lambda: self.source.offsets_for_time([tp], since)).get(tp)

    def _begin(self, tp: TopicPartition, reason: str, start: int, until: int) -> None:
        self.metrics.rebuilds.labels(reason).inc()
        if start < until:
            self.rebuilds[tp] = Rebuild(reason, start, until, self.clock.monotonic())

    # --- under a running worker ---------------------------------------------------------------

    def rewind_behind(self, behind: Mapping[TopicPartition, int | None],
                      first: Mapping[TopicPartition, int]) -> None:
        """Redis lost writes under us (restored from a snapshot, failed over to a lagging
        replica) while our token survived: replay from what it still holds up to this batch,
        outputs suppressed (they were produced), then this batch again."""
        for tp, stored in behind.items():
            done = max(first[tp], self.rebuilds[tp].until if tp in self.rebuilds else 0)
            start = stored
            if start is None:
                found = self._ttl_window_start(tp)
                start = done if found is None else min(found, done)
            self.source.seek(tp, start)
            self.ownership.recorded[tp] = stored
            self._begin(tp, "rollback", start, done)
            log.error("%s[%d]: Redis holds this partition's states up to offset %s, behind the "
                      "offsets this worker recorded (Redis lost writes under it): replaying "
                      "offsets %d..%d to rebuild them, outputs suppressed", tp[0], tp[1], stored,
                      start, done - 1)

    # --- the replay ---------------------------------------------------------------------------

    def suppressed(self, record: Record) -> bool:
        """Outputs of records being rebuilt are not produced: they were, before."""
        rb = self.rebuilds.get((record.topic, record.partition))
        return rb is not None and record.offset < rb.until

    def replayed(self, tp: TopicPartition, messages: int) -> None:
        self.rebuilds[tp].messages += messages

    def committable(self, offsets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The offsets a commit may carry: a rebuild replays below the committed offset, and
        the group is never moved back."""
        out = {}
        for tp, offset in offsets.items():
            rb = self.rebuilds.get(tp)
            if rb is None or offset > rb.until:
                out[tp] = offset
        return out

    def advanced(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        """Partitions settled up to these offsets: a rebuild that reached its end is over."""
        for tp, nxt in next_offsets.items():
            rb = self.rebuilds.get(tp)
            if rb is not None and nxt >= rb.until:
                del self.rebuilds[tp]
                log.warning("%s[%d]: rebuild finished: %d messages replayed in %.1fs",
                            *tp, rb.messages, self.clock.monotonic() - rb.began)

    def forget(self, partitions) -> None:
        for tp in partitions:
            self.rebuilds.pop(tp, None)

    @property
    def rebuilding(self) -> list[str]:
        return sorted(f"{t}[{p}]" for t, p in self.rebuilds)
