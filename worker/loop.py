"""The worker's main loop: claim, poll, decode, load states, step, store states, produce, commit.

Order of effects for one batch N (this is the one place it is written down). Delivery is
pipelined: batch N's acknowledgements are awaited while batch N+1 is polled, decoded,
loaded and stepped, and always before batch N+1 writes anything.

0. **Claim** the partitions the group assigned since the last batch (outside the rebalance
   callback, so a Redis outage never blocks the group's heartbeats; after finishing the batch
   in flight, so its commit counts): take a new, never reused fencing token per partition (any
   older owner is now fenced) and read ``next_offset``, the offset up to which Redis holds
   the partition's effects. Each claimed partition resumes at the group's committed offset,
   set explicitly (kafka-python keeps the position of a partition handed back to the same
   member). If ``next_offset`` is behind the committed offset, Redis lost writes: resume at
   ``next_offset``. If Redis has no record while Kafka has a committed offset, Redis lost
   everything: resume at the first offset inside the state TTL. Records from there up to the
   committed offset are *rebuilt*: applied again, their outputs suppressed (they were
   produced before). Polled records of partitions not ours are dropped.
   *Crash here:* nothing was written; the next owner claims again.
1. **Load states.** One MGET for every session in the batch. Nothing is written yet.
   *Crash here:* nothing of N happened; N is redelivered. Batch N-1 may still be in flight
   (sent, not acknowledged, not committed): it is redelivered too, its messages are
   duplicates and its predictions are re-emitted from the outboxes (step 3 below).
2. **Step.** The pure engine drops duplicates (position at or before the stored one),
   advances each session through its new messages and encodes the new states, each with
   an outbox holding this batch's predictions for that session.
   *Crash here:* as in 1.
2'. **Settle batch N-1**: wait for every acknowledgement of its outputs (4), then commit its
   offsets (5). No session is written again before the predictions in its outbox are
   acknowledged, so an outbox always covers what is not yet known to be produced.
3. **Write states,** fenced and deduplicated, in one atomic script call that also records
   each partition's ``next_offset``. A write lands only if the partition's token is still ours,
   its ``next_offset`` has not gone back (else Redis lost writes under us: rewind and rebuild),
   and the stored position is the one we loaded. A session whose write was refused as STALE
   (another writer, a rollback) is loaded and stepped again, up to three times; if it still
   does not land, its partition is rewound to its first message and committed only below it.
   *Crash here (after the write, before its acknowledgements):* on redelivery every message
   is a duplicate, so no state changes again; the predictions are re-emitted from the outboxes.
4. **Produce** predictions, dead letters and re-emitted predictions: handed to the producer,
   not awaited here (2' of the next batch, or the loop when no batch follows, waits). A dead
   letter refused for good (too large) is replaced by one with its reason and coordinates only;
   nothing refused for good is retried for ever.
   *Crash here:* as in 3; consumers may see a prediction twice.
5. **Commit** the next offset of every partition in the batch that was not fenced, once all of
   the batch's outputs are acknowledged (2' of the next batch, or when the poll comes back
   empty, or at shutdown). Settled batches are committed together, at most every
   ``kafka.commit_interval_ms`` (100 ms), and always before a claim, when the poll comes back
   empty and at shutdown: a commit costs a broker round trip, as much as a small batch.
   With ``kafka.async_commits`` (off by default) the loop's own commits are sent and not
   waited for: the answer arrives during a later poll, and a failed one is sent again with
   the next commit, as all offsets not yet confirmed are. The commits before a claim and at
   shutdown always wait.
   *Crash after 5 is answered:* nothing is redelivered. *Crash between two commits, or
   with one sent and not answered:* the group resumes from the last commit that landed;
   the batches settled since are redelivered and their messages are duplicates.

So the effect on state is exactly-once, and predictions are at-least-once: consumers
dedupe by ``(session_id, seq)``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .budget import BatchBudget
from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .engine import BatchResult, Engine, SessionUpdate
from .errors import DependencyError, ShutdownRequested, UndecodableInput
from .messages import (
    Rejection,
    TokenMessage,
    dead_letter_key,
    decode,
    encode_dead_letter,
    minimal_dead_letter,
)
from .metrics import OUTCOMES, Metrics
from .models import ModelSet, ServedModel
from .ports import (
    Outgoing,
    PartitionMark,
    Record,
    Sink,
    Source,
    StateStore,
    StateWrite,
    StoreResult,
    TopicPartition,
    WriteStatus,
)

log = logging.getLogger(__name__)

RESTEP_ATTEMPTS = 3  # reloads of a session whose write was refused as STALE, per batch


@dataclass
class RunSummary:
    messages: int = 0
    batches: int = 0
    predictions: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    tokens: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.messages / self.seconds if self.seconds else 0.0
        o = " ".join(f"{k}={v}" for k, v in self.outcomes.items())
        return (f"worker stopped: {self.messages} messages in {self.batches} batches, "
                f"{self.predictions} predictions, {self.tokens} tokens, {o}, "
                f"{self.seconds:.1f}s ({rate:.0f} msg/s)")


@dataclass
class Rebuild:
    """A partition being replayed because Redis lost writes: records below ``until`` (the
    group's committed offset) are applied again with their outputs suppressed."""

    reason: str  # "rollback" (Redis is behind the commits) or "loss" (Redis has nothing)
    start: int
    until: int
    began: float
    messages: int = 0


@dataclass
class _Written:
    """What step 3 leaves for steps 4 and 5."""

    result: BatchResult
    fenced: set[TopicPartition]  # another owner took them: nothing produced or committed
    behind: set[TopicPartition]  # Redis lost writes: rewound, replayed from what it holds
    held: dict[TopicPartition, int]  # rewound to this offset (a write that never landed)
    deferred: int = 0  # messages of held sessions, redelivered later
    live: list = field(default_factory=list)  # (update, its live rows), set after the write

    @property
    def skipped(self) -> set[TopicPartition]:
        return self.fenced | self.behind


@dataclass
class _InFlight:
    """A batch written and sent, not yet acknowledged nor committed."""

    records: Sequence[Record]
    written: _Written
    rejections: Sequence[Rejection]
    outgoing: list[Outgoing]
    dead_letters: dict[int, Rejection]
    sending: object
    t_batch: float
    t_sent: float
    acked_at: float | None = None
    settle_s: float = 0.0


class Worker:
    def __init__(self, settings: Settings, engine: Engine, store: StateStore, source: Source,
                 sink: Sink, metrics: Metrics, labels: Sequence[str], model_id: str,
                 encode_tokens: Callable, vocab_size: int,
                 clock: Clock = SYSTEM_CLOCK,
                 previous: ServedModel | None = None, vocab_key: object = None) -> None:
        self.s = settings
        self.engine, self.store, self.source, self.sink = engine, store, source, sink
        self.metrics = metrics
        # The current model, and during a rollout the previous one (worker/models.py).
        self.models = ModelSet(ServedModel(model_id, engine, tuple(labels), encode_tokens,
                                           vocab_size, vocab_key), previous, settings.limits,
                               metrics)
        self.encode_tokens, self.vocab_size = encode_tokens, vocab_size
        self.clock = clock
        self.owned: set[TopicPartition] = set()  # assigned to us by the group
        self.unclaimed: set[TopicPartition] = set()  # assigned, token not taken yet
        self.epochs: dict[TopicPartition, str] = {}  # our fencing token per claimed partition
        self.recorded: dict[TopicPartition, int | None] = {}  # next_offset we last saw recorded
        self.rebuilds: dict[TopicPartition, Rebuild] = {}
        self.summary = RunSummary()
        self.last_poll_ok = 0.0
        self._stopping = False
        self._poll_backoff = settings.retry.initial_backoff_s
        self._inflight: _InFlight | None = None
        self._taken = 0  # input messages claimed into batches (for max_messages)
        self._last_input = clock.monotonic()
        self._pending: dict[TopicPartition, int] = {}  # acknowledged, not yet committed
        self._unconfirmed: dict[TopicPartition, int] = {}  # commits sent, not yet confirmed
        self._commit_failed = False  # an asynchronous commit failed: send again when due
        self._sync_commits = not settings.kafka.async_commits
        self._last_commit = clock.monotonic()
        self.budget = BatchBudget(settings.batch.target_latency_ms / 1000,
                                  settings.batch.max_records)
        self._waiting: int | None = None  # consumer lag after the last poll
        self._limit_reason: str | None = None  # the reason label gru_batch_limit_records has
        metrics.batch_budget.set(settings.batch.target_latency_ms / 1000)
        source.bind(self.on_assigned, self.on_revoked)

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand, commit and return (signal-safe)."""
        self._stopping = True

    def run(self) -> RunSummary:
        start = self.clock.monotonic()
        self._last_input = start
        try:
            while not self._stopping and self.run_once():
                pass
            self.settle()
        except ShutdownRequested:
            log.info("shutdown requested during an outage; the batch in hand was not committed")
        finally:
            self.summary.seconds = self.clock.monotonic() - start
            self.source.close()
            self.sink.close()
            log.info(self.summary.line())
        return self.summary

    def run_once(self) -> bool:
        """One turn of the loop: poll, then process the batch or settle when idle. False
        when a bound (``idle_exit_s``, ``max_messages``) says to stop."""
        records = self._poll()
        if records or not self.owned:  # idle time counts only while assigned
            self._last_input = self.clock.monotonic()
        if records or self.unclaimed:
            self.process(records)
        else:
            # nothing new: finish the batch in flight now
            self.settle(wait=self._sync_commits, everything=False)
            idle = self.clock.monotonic() - self._last_input
            if self.s.idle_exit_s and idle >= self.s.idle_exit_s:
                log.info("idle for %.1fs: exiting", self.s.idle_exit_s)
                return False
        if self.s.max_messages and self._taken >= self.s.max_messages:
            log.info("took %d messages: exiting", self._taken)
            return False
        return True

    def ready(self) -> tuple[bool, dict]:
        """Holds partitions, all claimed, none being rebuilt (for /readyz)."""
        rebuilding = sorted(f"{t}[{p}]" for t, p in self.rebuilds)
        ok = bool(self.owned) and not self.unclaimed and not rebuilding
        return ok, {"assigned_partitions": len(self.owned), "rebuilding": rebuilding}

    # --- rebalance callbacks: note what changed, nothing more -----------------------------

    def on_assigned(self, partitions: Sequence[TopicPartition]) -> None:
        self.owned |= set(partitions)
        self.unclaimed |= set(partitions)
        self.metrics.assigned.set(len(self.owned))

    def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            self.owned.discard(tp)
            self.unclaimed.discard(tp)
            self.epochs.pop(tp, None)
            self.recorded.pop(tp, None)
            self.rebuilds.pop(tp, None)
            self._pending.pop(tp, None)  # redelivered to the next owner, deduplicated
            self._unconfirmed.pop(tp, None)
            try:
                self.metrics.lag.remove(tp[0], str(tp[1]))
            except KeyError:
                pass
        self.metrics.assigned.set(len(self.owned))
        if partitions:
            log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in sorted(partitions)))

    # --- one batch ------------------------------------------------------------------------

    def process(self, records: Sequence[Record]) -> None:
        """Apply one polled batch, following the order of effects in the module docstring.
        Its outputs are sent, not awaited: the next batch's poll, decode, load and step
        overlap with their acknowledgements, which ``_settle`` waits for (then commits)
        before that next batch writes anything."""
        t_batch = time.perf_counter()
        records = self._claim(records)                                  # 0. claim
        if not records:
            return
        self._taken += len(records)
        m = self.metrics
        t0 = time.perf_counter()
        messages, rejections = self._decode(records)
        t1 = time.perf_counter()
        self.models.between_batches()  # unload a drained previous model
        states = self._load(messages)                                   # 1. load states
        t2 = time.perf_counter()
        result = self.models.apply(messages, states)                    # 2. step
        t3 = time.perf_counter()
        self.settle(commit_now=False, wait=self._sync_commits,  # 4'-5' batch N-1: acks,
                    everything=False)                            # then commit
        t3b = time.perf_counter()
        written = self._write(records, messages, result)                # 3. write states
        written.live = self._live_rows(written)
        t4 = time.perf_counter()
        outgoing, dead_letters = self._outgoing(written, rejections)
        t5 = time.perf_counter()
        sending = self._retry(lambda: self.sink.send(outgoing))        # 4. produce (no wait)
        t6 = time.perf_counter()
        self.budget.observe(len(records), len(result.updates), t6 - t_batch)
        m.batch_cost.labels("fixed").set(self.budget.fixed_s)
        m.batch_cost.labels("per_message").set(self.budget.per_message_s)
        m.decode_seconds.observe(t1 - t0)
        m.load_seconds.observe(t2 - t1)
        m.engine_seconds.observe(t3 - t2)
        m.store_seconds.observe(t4 - t3b)
        m.encode_seconds.observe(t5 - t4)
        self._inflight = _InFlight(records, written, rejections, outgoing, dead_letters, sending,
                                   t_batch, t6)

    def settle(self, commit_now: bool = True, wait: bool = True,
               everything: bool = True) -> None:
        """Finish the batch in flight: wait for every acknowledgement (4), then commit (5)
        what is acknowledged: at once when ``commit_now``, else once
        ``kafka.commit_interval_ms`` has passed since the last commit. ``wait``: the commit
        is confirmed before this returns; otherwise it is sent and confirmed later.
        ``everything``: also commit now what earlier commits sent and did not confirm (before
        a claim, at shutdown); inside the loop, an asynchronous commit that failed is sent
        again at most every ``kafka.commit_interval_ms``."""
        f, self._inflight = self._inflight, None
        if f is not None:
            t0 = time.perf_counter()
            self._await(f)
            self.metrics.produce_seconds.observe(time.perf_counter() - t0)
            done = self._acknowledged(f.records, f.written)
            f.settle_s = time.perf_counter() - t0
            self._account(f)
            self._finish_rebuilds(done)
        due = self.clock.monotonic() - self._last_commit >= self.s.kafka.commit_interval_ms / 1000
        unsettled = bool(self._unconfirmed) and (
            everything or (not wait and self._commit_failed and due))
        if (self._pending and (commit_now or due)) or unsettled:
            t1 = time.perf_counter()
            self._commit(wait)                                          # 5. commit
            self.metrics.commit_seconds.observe(time.perf_counter() - t1)

    # 0. claim ------------------------------------------------------------------------------

    def _claim(self, records: Sequence[Record]) -> list[Record]:
        """Claim what the group assigned since the last batch, and start each claimed
        partition exactly where its work resumes: the committed offset, or earlier when Redis
        is behind. That start is set explicitly (kafka-python keeps the position of a
        partition handed back to the same member, which can be past records this worker
        dropped while the partition was not its own); polled records of a claimed partition
        are kept only if they begin there. Records of partitions not ours are dropped."""
        rewound: set[TopicPartition] = set()
        if self.unclaimed:
            self.settle()  # its commit first, so that the resume points include it
            starts = self._claim_partitions(sorted(self.unclaimed))
            first: dict[TopicPartition, int] = {}
            for r in records:
                first.setdefault((r.topic, r.partition), r.offset)
            for tp, start in starts.items():
                if first.get(tp) == start:
                    continue  # the polled records begin where the work resumes
                self.source.seek(tp, start)
                rewound.add(tp)
        keep = [r for r in records
                if (r.topic, r.partition) in self.epochs and (r.topic, r.partition) not in rewound]
        if len(keep) < len(records):
            log.info("dropped %d polled records of partitions not ours or restarted (they are "
                     "read again from where the work resumes)", len(records) - len(keep))
        return keep

    def _claim_partitions(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Take tokens; compare what Redis holds with what Kafka says was done. Returns where
        each partition resumes: the committed offset (or where the reset policy starts when
        nothing was committed), or earlier to rebuild what Redis lost."""
        claims = self._retry(lambda: self.store.claim(tps))
        committed = self._retry(lambda: self.source.committed(tps))
        fresh = [tp for tp in tps if committed.get(tp) is None]
        policy = self._retry(lambda: self.source.reset_offsets(fresh)) if fresh else {}
        starts: dict[TopicPartition, int] = {}
        for tp in tps:
            claim, done = claims[tp], committed.get(tp)
            self.epochs[tp] = claim.token
            self.recorded[tp] = claim.next_offset
            starts[tp] = done if done is not None else policy[tp]
            start, reason = None, ""
            if claim.next_offset is not None:
                if done is not None and claim.next_offset < done:
                    start, reason = claim.next_offset, "rollback"
            elif done is not None and done > 0:
                since = int(self.clock.time() * 1000) - self.s.state.ttl_seconds * 1000
                found = self._retry(lambda: self.source.offsets_for_time([tp], since)).get(tp)
                if found is not None and found < done:
                    start, reason = found, "loss"
            if start is None:
                continue
            starts[tp] = start
            self.rebuilds[tp] = Rebuild(reason, start, done, self.clock.monotonic())
            self.metrics.rebuilds.labels(reason).inc()
            log.error("%s[%d]: Redis holds this partition's states up to offset %s, but the group "
                      "committed %d (%s): replaying offsets %d..%d to rebuild them, outputs "
                      "suppressed", tp[0], tp[1], claim.next_offset, done,
                      "Redis lost writes" if reason == "rollback" else "Redis lost everything",
                      start, done - 1)
        self.unclaimed -= set(tps)
        log.info("claimed %s", ", ".join(f"{t}[{p}]@{self.epochs[(t, p)].split(':')[0]}"
                                          for t, p in tps))
        return starts

    def _decode(self, records: Sequence[Record]) -> tuple[list[TokenMessage], list[Rejection]]:
        messages, rejections = [], []
        for r in records:
            m = decode(r, self.vocab_size, self.encode_tokens, self.s.limits)
            (messages if isinstance(m, TokenMessage) else rejections).append(m)
        for rej in rejections:
            rec = rej.record
            log.warning("dead-letter %s[%d]@%d: %.300s", rec.topic, rec.partition, rec.offset,
                        rej.reason)
        return messages, rejections

    # 1. load -------------------------------------------------------------------------------

    def _load(self, messages: Sequence[TokenMessage]) -> dict[str, tuple[bytes | None, ...]]:
        """Each session's value under each model namespace served (one round trip)."""
        first: dict[str, TopicPartition] = {}
        for m in messages:
            first.setdefault(m.session_id, (m.record.topic, m.record.partition))
        sids, parts = list(first), list(first.values())
        models = self.models.namespaces
        values = self._retry(lambda: self.store.load(sids, parts, models))
        n = len(sids)
        return {sid: tuple(values[k * n + i] for k in range(len(models)))
                for i, sid in enumerate(sids)}

    # 3. write ------------------------------------------------------------------------------

    def _write(self, records: Sequence[Record], messages: Sequence[TokenMessage],
               result: BatchResult) -> _Written:
        """Write every session update with the batch's partition marks; re-step sessions whose
        write was refused as STALE or CORRUPT; rewind what still does not land, and the
        partitions whose recorded offset went back under us."""
        marks: dict[TopicPartition, PartitionMark] = {}
        first: dict[TopicPartition, int] = {}
        for r in records:
            tp = (r.topic, r.partition)
            first[tp] = min(r.offset, first.get(tp, r.offset))
            nxt = max(r.offset + 1, marks[tp].next_offset if tp in marks else 0)
            marks[tp] = PartitionMark(self.epochs[tp], nxt, self.recorded.get(tp))
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
            again = self.models.reapply(again_msgs, refused)
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
        if behind:
            self._rewind_behind(behind, first)
        if fenced:
            self._drop_fenced(fenced)
        return _Written(result, fenced, set(behind), held, deferred)

    def _rewind_behind(self, behind: dict[TopicPartition, int | None],
                       first: dict[TopicPartition, int]) -> None:
        """Redis lost writes under us (restored from a snapshot, failed over to a lagging
        replica) while our token survived: replay from what it still holds up to this batch,
        outputs suppressed (they were produced), then this batch again."""
        for tp, stored in behind.items():
            done = max(first[tp], self.rebuilds[tp].until if tp in self.rebuilds else 0)
            start = stored
            if start is None:
                since = int(self.clock.time() * 1000) - self.s.state.ttl_seconds * 1000
                start = self._retry(lambda: self.source.offsets_for_time([tp], since)).get(tp)
                start = done if start is None else min(start, done)
            self.source.seek(tp, start)
            self.recorded[tp] = stored
            self.metrics.rebuilds.labels("rollback").inc()
            if start < done:
                self.rebuilds[tp] = Rebuild("rollback", start, done, self.clock.monotonic())
            log.error("%s[%d]: Redis holds this partition's states up to offset %s, behind the "
                      "%s this worker recorded (Redis lost writes under it): replaying offsets "
                      "%d..%d to rebuild them, outputs suppressed", tp[0], tp[1], stored,
                      "offsets", start, done - 1)

    def _note_recorded(self, marks: dict[TopicPartition, PartitionMark], res: StoreResult) -> None:
        for tp in res.recorded:
            prev = self.recorded.get(tp)
            self.recorded[tp] = max(marks[tp].next_offset, -1 if prev is None else prev)

    def _store(self, marks: dict[TopicPartition, PartitionMark],
               updates: Sequence[SessionUpdate]) -> StoreResult:
        writes = [StateWrite(u.session_id, u.partition, u.expected_pos, u.new_pos, u.value,
                             u.ttl_ms, u.model) for u in updates]
        res = self._retry(lambda: self.store.store(marks, writes))
        self._note_recorded(marks, res)
        return res

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
            current = self._retry(lambda: self.store.load(
                [u.session_id for u in these], [u.partition for u in these], (model,)))
            out.update({u.session_id: (model, value) for u, value in zip(these, current)
                        if value != u.value})
        return out

    # 4. produce ----------------------------------------------------------------------------

    def _suppressed(self, record: Record) -> bool:
        """Outputs of records being rebuilt are not produced: they were, before."""
        rb = self.rebuilds.get((record.topic, record.partition))
        return rb is not None and record.offset < rb.until

    def _live(self, record: Record, w: _Written) -> bool:
        """Whether this batch produces the outputs of ``record``."""
        return (record.topic, record.partition) not in w.skipped and not self._suppressed(record)

    def _live_rows(self, w: _Written) -> list[tuple[SessionUpdate, list[int]]]:
        """Per session update, the rows of its step table that are live in this batch (all
        of them unless a partition was skipped or is being rebuilt). The output policy then
        picks which of them are produced (``table.emit``, worker/output.py)."""
        if not w.skipped and not self.rebuilds:
            return [(u, u.steps) for u in w.result.updates]
        return [(u, [i for i in u.steps if self._live(u.table.records[i], w)])
                for u in w.result.updates]

    def _outgoing(self, w: _Written, rejections: Sequence[Rejection]
                  ) -> tuple[list[Outgoing], dict[int, Rejection]]:
        topic = self.s.kafka.output_topic
        out: list[Outgoing] = []
        by_table: dict[int, tuple[object, list[int]]] = {}
        for u, rows in w.live:
            if rows:
                by_table.setdefault(id(u.table), (u.table, []))[1].extend(rows)
        for table, rows in by_table.values():
            emit = table.emit
            rows = [i for i in rows if emit[i]]
            keys = [table.session_ids[i].encode() for i in rows]
            encoder = self.models.encoder(table.model_id)
            out += [Outgoing(topic, key, value)
                    for key, value in zip(keys, encoder.encode_rows(table, rows))]
        for p in w.result.replayed:
            if self._live(p.record, w):
                out.append(Outgoing(topic, p.session_id.encode(),
                                    self.models.encoder(p.model_id).encode(p)))
        dead_letters: dict[int, Rejection] = {}
        for rej in [*rejections, *w.result.rejections]:
            rec = rej.record
            if not self._live(rec, w):
                continue
            o = Outgoing(self.s.kafka.dlq_topic, dead_letter_key(rec), encode_dead_letter(rej))
            dead_letters[id(o)] = rej
            out.append(o)
        return out, dead_letters

    def _await(self, f: "_InFlight") -> None:
        """Wait until every message is acknowledged or refused for good, resending what may
        pass on a retry. A refused dead letter is sent again with its reason and coordinates
        only; anything else refused is dropped, logged and counted (it can never be
        produced, and retrying it would block the partition for ever)."""
        sending = f.sending
        backoff = self.s.retry.initial_backoff_s
        while sending is not None:
            error, again = None, []
            try:
                rejected = self.sink.wait(sending)
            except DependencyError as e:
                error, rejected = e, e.rejected
                again = e.pending if e.pending is not None else list(sending.messages)
            for m, why in rejected:
                rej = f.dead_letters.pop(id(m), None)
                if rej is not None:
                    rec = rej.record
                    log.error("dead letter of %s[%d]@%d refused (%s): sending its reason and "
                              "coordinates only", rec.topic, rec.partition, rec.offset, why)
                    self.metrics.dead_letter_fallbacks.inc()
                    again.append(Outgoing(m.topic, None, minimal_dead_letter(rej, why)))
                else:
                    log.error("a message to %s was refused for good and is dropped: %s (%d "
                              "bytes)", m.topic, why, len(m.value))
                    self.metrics.undeliverable.labels(m.topic).inc()
            if not again:
                f.acked_at = sending.done_at[-1] if sending.done_at else self.clock.time()
                return
            if error is not None:
                self._backoff(error, backoff)
                backoff = min(backoff * 2, self.s.retry.max_backoff_s)
            sending = self._retry(lambda: self.sink.send(again))

    # 5. commit -----------------------------------------------------------------------------

    def _acknowledged(self, records: Sequence[Record], w: _Written) -> dict[TopicPartition, int]:
        """Note the next offsets of a settled batch as to be committed; returns them all."""
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = (r.topic, r.partition)
            if tp not in w.skipped:
                offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
        for tp, offset in w.held.items():
            offsets[tp] = offset
        for tp, offset in offsets.items():
            rb = self.rebuilds.get(tp)  # a rebuild replays below the committed offset:
            if rb is None or offset > rb.until:  # never move the group back
                self._pending[tp] = offset
        return offsets

    def _commit(self, wait: bool = True) -> None:
        """Commit the acknowledged offsets of the partitions we still hold, with those of
        earlier commits not yet confirmed (a failed one is so carried into the next).
        ``wait``: block until the coordinator answers; else send, and note the answer when
        the client delivers it (during a later poll or commit)."""
        offsets = {tp: o for tp, o in self._unconfirmed.items() if tp in self.epochs}
        for tp, o in self._pending.items():
            if tp in self.epochs:
                offsets[tp] = max(o, offsets.get(tp, -1))
        self._pending.clear()
        self._last_commit = self.clock.monotonic()
        if not offsets:
            return
        self._unconfirmed.update(offsets)
        # Either call may first deliver older answers; a failure among them is covered by
        # this commit, which carries its offsets too: only this commit's own answer counts.
        if wait:
            ok = self.source.commit(offsets)
            self._commit_failed = False
            self._confirmed(offsets, ok)
        else:
            self.source.commit_async(offsets, self._confirmed)
            self._commit_failed = False

    def _confirmed(self, offsets: dict[TopicPartition, int], ok: bool) -> None:
        if not ok:
            self._commit_failed = True
            log.warning("commit of %s failed (rebalance?): retried with the next commit; "
                        "if none lands, those records are redelivered and deduplicated", offsets)
            return
        for tp, o in offsets.items():
            if self._unconfirmed.get(tp, o + 1) <= o:
                del self._unconfirmed[tp]

    def _finish_rebuilds(self, next_offsets: dict[TopicPartition, int]) -> None:
        for tp, nxt in next_offsets.items():
            rb = self.rebuilds.get(tp)
            if rb is not None and nxt >= rb.until:
                del self.rebuilds[tp]
                log.warning("%s[%d]: rebuild finished: %d messages replayed in %.1fs",
                            *tp, rb.messages, self.clock.monotonic() - rb.began)

    def _account(self, f: _InFlight) -> None:
        records, w, rejections, t_batch = f.records, f.written, f.rejections, f.t_batch
        m, s, result = self.metrics, self.summary, w.result
        now = f.acked_at or self.clock.time()
        counts = dict.fromkeys(OUTCOMES, 0)
        for r in records:
            tp = (r.topic, r.partition)
            if tp in w.fenced:
                counts["fenced"] += 1
            elif tp in w.behind:
                counts["deferred"] += 1
            elif self._suppressed(r):
                counts["rebuilt"] += 1
                self.rebuilds[tp].messages += 1
        counts["deferred"] += w.deferred
        produced = applied = 0
        stamps: list[int] = []
        by_table: dict[int, tuple[object, list[int]]] = {}
        for u, rows in w.live:
            if not rows:
                continue
            applied += len(rows)
            by_table.setdefault(id(u.table), (u.table, []))[1].extend(rows)
            emit = u.table.emit
            emitted = [i for i in rows if emit[i]]
            produced += len(emitted)
            stamps += [u.table.records[i].timestamp_ms for i in emitted]
            m.sessions_started.inc(u.started)
            m.sessions_ended.inc(bool(u.table.final[u.steps[-1]]))
        for table, rows in by_table.values():
            m.observe_predictions(table, rows)
        if stamps:
            ts = np.array([t for t in stamps if t is not None], np.float64)
            m.e2e_latency.observe_many(np.maximum(0.0, now - ts / 1000))
        counts["ok"] = applied
        counts["dead_lettered"] = sum(1 for x in [*rejections, *result.rejections]
                                      if self._live(x.record, w))
        counts["duplicate"] = sum(1 for d in result.duplicates if self._live(d.record, w))
        counts["replayed"] = sum(1 for p in result.replayed if self._live(p.record, w))
        produced += counts["replayed"]
        rebuilt = counts["rebuilt"]
        for outcome, n in counts.items():
            if n:
                m.messages.labels(outcome).inc(n)
                s.outcomes[outcome] += n
        if rebuilt:
            m.rebuild_messages.inc(rebuilt)
        if result.corrupt_sessions:
            m.corrupt_states.inc(len(result.corrupt_sessions))
        if result.partial_sessions:
            m.partial_sessions.inc(len(result.partial_sessions))
        tokens = sum(u.tokens for u in result.updates if u.partition not in w.skipped)
        m.predictions.inc(produced)
        m.tokens.inc(tokens)
        m.step_seconds.observe(result.step_seconds)
        m.batch_size.observe(len(records))
        m.batch_seconds.observe(f.t_sent - t_batch + f.settle_s)  # its own time, not the overlap
        by_model: dict[str, list[str]] = {}
        for u in result.updates:
            by_model.setdefault(u.table.model_id, []).append(u.session_id)
        m.saw_sessions([u.session_id for u in result.updates], models=by_model)
        s.messages += len(records)
        s.batches += 1
        s.predictions += produced
        s.tokens += tokens

    # --- dependencies ---------------------------------------------------------------------

    def _poll(self) -> list[Record]:
        limit = self.budget.limit(self._waiting)
        m = self.metrics
        if limit.reason != self._limit_reason:  # one series: the current limit and its reason
            if self._limit_reason is not None:
                m.batch_limit.remove(self._limit_reason)
            self._limit_reason = limit.reason
            self._set_switch_interval(limit.reason)
        m.batch_limit.labels(limit.reason).set(limit.records)
        t0 = time.perf_counter()
        try:
            records = self.source.poll(limit.records, self.s.batch.max_wait_ms)
        except UndecodableInput as e:
            self.metrics.undecodable.labels(
                e.topic or "unknown", "unknown" if e.partition is None else str(e.partition)).inc()
            log.error("%s. The partition cannot advance past this batch; the others go on. "
                      "See docs/reliability.md, 'Undecodable input'", e)
            self._backoff(e, self._poll_backoff)
            self._poll_backoff = min(self._poll_backoff * 2, self.s.retry.max_backoff_s)
            return []
        except DependencyError as e:
            self._backoff(e, self.s.retry.initial_backoff_s)
            return []
        if records:
            self.metrics.poll_seconds.observe(time.perf_counter() - t0)
        self._poll_backoff = self.s.retry.initial_backoff_s
        self.last_poll_ok = self.clock.monotonic()
        self._update_lag()
        return records

    def _set_switch_interval(self, reason: str) -> None:
        """Short GIL turns while records are few, long ones while a backlog lifts the budget.
        kafka-python runs its network I/O on its own thread: every poll, send and commit hands
        over to it and back, and at Python's 5 ms switch interval the loop could wait that
        long for the GIL after each (docs/latency.md); under a backlog each hand-off costs CPU
        instead. The process-wide interval is the loop's alone to set: the first poll sets it."""
        b = self.s.batch
        ms = b.backlog_switch_interval_ms if reason == "backlog" and b.backlog_switch_interval_ms \
            else b.switch_interval_ms
        sys.setswitchinterval(ms / 1000)

    def _update_lag(self) -> None:
        try:
            lags = self.source.lag()
        except DependencyError:
            self._waiting = None
            return
        for (topic, p), lag in lags.items():
            self.metrics.lag.labels(topic, str(p)).set(lag)
        self._waiting = sum(lags.values()) if lags else None

    def _drop_fenced(self, fenced: set[TopicPartition]) -> None:
        for tp in fenced:
            log.error("fenced on %s[%d]: another worker owns it now, or Redis lost its token; "
                      "dropping it, writing nothing, rejoining the group", *tp)
            self.epochs.pop(tp, None)
        self.metrics.fenced_partitions.inc(len(fenced))
        self.source.rejoin()

    def _retry(self, fn: Callable):
        backoff = self.s.retry.initial_backoff_s
        while True:
            try:
                return fn()
            except DependencyError as e:
                self._backoff(e, backoff)
                backoff = min(backoff * 2, self.s.retry.max_backoff_s)

    def _backoff(self, e: DependencyError, seconds: float) -> None:
        self.metrics.retries.labels(e.dependency).inc()
        log.warning("%s; retrying in %.2fs", e, seconds)
        if self._stopping:
            raise ShutdownRequested() from e
        self.clock.sleep(seconds)
