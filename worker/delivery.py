"""Step 4 of the order of effects: what a batch produces, and waiting until Kafka has it.

``outgoing`` builds a batch's predictions (the rows the output policy emits), the predictions
re-emitted from outboxes and the dead letters, leaving out what is not *live*: records of
partitions fenced or rewound in this batch, and records being rebuilt (their outputs were
produced before). ``send`` hands them to the sink without waiting; ``settle`` waits for every
acknowledgement, resending what may pass on a retry. A dead letter refused for good is sent
again with its reason and coordinates only; anything else refused for good is dropped,
logged and counted: it can never be produced, and retrying it would block the partition.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .clock import Clock
from .config import KafkaSettings
from .engine import SessionUpdate, StepTable
from .errors import DependencyError
from .messages import Rejection, dead_letter_key, encode_dead_letter, minimal_dead_letter
from .metrics import Metrics
from .models import ModelSet
from .ports import Outgoing, Record, Sending, Sink, TopicPartition
from .recovery import Recovery
from .retry import Retrier
from .writer import Written

log = logging.getLogger("worker.loop")

LiveRows = list[tuple[SessionUpdate, list[int]]]  # per session update, its live table rows


@dataclass
class InFlight:
    """A batch written and sent, not yet acknowledged nor committed."""

    records: Sequence[Record]
    written: Written
    live: LiveRows
    rejections: Sequence[Rejection]
    dead_letters: dict[int, Rejection]  # id() of an outgoing dead letter -> its rejection
    sending: Sending
    t_batch: float  # perf_counter when the batch began
    t_sent: float  # perf_counter when its outputs were handed to the sink
    acked_at: float | None = None  # wall time of the last acknowledgement
    settle_s: float = 0.0
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # to commit once acked
    cover: dict[TopicPartition, int] = field(default_factory=dict)  # checkpoint records sent


class Delivery:
    def __init__(self, settings: KafkaSettings, sink: Sink, models: ModelSet,
                 recovery: Recovery, retrier: Retrier, metrics: Metrics, clock: Clock) -> None:
        self.settings, self.sink, self.models, self.recovery = settings, sink, models, recovery
        self.retry, self.metrics, self.clock = retrier, metrics, clock

    # --- what is produced -------------------------------------------------------------------

    def live(self, record: Record, w: Written) -> bool:
        """Whether this batch produces the outputs of ``record``."""
        return ((record.topic, record.partition) not in w.skipped
                and not self.recovery.suppressed(record))

    def live_rows(self, w: Written) -> LiveRows:
        """Per session update, the rows of its step table that are live in this batch (all
        of them unless a partition was skipped or is being rebuilt). The output policy then
        picks which of them are produced (``table.emit``, worker/output.py)."""
        if not w.skipped and not self.recovery.rebuilds:
            return [(u, u.steps) for u in w.result.updates]
        return [(u, [i for i in u.steps if self.live(u.table.records[i], w)])
                for u in w.result.updates]

    def outgoing(self, w: Written, live: LiveRows, rejections: Sequence[Rejection]
                 ) -> tuple[list[Outgoing], dict[int, Rejection]]:
        topic = self.settings.output_topic
        out: list[Outgoing] = []
        for table, rows in _by_table(live).values():
            emit = table.emit
            rows = [i for i in rows if emit[i]]
            keys = [table.session_ids[i].encode() for i in rows]
            encoder = self.models.encoder(table.model_id)
            out += [Outgoing(topic, key, value)
                    for key, value in zip(keys, encoder.encode_rows(table, rows))]
        for p in w.result.replayed:
            if self.live(p.record, w):
                out.append(Outgoing(topic, p.session_id.encode(),
                                    self.models.encoder(p.model_id).encode(p)))
        dead_letters: dict[int, Rejection] = {}
        for rej in [*rejections, *w.result.rejections]:
            if not self.live(rej.record, w):
                continue
            o = Outgoing(self.settings.dlq_topic, dead_letter_key(rej.record),
                         encode_dead_letter(rej))
            dead_letters[id(o)] = rej
            out.append(o)
        return out, dead_letters

    def send(self, messages: list[Outgoing]) -> Sending:
        return self.retry.call(lambda: self.sink.send(messages))

    def deliver(self, messages: list[Outgoing]) -> None:
        """Send and wait for every acknowledgement (checkpoint records before a commit)."""
        if messages:
            self.settle(InFlight((), None, [], (), {}, self.send(messages), 0.0, 0.0))

    # --- waiting for Kafka ------------------------------------------------------------------

    def settle(self, f: InFlight) -> None:
        """Wait until every message is acknowledged or refused for good (module docstring)."""
        sending: Sending = f.sending
        backoff = self.retry.settings.initial_backoff_s
        while True:
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
                self.retry.wait(error, backoff)
                backoff = self.retry.next_backoff(backoff)
            sending = self.send(again)


def _by_table(live: LiveRows) -> dict[int, tuple[StepTable, list[int]]]:
    """The live rows grouped by the step table they belong to (one per model per batch)."""
    by_table: dict[int, tuple[StepTable, list[int]]] = {}
    for u, rows in live:
        if rows:
            by_table.setdefault(id(u.table), (u.table, []))[1].extend(rows)
    return by_table
