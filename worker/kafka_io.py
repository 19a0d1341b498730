"""Kafka adapters: the consumer-group ``Source``, the acknowledged ``Sink`` and topic admin.

They translate kafka-python's objects and errors into the loop's ``Record``, ``Outgoing``
and ``DependencyError``, and hold no processing logic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP

from .config import KafkaSettings
from .errors import DependencyError
from .loop import Outgoing
from .messages import Record
from .state import TopicPartition

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_assigned: Callable, on_revoked: Callable) -> None:
        self._assigned, self._revoked = on_assigned, on_revoked

    def on_partitions_revoked(self, revoked) -> None:
        self._revoked([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned) -> None:
        self._assigned([(tp.topic, tp.partition) for tp in assigned])


class KafkaSource:
    """A consumer-group member with manual commits. ``poll`` fills a batch: it waits up to
    ``idle_poll_ms`` for a first record, then up to ``max_wait_ms`` more for the batch to fill."""

    def __init__(self, settings: KafkaSettings, idle_poll_ms: int = 200) -> None:
        self.settings = settings
        self.idle_poll_ms = idle_poll_ms
        try:
            self.consumer = KafkaConsumer(
                group_id=settings.group_id,
                enable_auto_commit=False,
                auto_offset_reset=settings.auto_offset_reset,
                session_timeout_ms=settings.session_timeout_ms,
                heartbeat_interval_ms=settings.heartbeat_interval_ms,
                max_poll_interval_ms=settings.max_poll_interval_ms,
                fetch_max_wait_ms=settings.fetch_max_wait_ms,
                **settings.client_options())
        except KafkaError as e:
            raise DependencyError("kafka", f"cannot connect to {settings.bootstrap_servers}: {e!r}")
        self._listener: _Listener | None = None
        self._next: dict[TopicPartition, int] = {}

    def bind(self, on_assigned: Callable, on_revoked: Callable) -> None:
        self._listener = _Listener(on_assigned, on_revoked)
        self.consumer.subscribe([self.settings.input_topic], listener=self._listener)

    def poll(self, max_records: int, max_wait_ms: int) -> list[Record]:
        """Wait up to ``idle_poll_ms`` for a first record, then take whatever the fetcher
        already holds (polls that do not wait) and, if ``max_wait_ms`` > 0, keep waiting for
        more until that much time has passed since the first record."""
        out: list[Record] = []
        timeout = self.idle_poll_ms
        deadline = None
        try:
            while len(out) < max_records:
                polled = self.consumer.poll(timeout_ms=timeout, max_records=max_records - len(out),
                                            update_offsets=True)
                got = 0
                for tp, recs in polled.items():
                    for r in recs:
                        out.append(Record(tp.topic, tp.partition, r.offset, r.key, r.value,
                                          r.timestamp))
                    if recs:
                        got += len(recs)
                        self._next[(tp.topic, tp.partition)] = recs[-1].offset + 1
                if not out:
                    return out
                now = time.monotonic()
                deadline = deadline or now + max_wait_ms / 1000
                if got:
                    timeout = 0  # drain what is already fetched before waiting any longer
                elif now < deadline:
                    timeout = max(1, int((deadline - now) * 1000))
                else:
                    break
        except KafkaError as e:
            if out:  # hand over what we have; the error resurfaces on the next poll
                return out
            raise DependencyError("kafka", f"poll failed: {e!r}") from e
        return out

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        payload = {KafkaTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        for attempt in range(3):
            try:
                self.consumer.commit(payload)
                return True
            except CommitFailedError as e:
                log.warning("commit rejected by the group coordinator: %s", e)
                return False
            except KafkaError as e:
                log.warning("commit attempt %d failed: %r", attempt + 1, e)
                time.sleep(0.2 * (attempt + 1))
        return False

    def lag(self) -> dict[TopicPartition, int]:
        out = {}
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            nxt = self._next.get((tp.topic, tp.partition))
            if hw is not None and nxt is not None:
                out[(tp.topic, tp.partition)] = max(0, hw - nxt)
        return out

    def assignment(self) -> list[TopicPartition]:
        return [(tp.topic, tp.partition) for tp in self.consumer.assignment()]

    def rejoin(self) -> None:
        """Drop every partition and rejoin the group: positions restart from the commits."""
        held = self.assignment()
        self.consumer.unsubscribe()
        if self._listener is not None:
            self._listener._revoked(held)
            self.consumer.subscribe([self.settings.input_topic], listener=self._listener)
        self._next.clear()

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except Exception as e:  # closing must not hide the real exit reason
            log.warning("consumer close failed: %r", e)


class KafkaSink:
    """Sends and waits for every acknowledgement (acks=all). Failed sends come back as
    ``DependencyError.pending`` so the loop can retry exactly those."""

    def __init__(self, settings: KafkaSettings, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        try:
            # Idempotence off: the loop retries unacknowledged sends itself (predictions are
            # at-least-once anyway), and an idempotent producer can wedge after a timeout.
            self.producer = KafkaProducer(acks="all", linger_ms=settings.linger_ms,
                                          batch_size=settings.producer_batch_bytes,
                                          retries=5, enable_idempotence=False, request_timeout_ms=int(timeout_s * 1000),
                                          max_block_ms=int(timeout_s * 1000),
                                          **settings.client_options())
        except KafkaError as e:
            raise DependencyError("kafka", f"cannot connect to {settings.bootstrap_servers}: {e!r}")

    def deliver(self, messages: Sequence[Outgoing]) -> None:
        futures = []
        try:
            for m in messages:
                futures.append(self.producer.send(m.topic, key=m.key, value=m.value))
            self.producer.flush(timeout=self.timeout_s)
        except KafkaError as e:
            raise DependencyError("kafka", f"produce failed: {e!r}",
                                  pending=_unacked(messages, futures)) from e
        pending = _unacked(messages, futures)
        if pending:
            first = next((f.exception for f in futures if f.is_done and f.failed()), None)
            raise DependencyError("kafka", f"{len(pending)} of {len(messages)} sends not "
                                  f"acknowledged ({first!r})", pending=pending)

    def close(self) -> None:
        try:
            self.producer.close(timeout=5)
        except Exception as e:
            log.warning("producer close failed: %r", e)


def _unacked(messages: Sequence[Outgoing], futures: list) -> list[Outgoing]:
    out = [m for m, f in zip(messages, futures) if not (f.is_done and f.succeeded())]
    return out + list(messages[len(futures):])


def create_topics(settings: KafkaSettings, partitions: int | None = None) -> list[str]:
    """Create the input, output and dead-letter topics; existing ones are left alone."""
    n = partitions or settings.partitions
    admin = KafkaAdminClient(**settings.client_options())
    created = []
    try:
        for name in (settings.input_topic, settings.output_topic, settings.dlq_topic):
            try:
                admin.create_topics([NewTopic(name, n, settings.replication_factor)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return created
