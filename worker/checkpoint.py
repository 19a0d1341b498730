"""The commit protocol: which input offsets are done, when Kafka is told, and what recovery
keeps in Kafka beside each commit.

A batch's offsets become *acknowledged* once every output of the batch is acknowledged by
Kafka (``worker.delivery``); they are then committed, coalesced over batches:

1. **Acknowledge.** ``acknowledged`` notes each partition's next offset as pending. A
   partition being rebuilt never moves the group back (``worker.recovery`` filters them).
2. **Coalesce.** Pending offsets wait until a commit is due: at most every
   ``kafka.commit_interval_ms`` inside the loop (``Commit.DUE``), at once when input pauses
   (``Commit.NOW``), and at once, waiting for the answer, with every offset not yet
   confirmed, before a claim and at shutdown (``Commit.ALL``).
3. **Send.** A commit carries the pending offsets of the partitions still held, and those of
   earlier commits not yet confirmed: a failed commit is so carried into the next one.
   Inside the loop it is sent without waiting when ``kafka.async_commits`` is on.
4. **Confirm.** The coordinator's answer confirms the offsets; a failed answer leaves them
   unconfirmed (their records are redelivered if no later commit lands, and deduplicated).

A partition revoked from this worker forgets its pending and unconfirmed offsets: the next
owner resumes from the last commit that landed.

**What a commit carries.** Every commit of a partition is preceded by an acknowledged
*checkpoint record* for at least its offset, written to the checkpoint topic
(``GRU_KAFKA__CHECKPOINT_TOPIC``, partition for partition, keyed by namespace, topic and
partition): the partition's ``Lineage``. It is as durable as the offsets and out of Redis'
reach. Records are sent with a batch's outputs about once per commit interval, so a commit
rarely waits for one; a commit not yet covered sends its records and waits first (input
paused, a claim, shutdown) or is deferred to the next batch (``Commit.DUE``). Kafka's own
commit metadata would carry the same, but tansu 0.6.0, the broker of the tests, drops it.
At a claim (``worker.recovery``) the last records of the partition's key tell

* where to replay from after Redis lost everything: the first offset of the oldest session
  still live (``Lineage.replay_from``), not the start of the TTL window;
* whether the group's committed offset was moved by this group's workers (never past the
  highest offset they checkpointed) or by someone else, an operator's skip;
* where each model began serving new sessions, so that a rebuild routes a session to the
  model that began it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from .clock import Clock
from .config import KafkaSettings
from .metrics import Metrics
from .ports import Outgoing, Source, TopicPartition

log = logging.getLogger("worker.loop")


BUCKETS = 32  # the live-session summary's resolution: the longest TTL in this many parts
TAIL = 64  # records read back from the end of a checkpoint partition at a claim, at first
MAX_TAIL = 65_536  # and at most, doubling while none of the partition's key is found
FORMAT = 1
KEEP_SKIPS = 16  # operator skips a lineage keeps however old (a rollback's replay may meet them)


@dataclass
class Lineage:
    """What recovery needs to know about one input partition, kept in Kafka with its commits.

    ``live``: when sessions expire (event time, ms, rounded up to a bucket) -> the lowest
    first offset among them: a bounded summary whose minimum over unexpired buckets is the
    first offset of the oldest session whose state (or tombstone) still matters.
    ``skips``: (first, end, wall ms) of offset ranges the group was moved past, never
    applied (an operator's reset): a replay must jump them as the live run did. ``cuts``:
    (offset, wall ms) below which Redis lost writes whose records retention then deleted.
    ``models``: (model id, the offset from which it began new sessions), newest first.
    """

    bucket_ms: int
    live: dict[int, int] = field(default_factory=dict)
    skips: list[tuple[int, int, int]] = field(default_factory=list)
    cuts: list[tuple[int, int]] = field(default_factory=list)
    models: list[tuple[str, int]] = field(default_factory=list)

    def note(self, start_offset: int, expires_ms: int) -> None:
        """A session written: it matters until ``expires_ms``; it began at ``start_offset``
        (-1 when unknown, a state from before the lineage was kept: replay from the start)."""
        key = math.ceil(expires_ms / self.bucket_ms) * self.bucket_ms
        start = max(start_offset, 0)
        self.live[key] = min(start, self.live.get(key, start))

    def prune(self, now_ms: int, ttl_ms: int) -> None:
        """Forget buckets of sessions expired (one bucket of slack), and skips no replay is
        likely to reach any more (before the oldest live session's first offset, and older
        than the newest ``KEEP_SKIPS``)."""
        cutoff = now_ms - self.bucket_ms
        self.live = {k: v for k, v in self.live.items() if k >= cutoff}
        # A skip matters while a replay can reach it: one from the oldest live session's first
        # offset (a loss), or from the store's next offset, which a rollback may bring back to
        # before the skip whatever lives: the newest KEEP_SKIPS are kept at any rate.
        start = self.replay_from(now_ms)
        recent = self.skips[-KEEP_SKIPS:]
        self.skips = [s for s in self.skips if s in recent or (start is not None and s[1] > start)]
        # a state written before a cut lives at most a TTL (and the store's grace) after it
        self.cuts = [(o, at) for o, at in self.cuts if at >= now_ms - ttl_ms - 60_000]

    def replay_from(self, now_ms: int) -> int | None:
        """The first offset of the oldest session that may still live (None: none)."""
        starts = [v for k, v in self.live.items() if k >= now_ms - self.bucket_ms]
        return min(starts) if starts else None

    def restart_below(self) -> int:
        """The highest offset below which Redis lost writes retention then deleted (-1)."""
        return max((o for o, _ in self.cuts), default=-1)

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The skipped ranges that overlap ``[start, end)``, in order."""
        return sorted((a, b) for a, b, _ in self.skips if a < end and b > start)

    def serving(self, current: str, previous: str | None, resume: int) -> int:
        """Note that ``current`` serves new sessions from ``resume`` on unless it already
        did; returns the offset from which it began. Without history, a rollout in progress
        began here, and the previous model served everything before."""
        if not self.models:
            self.models = [(current, resume if previous else 0)]
            if previous:
                self.models.append((previous, 0))
        elif self.models[0][0] != current:
            self.models = [(current, resume), *self.models][:3]
        return self.models[0][1]

    def began(self, model_id: str) -> int | None:
        return next((since for m, since in self.models if m == model_id), None)

    def encode(self, offset: int, now_ms: int) -> bytes:
        return json.dumps({"v": FORMAT, "offset": offset, "at": now_ms,
                           "bucket_ms": self.bucket_ms,
                           "live": sorted(self.live.items()), "skips": self.skips,
                           "cuts": self.cuts,
                           "models": self.models}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> tuple[int, "Lineage"] | None:
        """(offset, lineage) of a checkpoint record; None for anything else."""
        try:
            d = json.loads(raw or b"")
            if d.get("v") != FORMAT:
                return None
            return int(d["offset"]), cls(int(d["bucket_ms"]),
                                         {int(k): int(v) for k, v in d["live"]},
                                         [(int(a), int(b), int(t)) for a, b, t in d["skips"]],
                                         [(int(o), int(t)) for o, t in d.get("cuts", [])],
                                         [(str(m), int(o)) for m, o in d["models"]])
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclass(frozen=True)
class Found:
    """What the checkpoint topic says of a partition: the highest offset this group's workers
    checkpointed (none of their commits went past it), and the newest lineage."""

    offset: int
    lineage: Lineage


class Commit(Enum):
    DUE = "due"  # inside the loop: only once the commit interval has passed
    NOW = "now"  # input paused: commit what is pending
    ALL = "all"  # before a claim, at shutdown: everything not confirmed, and wait


class Checkpointer:
    def __init__(self, settings: KafkaSettings, namespace: str, ttl_ms: int, end_ttl_ms: int,
                 source: Source, deliver: Callable[[list[Outgoing]], None], metrics: Metrics,
                 clock: Clock) -> None:
        self.source, self.deliver, self.metrics, self.clock = source, deliver, metrics, clock
        self.topic = settings.checkpoint_topic
        self.namespace = namespace
        self.ttl_ms, self.bucket_ms = ttl_ms, max(1, max(ttl_ms, end_ttl_ms) // BUCKETS)
        self.interval_s = settings.commit_interval_ms / 1000
        self.sync = not settings.async_commits
        self.pending: dict[TopicPartition, int] = {}  # acknowledged, not yet committed
        self.unconfirmed: dict[TopicPartition, int] = {}  # sent, not yet confirmed
        self.failed = False  # an asynchronous commit failed: send again when due
        self.last_commit = clock.monotonic()
        self.lineage: dict[TopicPartition, Lineage] = {}  # per claimed partition
        self.covered: dict[TopicPartition, int] = {}  # offset of the last acknowledged record
        self.last_attach = clock.monotonic()

    # --- the checkpoint records ------------------------------------------------------------

    def key(self, tp: TopicPartition) -> bytes:
        return f"{self.namespace}|{tp[0]}|{tp[1]}".encode()

    def read(self, tp: TopicPartition) -> Found | None:
        """The partition's checkpoint from the end of its checkpoint partition (a DependencyError
        propagates: the caller retries)."""
        key, count = self.key(tp), TAIL
        while True:
            tail = self.source.read_tail(self.topic, tp[1], count)
            mine = [d for r in tail if r.key == key and (d := Lineage.decode(r.value))]
            if mine:
                return Found(max(o for o, _ in mine), mine[-1][1])
            if len(tail) < count or count >= MAX_TAIL:
                return None
            count *= 4

    def claimed(self, tp: TopicPartition, found: Found | None) -> Lineage:
        lineage = found.lineage if found is not None else Lineage(self.bucket_ms)
        lineage.bucket_ms = self.bucket_ms
        self.lineage[tp] = lineage
        self.covered.pop(tp, None)
        return lineage

    def records(self, offsets: Mapping[TopicPartition, int]) -> list[Outgoing]:
        now_ms = int(self.clock.time() * 1000)
        out = []
        for tp, offset in offsets.items():
            lineage = self.lineage.get(tp)
            if lineage is None:
                continue
            lineage.prune(now_ms, self.ttl_ms)
            out.append(Outgoing(self.topic, self.key(tp), lineage.encode(offset, now_ms), tp[1]))
        return out

    def attach(self, offsets: Mapping[TopicPartition, int]
               ) -> tuple[list[Outgoing], dict[TopicPartition, int]]:
        """Checkpoint records to send with a batch's outputs, once per commit interval: for
        the batch's offsets and those pending. Returns them and the offsets they cover."""
        if self.clock.monotonic() - self.last_attach < self.interval_s:
            return [], {}
        self.last_attach = self.clock.monotonic()
        cover = dict(self.pending)
        for tp, o in offsets.items():
            cover[tp] = max(o, cover.get(tp, -1))
        cover = {tp: o for tp, o in cover.items() if tp in self.lineage}
        return self.records(cover), cover

    def note_written(self, updates, skipped: set[TopicPartition],
                     kept: Iterable[tuple[str, TopicPartition, int, int]] = ()) -> None:
        """Sessions whose writes landed: each matters until it expires in event time. And
        sessions a batch found stored and left as they were (``BatchResult.kept``: a
        redelivery after a crash that came before the checkpoint record of their write)."""
        now_ms = int(self.clock.time() * 1000)
        for u in updates:
            lineage = self.lineage.get(u.partition)
            if lineage is None or u.partition in skipped:
                continue
            ts = u.last_ts if u.last_ts >= 0 else now_ms
            lineage.note(u.start_offset, ts + u.ttl_ms)
        for _, tp, start, expires in kept:
            lineage = self.lineage.get(tp)
            if lineage is None or tp in skipped:
                continue
            lineage.note(start, expires if expires >= 0 else now_ms + self.ttl_ms)

    def delivered(self, cover: Mapping[TopicPartition, int]) -> None:
        """Checkpoint records for ``cover`` were acknowledged."""
        for tp, o in cover.items():
            if tp in self.lineage:
                self.covered[tp] = max(o, self.covered.get(tp, -1))

    # --- offsets ----------------------------------------------------------------------------

    def acknowledged(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.pending.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self.pending.pop(tp, None)
            self.unconfirmed.pop(tp, None)
            self.lineage.pop(tp, None)
            self.covered.pop(tp, None)

    def commit(self, when: Commit, held: Callable[[TopicPartition], bool]) -> None:
        """Commit what ``when`` calls for, of the partitions ``held`` says are still ours."""
        due = self.clock.monotonic() - self.last_commit >= self.interval_s
        wait = self.sync or when is Commit.ALL
        resend = bool(self.unconfirmed) and (
            when is Commit.ALL or (not wait and self.failed and due))
        if not ((self.pending and (when is not Commit.DUE or due)) or resend):
            return
        offsets = {tp: o for tp, o in self.unconfirmed.items() if held(tp)}
        for tp, o in self.pending.items():
            if held(tp):
                offsets[tp] = max(o, offsets.get(tp, -1))
        bare = {tp: o for tp, o in offsets.items() if self.covered.get(tp, -1) < o}
        if bare and when is not Commit.DUE:
            self.deliver(self.records(bare))  # no commit goes past its checkpoint
            self.delivered(bare)
        elif bare:  # the next batch carries their records
            offsets = {tp: o for tp, o in offsets.items() if tp not in bare}
        for tp in offsets:
            self.pending.pop(tp, None)
        self.pending = {tp: o for tp, o in self.pending.items() if held(tp)}
        self.last_commit = self.clock.monotonic()
        if not offsets:
            return
        self.unconfirmed.update(offsets)
        # Either call may first deliver older answers; a failure among them is covered by
        # this commit, which carries its offsets too: only this commit's own answer counts.
        with self.metrics.commit_seconds.time():
            if wait:
                ok = self.source.commit(offsets)
                self.failed = False
                self._confirmed(offsets, ok)
            else:
                self.source.commit_async(offsets, self._confirmed)
                self.failed = False

    def _confirmed(self, offsets: dict[TopicPartition, int], ok: bool) -> None:
        if not ok:
            self.failed = True
            log.warning("commit of %s failed (rebalance?): retried with the next commit; "
                        "if none lands, those records are redelivered and deduplicated", offsets)
            return
        for tp, o in offsets.items():
            if self.unconfirmed.get(tp, o + 1) <= o:
                del self.unconfirmed[tp]
