"""Recovery: what a worker checks when it takes a partition, and the replay that rebuilds
states the state store lost.

A session's state is a pure function of its messages, and its messages are in Kafka: the
input topic is the states' changelog, Redis a cache of it that the worker checks.

* **At a claim** (``claim``), three records are read: the partition's ``next_offset`` in the
  store (the next input offset whose effect the states hold), the group's committed offset,
  and the partition's checkpoint in Kafka (``worker.checkpoint``: the highest offset this
  group's workers checkpointed, and the lineage). Then:

  1. *Someone else moved the offset.* A committed offset past the highest checkpointed one
     was not committed by this group's workers (they checkpoint before they commit): an
     operator skipped records (docs/reliability.md, "Undecodable input"). The skip is
     honoured: the partition resumes there, and sessions live at the skip continue marked
     partial (they may have had messages in the skipped records). What the store lost below
     the checkpointed offset is rebuilt first (2, 3), then the partition jumps to the skip.
  2. *The store lost writes* (``next_offset`` behind the group's progress: a restore, a
     failover): replay from ``next_offset``.
  3. *The store lost everything* (no record while Kafka has progress): replay from the
     lineage's first offset of the oldest live session, so a session older than the TTL is
     rebuilt whole as long as the log still holds its beginning. Without a checkpoint (a
     group from before them), from the first offset inside the state TTL.
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
from dataclasses import dataclass, field

from .checkpoint import Checkpointer, Found, Lineage
from .clock import Clock
from .config import StateSettings
from .metrics import Metrics
from .engine import NO_GAP, Continuity
from .errors import UndecodableInput
from .models import ModelSet, RolloutStart
from .ownership import Ownership
from .ports import Claim, Record, Source, StateStore, TopicPartition
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
    gaps: list[tuple[int, int]] = field(default_factory=list)  # skipped ranges: jumped
    first_seen: int | None = None  # the first offset replayed (past start: retention cut it)
    skipped_to: int | None = None  # the replay ended at a skip: recorded once it is settled


class Recovery:
    def __init__(self, settings: StateSettings, store: StateStore, source: Source,
                 ownership: Ownership, checkpoint: Checkpointer, models: ModelSet,
                 retrier: Retrier, metrics: Metrics, clock: Clock) -> None:
        self.settings, self.store, self.source = settings, store, source
        self.ownership, self.checkpoint, self.models = ownership, checkpoint, models
        self.retry, self.metrics, self.clock = retrier, metrics, clock
        self.rebuilds: dict[TopicPartition, Rebuild] = {}
        self.floor: dict[TopicPartition, int] = {}  # the group's committed offset at the claim

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
            found = self.retry.call(lambda: self.checkpoint.read(tp))
            self.ownership.claimed(tp, claims[tp])
            lineage = self.checkpoint.claimed(tp, found)
            done = committed.get(tp)
            if done is not None:
                self.floor[tp] = done
            starts[tp] = self._plan(tp, claims[tp], done, found, lineage,
                                    done if done is not None else policy[tp])
            prev = self.models.previous
            resume = done if done is not None else policy[tp]
            lineage.serving(self.models.current.model_id, prev and prev.model_id, resume)
            # Checkpointed (and committed again) at once, even before any progress: an
            # operator's later move of the offset is then told apart from this group's own.
            self.checkpoint.acknowledged({tp: resume})
        log.info("claimed %s", self.ownership.describe(tps))
        return starts

    def _plan(self, tp: TopicPartition, claim: Claim, done: int | None, found: Found | None,
              lineage: Lineage, resume: int) -> int:
        """Where ``tp`` resumes (module docstring, "At a claim")."""
        if done is None:
            return resume
        now_ms = int(self.clock.time() * 1000)
        if found is None and done > 0:
            # Progress from before any checkpoint record: sessions of unknown start may live
            # for another TTL, so a loss meanwhile replays the whole retained log.
            lineage.note(-1, now_ms + max(self.settings.ttl_seconds,
                                          self.settings.end_ttl_seconds) * 1000)
        ours = done if found is None else min(done, found.offset)  # this group's progress
        if found is not None and done > found.offset:
            lineage.skips.append((found.offset, done, now_ms))
            self.metrics.offset_skips.inc()
            log.warning("%s[%d]: the group's offset was moved to %d, past the %d this group's "
                        "workers reached (an operator's skip): resuming there; sessions live "
                        "at the skip are marked partial", tp[0], tp[1], done, found.offset)
        nxt = claim.next_offset
        if nxt is not None:
            start, reason = (nxt, "rollback") if nxt < ours else (None, "")
        elif ours > 0:
            start = lineage.replay_from(now_ms)
            start = None if start is None or start >= ours else start
            reason = "loss"
        else:
            start = None
        if start is None:
            if done > ours:
                self._skipped_to(tp, done)
            return done
        resumes = self._begin(tp, reason, start, done, lineage.gaps(start, done))
        log.error("%s[%d]: Redis holds this partition's states up to offset %s, but the group "
                  "reached %d (%s): replaying offsets %d..%d to rebuild them, outputs "
                  "suppressed", tp[0], tp[1], nxt, ours,
                  "Redis lost writes" if reason == "rollback" else "Redis lost everything",
                  start, ours - 1)
        return resumes

    def _skipped_to(self, tp: TopicPartition, offset: int) -> None:
        """Record in the store that its states hold the partition's effects up to ``offset``
        (the skipped records have none): a later claim must not take the skip for a loss."""
        marks = {tp: self.ownership.mark(tp, offset)}
        result = self.retry.call(lambda: self.store.store(marks, []))
        self.ownership.note_recorded(marks, result)

    def _begin(self, tp: TopicPartition, reason: str, start: int, until: int,
               gaps: list[tuple[int, int]] | None = None) -> int:
        """Begin replaying ``[start, until)`` less the skipped ``gaps``; returns where the
        partition resumes (past a gap that holds ``start``)."""
        self.metrics.rebuilds.labels(reason).inc()
        gaps = sorted(gaps or [])
        for a, b in gaps:
            if a <= start < b:
                start = b
        if start < until:
            self.rebuilds[tp] = Rebuild(reason, start, until, self.clock.monotonic(),
                                        gaps=[g for g in gaps if g[0] >= start])
        else:
            self._skipped_to(tp, until)
        return min(start, until)

    # --- what a batch needs to know -----------------------------------------------------------

    def admit(self, records: Sequence[Record]) -> list[Record]:
        """The records to apply: a rebuild jumps the ranges an operator skipped, as the live
        run did (they may be undecodable): what it polled in one is dropped, and the
        partition goes on at its end, once the records before it are in."""
        for r in records:
            tp = (r.topic, r.partition)
            rb = self.rebuilds.get(tp)
            if rb is not None and rb.first_seen is None:
                rb.first_seen = r.offset
                if rb.reason == "rollback" and r.offset > rb.start and tp in self.checkpoint.lineage:
                    # retention deleted records Redis had not applied: a session written
                    # before them cannot be brought up to date; it begins again from what
                    # the log holds, partial (as after a total loss)
                    log.error("%s[%d]: the log no longer holds offsets %d..%d that Redis lost; "
                              "sessions last written before them begin again, partial", *tp,
                              rb.start, r.offset - 1)
                    self.checkpoint.lineage[tp].cuts.append(
                        (r.offset, int(self.clock.time() * 1000)))
        if not any(rb.gaps for rb in self.rebuilds.values()):
            return list(records)
        keep, jump = [], {}
        for r in records:
            tp = (r.topic, r.partition)
            rb = self.rebuilds.get(tp)
            gap = next((g for g in rb.gaps if r.offset >= g[0] - 1), None) if rb else None
            if gap is not None and tp not in jump:
                jump[tp] = gap
            if tp in jump and r.offset >= jump[tp][0]:
                continue  # in or after the skipped range: read again from its end
            keep.append(r)
        for tp, (begin, end) in jump.items():
            rb = self.rebuilds[tp]
            rb.gaps = [g for g in rb.gaps if g[0] > end]
            self.source.seek(tp, end)
            if end >= rb.until:  # nothing to replay after the skip: the replay ends at it
                rb.until, rb.skipped_to = max(rb.start, begin), end
                if not any((r.topic, r.partition) == tp for r in keep):
                    self.advanced({tp: end})
            # (a skip inside the replay: its records' writes record the offsets past it)
        return keep

    def known_skip(self, e: UndecodableInput) -> bool:
        """A batch the client cannot decode, inside a range an operator already moved the
        group past (the lineage's skips), met again by a replay that starts below it (the
        records before it deleted by retention, or none left to read there): the partition
        jumps it, as ``admit`` jumps one it reads into. False: not a known skip, the operator
        decides (docs/reliability.md, "Undecodable input")."""
        if e.topic is None or e.partition is None or e.offset is None:
            return False
        tp = (e.topic, e.partition)
        lineage = self.checkpoint.lineage.get(tp)
        if lineage is None or not self.ownership.holds(tp):
            return False
        gap = next(((a, b) for a, b, _ in lineage.skips if a <= e.offset < b), None)
        if gap is None:
            return False
        begin, end = gap
        log.warning("%s[%d]: the undecodable batch at offset %d lies in offsets %d..%d an "
                    "operator skipped: jumping them again", *tp, e.offset, begin, end - 1)
        self.source.seek(tp, end)
        rb = self.rebuilds.get(tp)
        if rb is not None:
            rb.gaps = [g for g in rb.gaps if g[0] >= end]
            if end >= rb.until:  # nothing to replay after the skip: the replay ends at it
                rb.until, rb.skipped_to = max(rb.start, begin), end
                self.advanced({tp: end})
        return True

    def hints(self) -> tuple[dict[TopicPartition, RolloutStart],
                             dict[TopicPartition, Continuity]]:
        """Per claimed partition: where the current model began new sessions, and what its
        states never applied (``engine.Continuity``)."""
        begins, gaps = {}, {}
        current = self.models.current.model_id
        for tp, lineage in self.checkpoint.lineage.items():
            since = lineage.began(current)
            rb = self.rebuilds.get(tp)
            if since and rb is not None and rb.first_seen is not None and (
                    rb.start < rb.first_seen <= since):
                begins[tp] = RolloutStart(since, rb.until)
            elif since:
                begins[tp] = RolloutStart(since)
            gap = Continuity(tuple(lineage.gaps(-1, 2**62)), lineage.restart_below())
            if gap != NO_GAP:
                gaps[tp] = gap
        return begins, gaps

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
                lineage = self.checkpoint.lineage.get(tp)
                found = lineage.replay_from(int(self.clock.time() * 1000)) if lineage else 0
                start = done if found is None else min(found, done)
            self.ownership.recorded[tp] = stored
            lineage = self.checkpoint.lineage.get(tp)
            gaps = lineage.gaps(start, done) if lineage else []
            self.source.seek(tp, self._begin(tp, "rollback", start, done, gaps))
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
            if rb is None and offset < self.floor.get(tp, -1):
                continue  # a replayed batch acknowledged after its rebuild ended at a skip
            if rb is None or offset > rb.until:
                out[tp] = offset
        return out

    def advanced(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        """Partitions settled up to these offsets: a rebuild that reached its end is over."""
        for tp, nxt in next_offsets.items():
            rb = self.rebuilds.get(tp)
            if rb is not None and nxt >= rb.until:
                if rb.skipped_to is not None:  # after the writes below the skip, not before
                    self._skipped_to(tp, rb.skipped_to)
                del self.rebuilds[tp]
                log.warning("%s[%d]: rebuild finished: %d messages replayed in %.1fs",
                            *tp, rb.messages, self.clock.monotonic() - rb.began)

    def forget(self, partitions) -> None:
        for tp in partitions:
            self.rebuilds.pop(tp, None)
            self.floor.pop(tp, None)

    @property
    def rebuilding(self) -> list[str]:
        return sorted(f"{t}[{p}]" for t, p in self.rebuilds)
