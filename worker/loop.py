"""The worker's main loop: poll, decode, load states, step, store states, produce, commit.

Order of effects for one batch (this is the one place it is written down):

1. **Load states.** One MGET for every session in the batch. Nothing is written yet.
   *Crash here:* nothing happened; the batch is redelivered and processed as new.
2. **Step.** The pure engine drops duplicates (position at or before the stored one),
   advances each session through its new messages and encodes the new states, each with
   an outbox holding this batch's predictions for that session.
   *Crash here:* as in 1.
3. **Write states,** fenced and deduplicated, in one atomic script call. A write lands only
   if the partition's epoch is still ours and the stored position is the one we loaded.
   *Crash here (after the write, before 4):* on redelivery every message is a duplicate, so
   no state changes again; the predictions are re-emitted from the outboxes.
4. **Produce** predictions, dead letters and re-emitted predictions, then flush and wait
   for every acknowledgement.
   *Crash here:* as in 3; consumers may see a prediction twice.
5. **Commit** the next offset of every partition in the batch that was not fenced.
   *Crash after 5:* nothing is redelivered.

So the effect on state is exactly-once, and predictions are at-least-once: consumers
dedupe by ``(session_id, seq)``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .config import Settings
from .engine import BatchResult, Engine
from .errors import DependencyError, ShutdownRequested
from .messages import (Prediction, Record, Rejection, TokenMessage, decode, encode_dead_letter,
                       PredictionEncoder)
from .metrics import Metrics
from .state import StateStore, StateWrite, TopicPartition, WriteStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes


class Source(Protocol):
    """A consumer-group member. ``on_assigned``/``on_revoked`` run inside ``poll``."""

    def bind(self, on_assigned: Callable[[list[TopicPartition]], None],
             on_revoked: Callable[[list[TopicPartition]], None]) -> None: ...
    def poll(self, max_records: int, max_wait_ms: int) -> list[Record]: ...
    def commit(self, offsets: dict[TopicPartition, int]) -> bool: ...
    def lag(self) -> dict[TopicPartition, int]: ...
    def rejoin(self) -> None: ...
    def close(self) -> None: ...


class Sink(Protocol):
    def deliver(self, messages: Sequence[Outgoing]) -> None:
        """Send and wait for every acknowledgement; raise DependencyError(pending=...)."""
    def close(self) -> None: ...


@dataclass
class RunSummary:
    messages: int = 0
    batches: int = 0
    predictions: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {
        "ok": 0, "dead_lettered": 0, "duplicate": 0, "fenced": 0, "replayed": 0})
    tokens: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.messages / self.seconds if self.seconds else 0.0
        o = " ".join(f"{k}={v}" for k, v in self.outcomes.items())
        return (f"worker stopped: {self.messages} messages in {self.batches} batches, "
                f"{self.predictions} predictions, {self.tokens} tokens, {o}, "
                f"{self.seconds:.1f}s ({rate:.0f} msg/s)")


class Worker:
    def __init__(self, settings: Settings, engine: Engine, store: StateStore, source: Source,
                 sink: Sink, metrics: Metrics, labels: Sequence[str], model_id: str,
                 encode_tokens: Callable, vocab_size: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.s = settings
        self.engine, self.store, self.source, self.sink = engine, store, source, sink
        self.metrics = metrics
        self.labels, self.model_id = list(labels), model_id
        self.encoder = PredictionEncoder(labels, model_id)
        self.encode_tokens, self.vocab_size = encode_tokens, vocab_size
        self.clock = clock
        self.epochs: dict[TopicPartition, int] = {}
        self.summary = RunSummary()
        self.last_poll_ok = 0.0
        self._stopping = False
        self._writes_landed = 0  # for the test_crash_after_write hook only
        source.bind(self.on_assigned, self.on_revoked)

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand, commit and return (signal-safe)."""
        self._stopping = True

    def run(self) -> RunSummary:
        start = time.monotonic()
        last_input = start
        try:
            while not self._stopping:
                records = self._poll()
                if records or not self.epochs:  # idle time counts only while assigned
                    last_input = time.monotonic()
                if records:
                    self.process(records)
                elif self.s.idle_exit_s and time.monotonic() - last_input >= self.s.idle_exit_s:
                    log.info("idle for %.1fs: exiting", self.s.idle_exit_s)
                    break
                if self.s.max_messages and self.summary.messages >= self.s.max_messages:
                    log.info("processed %d messages: exiting", self.summary.messages)
                    break
        except ShutdownRequested:
            log.info("shutdown requested during an outage; the batch in hand was not committed")
        finally:
            self.summary.seconds = time.monotonic() - start
            self.source.close()
            self.sink.close()
            log.info(self.summary.line())
        return self.summary

    # --- rebalance callbacks --------------------------------------------------------------

    def on_assigned(self, partitions: Sequence[TopicPartition]) -> None:
        """Take a new fencing epoch for each partition: any older owner is now fenced."""
        if not partitions:
            return
        epochs = self._retry(lambda: self.store.acquire_epochs(list(partitions)), "redis")
        self.epochs.update(epochs)
        self.metrics.assigned.set(len(self.epochs))
        log.info("assigned %s", ", ".join(f"{t}[{p}]@epoch{e}" for (t, p), e in sorted(epochs.items())))

    def on_revoked(self, partitions: Sequence[TopicPartition]) -> None:
        for tp in partitions:
            self.epochs.pop(tp, None)
            try:
                self.metrics.lag.remove(tp[0], str(tp[1]))
            except KeyError:
                pass
        self.metrics.assigned.set(len(self.epochs))
        if partitions:
            log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in sorted(partitions)))

    # --- one batch ------------------------------------------------------------------------

    def process(self, records: Sequence[Record]) -> None:
        """Apply one polled batch, following the order of effects in the module docstring."""
        t_batch = time.perf_counter()
        owned = [r for r in records if (r.topic, r.partition) in self.epochs]
        if len(owned) < len(records):
            # Records of a partition we hold no epoch for (dropped after fencing): never apply
            # them, and rejoin so that their position goes back to the committed offset.
            log.warning("%d records from partitions without an epoch: rejoining the group",
                        len(records) - len(owned))
            self.source.rejoin()
        if not owned:
            return
        messages, rejections = self._decode(owned)
        states = self._load(messages)                                   # 1. load states
        result = self.engine.apply(messages, states)                    # 2. step
        fenced, stale = self._write(result)                             # 3. write states
        outgoing = self._outgoing(result, rejections, fenced)
        t0 = time.perf_counter()
        self._retry_delivery(outgoing)                                  # 4. produce, flush
        t1 = time.perf_counter()
        self._commit(owned, fenced)                                     # 5. commit
        self.metrics.produce_seconds.observe(t1 - t0)
        self.metrics.commit_seconds.observe(time.perf_counter() - t1)
        self._account(owned, result, rejections, fenced, stale, t_batch)

    def _decode(self, records: Sequence[Record]) -> tuple[list[TokenMessage], list[Rejection]]:
        messages, rejections = [], []
        for r in records:
            m = decode(r, self.vocab_size, self.encode_tokens, self.s.limits)
            (messages if isinstance(m, TokenMessage) else rejections).append(m)
        for rej in rejections:
            rec = rej.record
            log.warning("dead-letter %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, rej.reason)
        return messages, rejections

    def _load(self, messages: Sequence[TokenMessage]) -> dict[str, bytes | None]:
        first = {}
        for m in messages:
            first.setdefault(m.session_id, (m.record.topic, m.record.partition))
        sids, parts = list(first), list(first.values())
        t0 = time.perf_counter()
        values = self._retry(lambda: self.store.load(sids, parts), "redis")
        self.metrics.load_seconds.observe(time.perf_counter() - t0)
        return dict(zip(sids, values))

    def _write(self, result: BatchResult) -> tuple[set[TopicPartition], int]:
        """Write every session update; return the partitions found fenced and the number of
        messages whose write was stale (their predictions are withdrawn)."""
        writes = [StateWrite(u.session_id, u.partition, self.epochs[u.partition], u.expected_pos,
                             u.new_pos, u.value, u.ttl_ms) for u in result.updates]
        t0 = time.perf_counter()
        statuses = self._retry(lambda: self.store.store(writes), "redis") if writes else []
        statuses = self._own_stale_writes(result, statuses)
        self.metrics.store_seconds.observe(time.perf_counter() - t0)
        fenced: set[TopicPartition] = set()
        stale = 0
        for u, status in zip(result.updates, statuses):
            if status == WriteStatus.FENCED:
                fenced.add(u.partition)
            elif status == WriteStatus.STALE:
                # Someone else advanced this session since we loaded it: our step is void.
                log.warning("stale write for session %r at %s[%d] pos %d: skipped",
                            u.session_id, *u.partition, u.new_pos)
                stale += len(u.predictions)
                u.predictions = []
        if fenced:
            self._drop_fenced(fenced)
        if self.s.test_crash_after_write and WriteStatus.OK in statuses:
            self._test_crash_after_write()
        return fenced, stale

    def _test_crash_after_write(self) -> None:
        """Test hook (``GRU_TEST_CRASH_AFTER_WRITE=N``): die like a crash, with SIGKILL, right
        after the Nth state write that landed, so the batch is written but neither produced
        nor committed. Never called when the setting is unset."""
        self._writes_landed += 1
        if self._writes_landed == self.s.test_crash_after_write:
            log.critical("test hook: SIGKILL after state write %d, before produce and commit",
                         self._writes_landed)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def _own_stale_writes(self, result: BatchResult,
                          statuses: list[WriteStatus]) -> list[WriteStatus]:
        """A STALE answer can be our own write: the first attempt ran, its reply was lost
        (Redis restarted or timed out) and the retry found the position already moved. The
        stored value is then byte-for-byte ours, so count it as written: withdrawing its
        predictions and committing would lose them for good."""
        stale = [i for i, st in enumerate(statuses) if st == WriteStatus.STALE]
        if not stale:
            return statuses
        current = self._retry(lambda: self.store.load(
            [result.updates[i].session_id for i in stale],
            [result.updates[i].partition for i in stale]), "redis")
        out = list(statuses)
        for i, value in zip(stale, current):
            if value is not None and value == result.updates[i].value:
                out[i] = WriteStatus.OK
        return out

    def _outgoing(self, result: BatchResult, rejections: Sequence[Rejection],
                  fenced: set[TopicPartition]) -> list[Outgoing]:
        k = self.s.kafka
        out: list[Outgoing] = []
        preds: list[Prediction] = [p for u in result.updates for p in u.predictions] + result.replayed
        for p in preds:
            if (p.record.topic, p.record.partition) not in fenced:
                out.append(Outgoing(k.output_topic, p.session_id.encode(),
                                    self.encoder.encode(p)))
        for rej in [*rejections, *result.rejections]:
            if (rej.record.topic, rej.record.partition) not in fenced:
                out.append(Outgoing(k.dlq_topic, rej.record.key, encode_dead_letter(rej)))
        return out

    def _retry_delivery(self, outgoing: list[Outgoing]) -> None:
        pending = outgoing
        backoff = self.s.retry.initial_backoff_s
        while pending:
            try:
                self.sink.deliver(pending)
                return
            except DependencyError as e:
                pending = e.pending if e.pending is not None else pending
                self._backoff(e, backoff)
                backoff = min(backoff * 2, self.s.retry.max_backoff_s)

    def _commit(self, records: Sequence[Record], fenced: set[TopicPartition]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = (r.topic, r.partition)
            if tp not in fenced:
                offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
        if offsets and not self.source.commit(offsets):
            log.warning("commit of %s failed (rebalance?): those records will be redelivered "
                        "and deduplicated", offsets)

    def _account(self, records: Sequence[Record], result: BatchResult,
                 rejections: Sequence[Rejection], fenced: set[TopicPartition], stale: int,
                 t_batch: float) -> None:
        m, s = self.metrics, self.summary
        now = self.clock()
        ok = sum(len(u.predictions) for u in result.updates
                 if u.partition not in fenced)
        fenced_n = sum(1 for r in records if (r.topic, r.partition) in fenced)
        dead = len(rejections) + len(result.rejections)
        counts = {"ok": ok, "dead_lettered": dead, "duplicate": len(result.duplicates) + stale,
                  "fenced": fenced_n, "replayed": len(result.replayed)}
        for outcome, n in counts.items():
            if n:
                m.messages.labels(outcome).inc(n)
                s.outcomes[outcome] += n
        produced = 0
        for u in result.updates:
            if u.partition in fenced:
                continue
            for p in u.predictions:
                produced += 1
                if p.record.timestamp_ms is not None:
                    m.e2e_latency.observe(max(0.0, now - p.record.timestamp_ms / 1000))
            if u.predictions:
                m.sessions_started.inc(u.started)
                m.sessions_ended.inc(u.predictions[-1].final)
        produced += sum(1 for p in result.replayed
                        if (p.record.topic, p.record.partition) not in fenced)
        m.predictions.inc(produced)
        m.tokens.inc(result.tokens)
        m.step_seconds.observe(result.step_seconds)
        m.batch_size.observe(len(records))
        m.batch_seconds.observe(time.perf_counter() - t_batch)
        m.saw_sessions(u.session_id for u in result.updates)
        s.messages += len(records)
        s.batches += 1
        s.predictions += produced
        s.tokens += result.tokens

    # --- dependencies ---------------------------------------------------------------------

    def _poll(self) -> list[Record]:
        try:
            records = self.source.poll(self.s.batch.max_records, self.s.batch.max_wait_ms)
        except DependencyError as e:
            self._backoff(e, self.s.retry.initial_backoff_s)
            return []
        self.last_poll_ok = time.monotonic()
        self._update_lag()
        return records

    def _update_lag(self) -> None:
        try:
            for (topic, p), lag in self.source.lag().items():
                self.metrics.lag.labels(topic, str(p)).set(lag)
        except DependencyError:
            pass

    def _drop_fenced(self, fenced: set[TopicPartition]) -> None:
        for tp in fenced:
            log.error("fenced on %s[%d]: another worker owns it now; dropping it, writing nothing",
                      *tp)
            self.epochs.pop(tp, None)
        self.metrics.fenced_partitions.inc(len(fenced))
        self.metrics.assigned.set(len(self.epochs))
        self.source.rejoin()

    def _retry(self, fn: Callable, dependency: str):
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
        time.sleep(seconds)
