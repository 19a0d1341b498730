"""Kafka adapters: the consumer-group ``Source``, the acknowledged ``Sink`` and topic admin.

They translate kafka-python's objects and errors into the ports' ``Record``, ``Outgoing``,
``DependencyError`` and ``UndecodableInput``, and hold no processing logic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kerr
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.partitioner.default import DefaultPartitioner, murmur2
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP

from .config import KafkaSettings
from .errors import DependencyError, UndecodableInput
from .ports import Outgoing, Record, TopicPartition

log = logging.getLogger(__name__)

# Errors after which the same send can never succeed: retrying would block the batch for ever.
PERMANENT_SEND_ERRORS = (kerr.MessageSizeTooLargeError, kerr.RecordListTooLargeError,
                         kerr.InvalidRecordError, kerr.CorruptRecordError, kerr.InvalidTopicError)
UNDECODABLE_ERRORS = (kerr.UnsupportedCodecError, kerr.CorruptRecordError)


def _drain_failed_batches() -> None:
    """Work around a kafka-python (3.0) fetcher bug. When decoding a record batch fails (a
    codec it lacks, a CRC error), the half-read batch stays next in line with its iterator
    dead but never drained; a later poll whose position matches it loops for ever inside
    ``fetched_records`` (``take`` keeps returning nothing). A batch that ends normally drains
    itself, so an undrained one that yields nothing has failed: drain it, and the partition
    is fetched again, and fails again, loudly (``UndecodableInput``)."""
    try:
        from kafka.consumer.fetcher import Fetcher
        records_cls = Fetcher.PartitionRecords
        take = records_cls.take
    except (ImportError, AttributeError):  # another kafka-python: nothing to patch
        return
    if getattr(take, "_drains_failed", False):
        return

    def take_draining(self, n=None):
        records = take(self, n)
        if not records and getattr(self, "record_iterator", None) is not None:
            self.drain()
        return records

    take_draining._drains_failed = True  # type: ignore[attr-defined]
    records_cls.take = take_draining


_drain_failed_batches()


def fetch_bounds(settings: KafkaSettings) -> dict:
    """What one fetch may bring, for every consumer of ours. Both bounds count compressed
    bytes, as the broker stores them; a batch bigger than either still comes when it is first
    in line (so a partition cannot stall on it), up to the topic's max.message.bytes.
    kafka-python then inflates each batch whole, with no bound of its own: what one batch can
    inflate to is bounded only on the broker (docs/security.md, "Compressed input")."""
    return {"fetch_max_wait_ms": settings.fetch_max_wait_ms,
            "fetch_max_bytes": settings.fetch_max_bytes,
            "max_partition_fetch_bytes": settings.max_partition_fetch_bytes}


def missing_codecs() -> list[str]:
    """Compression codecs kafka-python cannot decode here (their libraries are missing)."""
    from kafka import codec
    have = {"gzip": codec.has_gzip(), "snappy": codec.has_snappy(), "lz4": codec.has_lz4(),
            "zstd": codec.has_zstd()}
    return [name for name, ok in have.items() if not ok]


def _headers(headers) -> tuple[tuple[str, bytes], ...]:
    """kafka-python's header list ((str, bytes) pairs; None on old message formats)."""
    return tuple((k, v if v is not None else b"") for k, v in headers) if headers else ()


class _Listener(ConsumerRebalanceListener):
    """Only notes what changed; the loop does the work (tokens, seeks)."""

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
        self.timeout_ms = settings.request_timeout_ms
        try:
            self.consumer = KafkaConsumer(
                group_id=settings.group_id,
                enable_auto_commit=False,
                auto_offset_reset=settings.auto_offset_reset,
                session_timeout_ms=settings.session_timeout_ms,
                heartbeat_interval_ms=settings.heartbeat_interval_ms,
                max_poll_interval_ms=settings.max_poll_interval_ms,
                **fetch_bounds(settings),
                **settings.client_options())
        except kerr.KafkaError as e:
            raise DependencyError("kafka", f"cannot connect to {settings.bootstrap_servers}: {e!r}")
        self._listener: _Listener | None = None
        self._next: dict[TopicPartition, int] = {}
        self._reader: KafkaConsumer | None = None  # read_tail's own consumer, outside the group

    def bind(self, on_assigned: Callable, on_revoked: Callable) -> None:
        self._listener = _Listener(on_assigned, on_revoked)
        self.consumer.subscribe([self.settings.input_topic], listener=self._listener)

    def poll(self, max_records: int, max_wait_ms: int) -> list[Record]:
        """Wait up to ``idle_poll_ms`` for a first record, then take whatever the fetcher
        already holds (polls that do not wait) and, if ``max_wait_ms`` > 0, keep waiting for
        more until that much time has passed since the first record.

        A rebalance inside one of the client's polls can leave records of a revoked partition
        in the batch; the loop drops those (it holds no token for them). Nothing else is
        dropped here: kafka-python keeps the position of a partition that stays assigned
        across a rebalance, so records gathered before it would never come again."""
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
                                          r.timestamp, _headers(r.headers)))
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
        except UNDECODABLE_ERRORS as e:
            if out:  # hand over what we have; the error comes back on the next poll
                return out
            raise self._undecodable(e) from e
        except kerr.KafkaError as e:
            if out:
                return out
            raise DependencyError("kafka", f"poll failed: {e!r}") from e
        return out

    def _undecodable(self, error: BaseException) -> UndecodableInput:
        """Name the partition and offset of a batch the client could not decode, and rewind
        to it. kafka-python (3.0) keeps the failed, half-read batch as the next in line: its
        next poll then spins on it for ever, or the partition stalls without a word. Drain it,
        so the batch is fetched again (a CRC error may pass) and fails again, loudly."""
        fetcher = getattr(self.consumer, "_fetcher", None)
        part = getattr(fetcher, "_next_partition_records", None)
        tp = getattr(part, "topic_partition", None)
        offset = getattr(part, "fetch_offset", None)
        if tp is None:
            return UndecodableInput(None, None, None, error)
        try:
            part.drain()
            fetcher._next_partition_records = None
            self.consumer.seek(tp, offset)
        except Exception as e:  # noqa: BLE001 - the report matters more than the rewind
            log.warning("could not rewind %s to %s: %r", tp, offset, e)
        return UndecodableInput(tp.topic, tp.partition, offset, error)

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        try:
            return {tp: self.consumer.committed(KafkaTP(*tp), timeout_ms=self.timeout_ms)
                    for tp in partitions}
        except kerr.KafkaError as e:
            raise DependencyError("kafka", f"reading committed offsets failed: {e!r}") from e

    def offsets_for_time(self, partitions: Sequence[TopicPartition],
                         timestamp_ms: int) -> dict[TopicPartition, int | None]:
        try:
            found = self.consumer.offsets_for_times({KafkaTP(*tp): timestamp_ms for tp in partitions},
                                                    timeout_ms=self.timeout_ms)
        except kerr.KafkaError as e:
            raise DependencyError("kafka", f"offsets_for_times failed: {e!r}") from e
        return {(tp.topic, tp.partition): (o.offset if o is not None else None)
                for tp, o in found.items()}

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.consumer.seek(KafkaTP(*partition), offset)
        self._next[partition] = offset

    def reset_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        tps = [KafkaTP(*tp) for tp in partitions]
        try:
            if self.settings.auto_offset_reset == "earliest":
                found = self.consumer.beginning_offsets(tps, timeout_ms=self.timeout_ms)
            else:
                found = self.consumer.end_offsets(tps, timeout_ms=self.timeout_ms)
        except kerr.KafkaError as e:
            raise DependencyError("kafka", f"listing offsets failed: {e!r}") from e
        return {(tp.topic, tp.partition): o for tp, o in found.items()}

    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        """Commit, retrying for at most ``request_timeout_ms`` in all: a coordinator outage
        must not hold the worker (kafka-python's own default is 305 s), nor SIGTERM past it.
        False means not committed: the records come again and are deduplicated."""
        payload = {KafkaTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        deadline = time.monotonic() + self.timeout_ms / 1000
        attempt = 0
        while True:
            attempt += 1
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return False
            try:
                self.consumer.commit(payload, timeout_ms=left_ms)
                return True
            except kerr.CommitFailedError as e:
                log.warning("commit rejected by the group coordinator: %s", e)
                return False
            except kerr.KafkaError as e:
                log.warning("commit attempt %d failed: %r", attempt, e)
                time.sleep(min(0.2 * attempt, max(0.0, deadline - time.monotonic())))

    def commit_async(self, offsets: Mapping[TopicPartition, int],
                     done: Callable[[dict[TopicPartition, int], bool], None]) -> None:
        """kafka-python sends the request from its network thread and queues the answer;
        ``done`` runs when the consumer next polls or commits (on this thread)."""
        sent = dict(offsets)
        payload = {KafkaTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in sent.items()}

        def answered(_offsets, response) -> None:
            if isinstance(response, Exception):
                log.warning("asynchronous commit failed: %r", response)
            done(sent, not isinstance(response, Exception))
        try:
            self.consumer.commit_async(payload, callback=answered)
        except kerr.KafkaError as e:
            log.warning("asynchronous commit not sent: %r", e)
            done(sent, False)

    def read_tail(self, topic: str, partition: int, count: int) -> list[Record]:
        """Read from ``count`` records before the end to the high watermark with a consumer of
        no group. The end is taken from the fetch responses, not from ListOffsets: tansu
        answers "latest" with the base offset of the last record batch + 1."""
        tp = KafkaTP(topic, partition)
        try:
            if self._reader is None:
                self._reader = KafkaConsumer(group_id=None, enable_auto_commit=False,
                                             **fetch_bounds(self.settings),
                                             **self.settings.client_options())
            reader = self._reader
            reader.assign([tp])
            first = reader.beginning_offsets([tp], timeout_ms=self.timeout_ms)[tp]
            end = reader.end_offsets([tp], timeout_ms=self.timeout_ms)[tp]
            reader.seek(tp, max(first, end - count))
            out: list[Record] = []
            deadline = time.monotonic() + self.timeout_ms / 1000
            while time.monotonic() < deadline:
                for recs in reader.poll(timeout_ms=100, max_records=1000).values():
                    out += [Record(topic, partition, r.offset, r.key, r.value, r.timestamp,
                                   _headers(r.headers)) for r in recs]
                hw = reader.highwater(tp)
                if hw is not None and reader.position(tp) >= hw:
                    return out[-count:] if count else []
        except kerr.KafkaError as e:
            raise DependencyError("kafka", f"reading the tail of {topic}[{partition}] "
                                  f"failed: {e!r}") from e
        raise DependencyError("kafka", f"reading the tail of {topic}[{partition}] timed out")

    def lag(self, fresh: bool = False) -> dict[TopicPartition, int]:
        tps = list(self.consumer.assignment())
        try:
            ends = self.consumer.end_offsets(tps, timeout_ms=self.timeout_ms) if fresh else {}
            out = {}
            for tp in tps:
                hw = ends.get(tp) if fresh else self.consumer.highwater(tp)
                nxt = self._next.get((tp.topic, tp.partition))
                if nxt is None and fresh:
                    nxt = self.consumer.committed(tp, timeout_ms=self.timeout_ms)
                if hw is not None and nxt is not None:
                    out[(tp.topic, tp.partition)] = max(0, hw - nxt)
            return out
        except kerr.KafkaError as e:
            raise DependencyError("kafka", f"reading the lag failed: {e!r}") from e

    def assignment(self) -> list[TopicPartition]:
        return [(tp.topic, tp.partition) for tp in self.consumer.assignment()]

    def rejoin(self) -> None:
        """Drop every partition and rejoin the group: positions restart from the commits."""
        held = self.assignment()
        self.consumer.unsubscribe()
        if self._listener is not None:
            self._listener.on_partitions_revoked([KafkaTP(*tp) for tp in held])
            self.consumer.subscribe([self.settings.input_topic], listener=self._listener)
        self._next.clear()

    def close(self) -> None:
        for consumer in (self.consumer, self._reader):
            if consumer is None:
                continue
            try:
                consumer.close(autocommit=False, timeout_ms=self.timeout_ms)
            except Exception as e:  # closing must not hide the real exit reason
                log.warning("consumer close failed: %r", e)


@dataclass
class Sending:
    """Messages handed to the producer, not yet known to be acknowledged."""

    messages: list[Outgoing]
    futures: list = field(default_factory=list)  # (message, FutureRecordMetadata)
    rejected: list[tuple[Outgoing, str]] = field(default_factory=list)
    unsent: list[Outgoing] = field(default_factory=list)
    error: BaseException | None = None
    done_at: list[float] = field(default_factory=list)  # when the last send was answered


def compression(settings: KafkaSettings) -> str | None:
    """``compression_type`` as kafka-python takes it (None for none)."""
    return None if settings.compression_type == "none" else settings.compression_type


class KeyHashPartitioner(DefaultPartitioner):
    """kafka-python's default partitioner — murmur2 of the key, as the Java client, so a
    session's predictions land where any Kafka producer would put that key — with each key's
    hash remembered. Sessions repeat, and per send the pure-Python murmur2, the metadata's
    topic set and the sorted partition list cost about 4 % of the worker's samples (py-spy,
    2026-11-27). Unkeyed records and unknown topics take the default path."""

    MAX_KEYS = 100_000  # then start over: a bounded cache, cheap to rebuild

    def __init__(self) -> None:
        self._hashes: dict[bytes, int] = {}
        self._sorted: dict[str, tuple[int, tuple[int, ...]]] = {}

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        parts = cluster.partitions_for_topic(topic) if serialized_key is not None else None
        if not parts:
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
        known = self._sorted.get(topic)
        if known is None or known[0] != len(parts):
            known = self._sorted[topic] = (len(parts), tuple(sorted(parts)))
        h = self._hashes.get(serialized_key)
        if h is None:
            if len(self._hashes) >= self.MAX_KEYS:
                self._hashes.clear()
            h = self._hashes[serialized_key] = murmur2(serialized_key) & 0x7FFFFFFF
        return known[1][h % known[0]]


class KafkaSink:
    """Sends (``send``) and waits for every acknowledgement (``wait``; acks=all). Sends that
    may succeed on a retry come back as ``DependencyError.pending``; sends refused for good
    are returned."""

    def __init__(self, settings: KafkaSettings, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        # One deliver() waits this long for its acknowledgements; what is still unacknowledged
        # is retried by the loop, after a backoff, or given up when it is stopping.
        self.flush_s = min(timeout_s, settings.request_timeout_ms / 1000)
        try:
            # Idempotence off: the loop retries unacknowledged sends itself (predictions are
            # at-least-once anyway), and an idempotent producer can wedge after a timeout.
            self.producer = KafkaProducer(acks="all", linger_ms=settings.linger_ms,
                                          batch_size=settings.producer_batch_bytes,
                                          compression_type=compression(settings),
                                          retries=5, enable_idempotence=False,
                                          partitioner=KeyHashPartitioner(),
                                          request_timeout_ms=int(timeout_s * 1000),
                                          max_block_ms=int(self.flush_s * 1000),
                                          **settings.client_options())
        except kerr.KafkaError as e:
            raise DependencyError("kafka", f"cannot connect to {settings.bootstrap_servers}: {e!r}")

    def send(self, messages: Sequence[Outgoing]) -> "Sending":
        """Hand every message to the producer and return without waiting (``wait`` does)."""
        out = Sending(list(messages))
        for i, m in enumerate(messages):
            try:
                out.futures.append((m, self.producer.send(m.topic, key=m.key, value=m.value,
                                                          partition=m.partition)))
            except PERMANENT_SEND_ERRORS as e:
                out.rejected.append((m, repr(e)))
            except ValueError as e:  # Outgoing.partition names a partition the topic lacks
                out.rejected.append((m, repr(e)))
            except kerr.KafkaError as e:  # the client is wedged or closed: retry the rest
                out.unsent += messages[i:]
                out.error = e
                break
        if out.futures:  # when the last send is acknowledged (end-to-end latency)
            out.futures[-1][1].add_both(lambda _: out.done_at.append(time.time()))
        return out

    def wait(self, sending: "Sending") -> list[tuple[Outgoing, str]]:
        """Wait for every acknowledgement of ``sending``; return the sends refused for good,
        raise DependencyError(pending=...) with those that may succeed when retried."""
        error = sending.error
        pending = list(sending.unsent)
        if any(not f.is_done for _, f in sending.futures):
            try:
                self.producer.flush(timeout=self.flush_s)
            except kerr.KafkaError as e:
                error = error or e
        rejected = list(sending.rejected)
        for m, f in sending.futures:
            if f.is_done and f.succeeded():
                continue
            if f.is_done and isinstance(f.exception, PERMANENT_SEND_ERRORS):
                rejected.append((m, repr(f.exception)))
            else:
                pending.append(m)
                error = error or (f.exception if f.is_done else None)
        if pending:
            raise DependencyError("kafka", f"{len(pending)} of {len(sending.messages)} sends not "
                                  f"acknowledged ({error!r})", pending=pending, rejected=rejected)
        return rejected

    def close(self) -> None:
        try:
            self.producer.close(timeout=5)
        except Exception as e:
            log.warning("producer close failed: %r", e)


def create_topics(settings: KafkaSettings, partitions: int | None = None) -> list[str]:
    """Create the input, output, dead-letter and checkpoint topics; existing ones are left
    alone. The checkpoint topic is compacted: only each partition's last record matters."""
    n = partitions or settings.partitions
    admin = KafkaAdminClient(**settings.client_options())
    created = []
    try:
        for name in (settings.input_topic, settings.output_topic, settings.dlq_topic,
                     settings.checkpoint_topic):
            configs = CHECKPOINT_TOPIC_CONFIGS if name == settings.checkpoint_topic else None
            try:
                admin.create_topics([NewTopic(name, n, settings.replication_factor,
                                              topic_configs=configs or {})])
                created.append(name)
            except kerr.TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return created


CHECKPOINT_TOPIC_CONFIGS = {"cleanup.policy": "compact"}


def topic_partitions(admin: KafkaAdminClient, names: Sequence[str]) -> dict[str, int | None]:
    """Each topic's partition count (None: it does not exist)."""
    out: dict[str, int | None] = {}
    for t in admin.describe_topics(list(names)):
        out[t["name"]] = len(t["partitions"]) if t.get("error_code", 0) == 0 else None
    return out


def ensure_checkpoint_topic(settings: KafkaSettings) -> None:
    """The worker's checkpoint topic holds each input partition's records in the partition of
    the same number: create it with the input's partition count when it is missing (as
    Kafka Streams creates its internal topics), refuse one with fewer partitions."""
    try:
        admin = KafkaAdminClient(**settings.client_options())
    except kerr.KafkaError as e:
        raise DependencyError("kafka", f"cannot connect to {settings.bootstrap_servers}: {e!r}")
    try:
        counts = topic_partitions(admin, [settings.input_topic, settings.checkpoint_topic])
        n_in, n_cp = counts.get(settings.input_topic), counts.get(settings.checkpoint_topic)
        if n_in is None:
            return  # nothing to size it by; the input topic's absence is reported elsewhere
        if n_cp is None:
            try:
                admin.create_topics([NewTopic(settings.checkpoint_topic, n_in,
                                              settings.replication_factor,
                                              topic_configs=CHECKPOINT_TOPIC_CONFIGS)])
                log.info("created the checkpoint topic %s (%d partitions, compacted)",
                         settings.checkpoint_topic, n_in)
            except kerr.TopicAlreadyExistsError:
                pass  # another worker of the group made it first
        elif n_cp < n_in:
            raise ValueError(f"the checkpoint topic {settings.checkpoint_topic} has {n_cp} "
                             f"partitions, fewer than the input's {n_in} "
                             f"(GRU_KAFKA__CHECKPOINT_TOPIC): add partitions or name another")
    finally:
        admin.close()
