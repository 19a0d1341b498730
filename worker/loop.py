"""The worker's main loop: claim, poll, decode, load states, step, store states, produce, commit.

Order of effects for one batch N (this is the one place it is written down). Delivery is
pipelined: batch N's acknowledgements are awaited while batch N+1 is polled, decoded,
loaded and stepped, and always before batch N+1 writes anything.

0. **Claim** the partitions the group assigned since the last batch (outside the rebalance
   callback, so a Redis outage never blocks the group's heartbeats; after finishing the batch
   in flight, so its commit counts): take a new, never reused fencing token per partition (any
   older owner is now fenced) and read ``next_offset``, the offset up to which Redis holds
   the partition's effects, and the partition's checkpoint record in Kafka. Each claimed
   partition resumes at the group's committed offset, set explicitly (kafka-python keeps the
   position of a partition handed back to the same member), or earlier when Redis lost
   writes or everything (``worker.recovery``: the plan, and an operator's skip told from a
   rollback). Records from there up to the group's progress are *rebuilt*: applied again,
   their outputs suppressed (they were produced before). Polled records of partitions not
   ours are dropped.
   *Crash here:* nothing was written; the next owner claims again.
1. **Load states.** One MGET for every session in the batch. Nothing is written yet.
   *Crash here:* nothing of N happened; N is redelivered. Batch N-1 may still be in flight
   (sent, not acknowledged, not committed): it is redelivered too, its messages are
   duplicates and its predictions are re-emitted from the outboxes (step 3 below).
2. **Step.** The pure engine drops duplicates (position at or before the stored one),
   advances each session through its new messages and encodes the new states, each with
   an outbox holding this batch's predictions for that session, and those re-emitted from
   its old outbox in this batch (they stay until acknowledged).
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
4. **Produce** predictions, dead letters and re-emitted predictions, and about once per
   commit interval the checkpoint records of the batch's partitions (``worker.checkpoint``):
   handed to the producer, not awaited here (2' of the next batch, or the loop when no
   batch follows, waits). A dead
   letter refused for good (too large) is replaced by one with its reason and coordinates only;
   nothing refused for good is retried for ever.
   *Crash here:* as in 3; consumers may see a prediction twice.
5. **Commit** the next offset of every partition in the batch that was not fenced, once all of
   the batch's outputs are acknowledged (2' of the next batch, or when the poll comes back
   empty, or at shutdown). Settled batches are committed together, at most every
   ``kafka.commit_interval_ms`` (100 ms), and always before a claim, when the poll comes back
   empty and at shutdown: a commit costs a broker round trip, as much as a small batch. No
   commit goes past the offset of an acknowledged checkpoint record of its partition: one
   not yet covered waits for the next batch's records, or sends its own first.
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
import time
from collections.abc import Sequence

from .checkpoint import Checkpointer, Commit
from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .delivery import Delivery, InFlight
from .errors import ShutdownRequested, Stalled
from .failures import PermanentFailure
from .health import DependencyHealth, Progress
from .intake import Intake
from .messages import TokenMessage
from .metrics import Metrics
from .models import ModelSet
from .outcomes import RunSummary, account
from .ownership import Ownership
from .ports import Record, Sink, Source, StateStore, TopicPartition
from .recovery import Recovery
from .retry import Retrier
from .writer import StateWriter, Written

log = logging.getLogger(__name__)


class Worker:
    """The loop over the units that carry each step: ``Ownership`` (tokens), ``Recovery``
    (claims and rebuilds), ``StateWriter`` (3), ``Delivery`` (4), ``Checkpointer`` (5)."""

    def __init__(self, settings: Settings, models: ModelSet, store: StateStore, source: Source,
                 sink: Sink, metrics: Metrics, clock: Clock = SYSTEM_CLOCK,
                 health: DependencyHealth | None = None) -> None:
        self.settings, self.models, self.store = settings, models, store
        self.source, self.sink, self.metrics, self.clock = source, sink, metrics, clock
        self.health = health or DependencyHealth(metrics, clock)
        self.progress = Progress(settings.retry.stall_after_s, clock, metrics)
        self.retry = Retrier(settings.retry, metrics, clock, self.health, self.progress,
                             self.health.addresses)
        self.ownership = Ownership(metrics)
        st = settings.state
        self.checkpoint = Checkpointer(settings.kafka, st.namespace or settings.kafka.group_id,
                                       st.ttl_seconds * 1000, st.end_ttl_seconds * 1000, source,
                                       lambda messages: self.delivery.deliver(messages),
                                       metrics, clock)
        self.recovery = Recovery(st, store, source, self.ownership, self.checkpoint, models,
                                 self.retry, metrics, clock)
        self.writer = StateWriter(store, source, models, self.ownership, self.recovery,
                                  self.retry, metrics, clock)
        self.delivery = Delivery(settings.kafka, sink, models, self.recovery, self.retry,
                                 metrics, clock)
        self.intake = Intake(settings.batch, source, self.retry, lambda: self.ownership.owned,
                             self.progress, metrics, clock)
        self.retry.on_wait = self.intake.refresh_lag
        self.intake.known_skip = self.recovery.known_skip
        self.summary = RunSummary()
        self._stopping = False
        self._inflight: InFlight | None = None
        self._taken = 0  # input messages claimed into batches (for max_messages)
        self._last_input = clock.monotonic()
        source.bind(self.on_assigned, self.on_revoked)

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand, commit and return (signal-safe)."""
        self._stopping = self.retry.stopping = True

    def run(self) -> RunSummary:
        start = self.clock.monotonic()
        self._last_input = start
        try:
            while not self._stopping and self.run_once():
                pass
            self.settle(Commit.ALL)
        except ShutdownRequested:
            log.info("shutdown requested during an outage; the batch in hand was not committed")
        except (PermanentFailure, Stalled) as e:  # closing the source leaves the group
            log.critical("%s", e)
            raise
        finally:
            self.summary.seconds = self.clock.monotonic() - start
            self.source.close()
            self.sink.close()
            log.info(self.summary.line())
        return self.summary

    def run_once(self) -> bool:
        """One turn of the loop: poll, then process the batch, or settle when input pauses.
        False when a bound (``idle_exit_s``, ``max_messages``) says to stop."""
        records = self.intake.poll()
        if records or not self.ownership.owned:  # idle time counts only while assigned
            self._last_input = self.clock.monotonic()
        if records or self.ownership.unclaimed:
            self.process(records)
        else:
            self.settle(Commit.NOW)
            idle = self.clock.monotonic() - self._last_input
            if self.settings.idle_exit_s and idle >= self.settings.idle_exit_s:
                log.info("idle for %.1fs: exiting", self.settings.idle_exit_s)
                return False
        if self.settings.max_messages and self._taken >= self.settings.max_messages:
            log.info("took %d messages: exiting", self._taken)
            return False
        return True

    def ready(self) -> tuple[bool, dict]:
        """Holds partitions, all claimed, none being rebuilt, every dependency's last call
        answered (for /readyz; no I/O)."""
        own, rebuilding = self.ownership, self.recovery.rebuilding
        ok = bool(own.owned) and not own.unclaimed and not rebuilding and self.health.all_up()
        return ok, {"assigned_partitions": len(own.owned), "rebuilding": rebuilding,
                    **self.health.readiness()}

    def alive(self) -> tuple[bool, dict]:
        """For /healthz: not stuck (``worker.health.Progress``)."""
        return self.progress.healthy()

    # --- rebalance callbacks: note what changed, nothing more -----------------------------

    def on_assigned(self, partitions: Sequence[TopicPartition]) -> None:
        self.ownership.assigned(partitions)

    def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        self.ownership.revoked(partitions)
        self.recovery.forget(partitions)
        self.checkpoint.forget(partitions)  # redelivered to the next owner, deduplicated
        self.intake.forget(partitions)
        self.progress.released(partitions)
        if partitions:
            log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in sorted(partitions)))

    # --- one batch ------------------------------------------------------------------------

    def process(self, records: Sequence[Record]) -> None:
        """Apply one polled batch, following the order of effects in the module docstring.
        Its outputs are sent, not awaited: the next batch's poll, decode, load and step
        overlap with their acknowledgements, which ``settle`` waits for (then commits)
        before that next batch writes anything."""
        t_batch = time.perf_counter()
        records = self._claim(records)                                  # 0. claim
        if not records:
            return
        self._taken += len(records)
        m = self.metrics
        self.models.between_batches()  # unload a drained previous model
        t0 = time.perf_counter()
        messages, rejections = self.models.decode(records)
        t1 = time.perf_counter()
        states = self._load(messages)                                   # 1. load states
        t2 = time.perf_counter()
        result = self.models.apply(messages, states, *self.recovery.hints())  # 2. step
        t3 = time.perf_counter()
        self.settle(Commit.DUE)                                         # 2'. settle N-1
        t3b = time.perf_counter()
        written = self.writer.write(records, messages, result)          # 3. write states
        self.checkpoint.note_written(written.result.updates, written.skipped,
                                     written.result.kept)
        live = self.delivery.live_rows(written)
        t4 = time.perf_counter()
        outgoing, dead_letters = self.delivery.outgoing(written, live, rejections)
        offsets = self._done(records, written)
        checkpoints, cover = self.checkpoint.attach(self.recovery.committable(offsets))
        outgoing += checkpoints
        t5 = time.perf_counter()
        sending = self.delivery.send(outgoing)                          # 4. produce (no wait)
        t6 = time.perf_counter()
        self.intake.observe(len(records), len(result.updates), t6 - t_batch, result.tokens,
                            result.longest)
        m.decode_seconds.observe(t1 - t0)
        m.load_seconds.observe(t2 - t1)
        m.engine_seconds.observe(t3 - t2)
        m.store_seconds.observe(t4 - t3b)
        m.encode_seconds.observe(t5 - t4)
        self._inflight = InFlight(records, written, live, rejections, dead_letters, sending,
                                  t_batch, t6, offsets=offsets, cover=cover)

    def settle(self, when: Commit = Commit.ALL) -> None:
        """Finish the batch in flight: wait for every acknowledgement (4), then commit (5)
        as ``when`` says (``worker.checkpoint``)."""
        f, self._inflight = self._inflight, None
        if f is not None:
            t0 = time.perf_counter()
            self.delivery.settle(f)
            self.metrics.produce_seconds.observe(time.perf_counter() - t0)
            self.checkpoint.delivered(f.cover)
            self.checkpoint.acknowledged(self.recovery.committable(f.offsets))
            f.settle_s = time.perf_counter() - t0
            account(f, lambda r: self.delivery.live(r, f.written), self.recovery, self.metrics,
                    self.summary, f.acked_at or self.clock.time())
            self.recovery.advanced(f.offsets)
            self.progress.advanced(f.offsets)
        self.checkpoint.commit(when, self.ownership.holds)              # 5. commit

    @staticmethod
    def _done(records: Sequence[Record], w: Written) -> dict[TopicPartition, int]:
        """The next offset of every partition of a batch that was not skipped (a rewound one:
        where it was rewound to): what its commit carries once its outputs are acknowledged."""
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = (r.topic, r.partition)
            if tp not in w.skipped:
                offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
        offsets.update(w.held)
        return offsets

    # 0. claim ------------------------------------------------------------------------------

    def _claim(self, records: Sequence[Record]) -> list[Record]:
        """Claim what the group assigned since the last batch, and start each claimed
        partition exactly where its work resumes: the committed offset, or earlier when Redis
        is behind. That start is set explicitly (kafka-python keeps the position of a
        partition handed back to the same member, which can be past records this worker
        dropped while the partition was not its own); polled records of a claimed partition
        are kept only if they begin there. Records of partitions not ours are dropped."""
        rewound: set[TopicPartition] = set()
        if self.ownership.unclaimed:
            self.settle(Commit.ALL)  # its commit first, so that the resume points include it
            starts = self.recovery.claim(sorted(self.ownership.unclaimed))
            self.progress.assigned(starts)
            first: dict[TopicPartition, int] = {}
            for r in records:
                first.setdefault((r.topic, r.partition), r.offset)
            for tp, start in starts.items():
                if first.get(tp) != start:
                    self.source.seek(tp, start)
                    rewound.add(tp)
        holds = self.ownership.holds
        keep = [r for r in records
                if holds((r.topic, r.partition)) and (r.topic, r.partition) not in rewound]
        if len(keep) < len(records):
            log.info("dropped %d polled records of partitions not ours or restarted (they are "
                     "read again from where the work resumes)", len(records) - len(keep))
        return self.recovery.admit(keep)

    # 1. load -------------------------------------------------------------------------------

    def _load(self, messages: Sequence[TokenMessage]) -> dict[str, tuple[bytes | None, ...]]:
        """Each session's value under each model namespace served (one round trip)."""
        first: dict[str, TopicPartition] = {}
        for msg in messages:
            first.setdefault(msg.session_id, (msg.record.topic, msg.record.partition))
        sids, parts = list(first), list(first.values())
        models = self.models.namespaces
        values = self.retry.call(lambda: self.store.load(sids, parts, models))
        n = len(sids)
        return {sid: tuple(values[k * n + i] for k in range(len(models)))
                for i, sid in enumerate(sids)}
