"""confluent-kafka (librdkafka) adapters: the consumer-group ``Source``, the acknowledged ``Sink``
and topic admin, beside kafka-python's (``worker.kafka_io``); ``kafka.client`` chooses.

They guarantee what ``worker.kafka_io`` guarantees and translate confluent-kafka's messages and
errors into the ports' ``Record``, ``Outgoing``, ``DependencyError`` and ``UndecodableInput``.
librdkafka does its network I/O on its own threads, outside the GIL; its callbacks (rebalance,
commit answers, delivery reports) run on the caller's thread, inside ``poll`` and ``wait``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

try:
    import confluent_kafka as ck
    from confluent_kafka.admin import AdminClient, NewTopic
except ImportError:  # an optional extra: say which setting asked for it, in one line
    raise SystemExit("kafka.client=confluent (GRU_KAFKA__CLIENT / --kafka-client) needs "
                     "confluent-kafka: pip install 'gru-stream[rdkafka]'") from None

from .config import KafkaSettings
from .errors import DependencyError, UndecodableInput
from .ports import Outgoing, Record, TopicPartition

log = logging.getLogger(__name__)
E = ck.KafkaError

# Eager rebalancing with kafka-python's own default assignors, deliberately not
# cooperative-sticky: (1) a group can then hold kafka-python and confluent workers at once,
# so switching clients is a rolling restart (a cooperative member cannot join an eager
# group); (2) tansu 0.6.0 takes session_timeout/2 per join, and cooperative moves a
# partition in two rebalances, doubling that pause; (3) the loop claims a new fencing token
# for every partition it is assigned, so an eager reassignment costs it one Redis call, and
# fencing never depends on which member the assignor keeps a partition on.
ASSIGNORS = "range,roundrobin"

# Sends that can never succeed: retrying would block the batch for ever. (INVALID_MSG is the
# broker's CORRUPT_MESSAGE; TOPIC_EXCEPTION its InvalidTopic; _UNKNOWN_PARTITION a partition
# the topic does not have, asked for by Outgoing.partition.)
PERMANENT_SEND_ERRORS = frozenset({
    E.MSG_SIZE_TOO_LARGE, E.RECORD_LIST_TOO_LARGE, E.INVALID_RECORD,
    E.INVALID_MSG, E.TOPIC_EXCEPTION, E._UNKNOWN_PARTITION, E._INVALID_ARG})
# A record batch librdkafka could not decode: a failed CRC, a payload its codec could not
# decompress, a codec it does not know. librdkafka reports it and skips the batch.
UNDECODABLE_ERRORS = frozenset({E._BAD_MSG, E._BAD_COMPRESSION, E._NOT_IMPLEMENTED,
                                E.INVALID_MSG, E.UNSUPPORTED_COMPRESSION_TYPE})
COMMIT_POLL_S = 0.001  # how often a commit waiting for its answer looks for it


# Our settings (KafkaSettings fields) and librdkafka's names for them.
LIBRDKAFKA_NAMES = {"bootstrap_servers": "bootstrap.servers", "client_id": "client.id",
                    "security_protocol": "security.protocol", "sasl_mechanism": "sasl.mechanism",
                    "sasl_plain_username": "sasl.username", "sasl_plain_password": "sasl.password",
                    "ssl_cafile": "ssl.ca.location", "ssl_certfile": "ssl.certificate.location",
                    "ssl_keyfile": "ssl.key.location"}


def client_config(settings: KafkaSettings) -> dict:
    """Connection and security settings in librdkafka's names, from the same ``GRU_KAFKA__*``
    settings kafka-python takes (``KafkaSettings.client_options``)."""
    conf: dict = {}
    for ours, theirs in LIBRDKAFKA_NAMES.items():
        value = getattr(settings, ours)
        if value is None:
            continue
        if ours == "sasl_plain_password":
            value = value.get_secret_value()
        conf[theirs] = value.lower() if ours == "security_protocol" else value
    return conf


def _client(make: Callable, conf: dict, what: str):
    """A librdkafka client, or the process ends with one line naming the setting: librdkafka
    checks its settings (a CA file that is not there, a bad value) when a client is made, and
    such a setting never heals."""
    try:
        return make(conf, logger=log)
    except (ck.KafkaException, ValueError) as e:
        named = [f"GRU_KAFKA__{ours.upper()}" for ours, theirs in LIBRDKAFKA_NAMES.items()
                 if theirs in str(e)]
        raise SystemExit(f"cannot create the Kafka {what} (kafka.client=confluent): {e}"
                         + (f"; see {', '.join(named)}" if named else "")) from None


def consumer_config(settings: KafkaSettings) -> dict:
    """The group member's settings. Where librdkafka's defaults differ from kafka-python's,
    kafka-python's are kept: CRCs checked, uncommitted reads, range/roundrobin assignors."""
    return {**client_config(settings), "group.id": settings.group_id,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": settings.auto_offset_reset,
            "session.timeout.ms": settings.session_timeout_ms,
            "heartbeat.interval.ms": settings.heartbeat_interval_ms,
            # librdkafka refuses a max poll interval below the session timeout
            "max.poll.interval.ms": max(settings.max_poll_interval_ms,
                                        settings.session_timeout_ms),
            "fetch.wait.max.ms": settings.fetch_max_wait_ms,
            "partition.assignment.strategy": ASSIGNORS,
            "check.crcs": True, "isolation.level": "read_uncommitted",
            "enable.partition.eof": False}


def producer_config(settings: KafkaSettings, timeout_s: float) -> dict:
    """As kafka_io.KafkaSink's producer. ``murmur2_random`` is the Java client's (and
    kafka-python's) key hash; librdkafka's default, consistent_random (CRC32), would put a
    session's predictions on other partitions than any Java or kafka-python producer."""
    return {**client_config(settings), "acks": "all", "linger.ms": settings.linger_ms,
            "batch.size": settings.producer_batch_bytes,
            "compression.type": settings.compression_type,
            # idempotence off, as kafka_io: the loop retries unacknowledged sends itself
            "enable.idempotence": False, "max.in.flight.requests.per.connection": 5,
            "partitioner": "murmur2_random", "message.timeout.ms": int(timeout_s * 1000),
            "message.max.bytes": 1_048_576}  # kafka-python's max_request_size


def _record(m) -> Record:
    ts = m.timestamp()[1]
    headers = m.headers()  # in order, repeats kept: a repeated tenant header is refused
    return Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                  ts if ts >= 0 else None,
                  tuple((k, v if v is not None else b"") for k, v in headers) if headers else ())


def _close_within(clients: list, seconds: float, what: str) -> None:
    """``close()`` each client, giving up after ``seconds``: librdkafka's consumer close waits
    for the group coordinator without a bound, and a hung broker must not hold SIGTERM."""
    def close_all() -> None:
        for c in clients:
            try:
                c.close()
            except Exception as e:  # closing must not hide the real exit reason
                log.warning("%s close failed: %r", what, e)
    t = threading.Thread(target=close_all, name=f"rdkafka-close-{what}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        log.warning("%s close did not finish within %.1fs (broker unreachable?): left behind",
                    what, seconds)


@dataclass(eq=False)
class _Commit:
    """A commit sent and not yet answered: the offsets, and who wants the answer."""

    offsets: dict[TopicPartition, int]
    done: Callable[[dict[TopicPartition, int], bool], None]


class RdKafkaSource:
    """A consumer-group member with manual commits. ``poll`` fills a batch: it waits up to
    ``idle_poll_ms`` for a first record, takes what librdkafka has already fetched, then waits
    up to ``max_wait_ms`` more for the batch to fill."""

    def __init__(self, settings: KafkaSettings, idle_poll_ms: int = 200) -> None:
        self.settings = settings
        self.idle_poll_ms = idle_poll_ms
        self.timeout_s = settings.request_timeout_ms / 1000
        if settings.max_poll_interval_ms < settings.session_timeout_ms:
            log.warning("kafka.max_poll_interval_ms=%d is below kafka.session_timeout_ms=%d, "
                        "which librdkafka refuses: it is raised to %d",
                        settings.max_poll_interval_ms, settings.session_timeout_ms,
                        settings.session_timeout_ms)
        conf = {**consumer_config(settings), "on_commit": self._commit_answered,
                "error_cb": self._client_error}
        self.consumer = _client(ck.Consumer, conf, "consumer")
        self._on_assigned: Callable = lambda tps: None
        self._on_revoked: Callable = lambda tps: None
        self._assigned: set[TopicPartition] = set()
        self._held: list = []  # messages polled while a commit waited, not handed over yet
        self._seeks: dict[TopicPartition, int] = {}  # seeks librdkafka refused so far
        self._commits: dict[frozenset, list[_Commit]] = {}  # by their (partition, offset)s
        self._reader = None  # read_tail's own consumer, outside the group
        self._closing = False
        # Rebalance callbacks reach the loop only inside poll (and rejoin), as the port says:
        # librdkafka also serves them while a commit waits for its answer, and those wait
        # here until the next poll.
        self._forward = False
        self._deferred: list[tuple[Callable, list[TopicPartition]]] = []

    # --- the group ------------------------------------------------------------------------

    def bind(self, on_assigned: Callable, on_revoked: Callable) -> None:
        self._on_assigned, self._on_revoked = on_assigned, on_revoked
        self._subscribe()

    def _subscribe(self) -> None:
        self.consumer.subscribe([self.settings.input_topic], on_assign=self._assigned_cb,
                                on_revoke=self._revoked_cb, on_lost=self._revoked_cb)

    def _assigned_cb(self, _consumer, partitions) -> None:
        """Only notes what changed (confluent-kafka assigns them when this returns); the
        loop does the work (tokens, seeks)."""
        tps = [(p.topic, p.partition) for p in partitions]
        self._assigned.update(tps)
        self._notify(self._on_assigned, tps)

    def _revoked_cb(self, _consumer, partitions) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget(tps)
        self._notify(self._on_revoked, tps)

    def _notify(self, callback: Callable, tps: list[TopicPartition]) -> None:
        if self._closing:
            return
        if self._forward:
            callback(tps)
        else:
            self._deferred.append((callback, tps))

    def _deliver_deferred(self) -> None:
        while self._deferred:
            callback, tps = self._deferred.pop(0)
            callback(tps)

    def _forget(self, tps: Sequence[TopicPartition]) -> None:
        gone = set(tps)
        self._assigned -= gone
        for tp in gone:
            self._seeks.pop(tp, None)
        if self._held:
            self._held = [m for m in self._held if (m.topic(), m.partition()) not in gone]

    def _client_error(self, err) -> None:
        """librdkafka's own errors (a broker down, a failed connect): it retries them itself."""
        if err.fatal():
            log.error("kafka client: fatal error: %s", err)
        else:
            log.warning("kafka client: %s", err)

    # --- records --------------------------------------------------------------------------

    def poll(self, max_records: int, max_wait_ms: int) -> list[Record]:
        """Wait up to ``idle_poll_ms`` for a first record, then take whatever librdkafka
        already holds and, if ``max_wait_ms`` > 0, keep waiting for more until that much time
        has passed since the first record. Records of a partition being rewound (a seek
        librdkafka has not applied yet, an undecodable batch) are left out: they come again
        from where the rewind points."""
        self._deliver_deferred()
        self._apply_seeks()
        c = self.consumer
        out: list[Record] = []
        stalled: dict[TopicPartition, UndecodableInput] = {}
        self._forward = True
        try:
            if self._held:
                batch, self._held = self._held[:max_records], self._held[max_records:]
            else:
                first = c.poll(self.idle_poll_ms / 1000)
                if first is None:
                    return out
                batch = [first, *c.consume(max_records - 1, 0)] if max_records > 1 else [first]
            deadline = time.monotonic() + max_wait_ms / 1000
            while True:
                self._take(batch, out, stalled)
                left = max_records - len(out)
                if left <= 0:
                    break
                wait = deadline - time.monotonic()
                batch = c.consume(left, max(0.0, wait) if max_wait_ms else 0)
                if not batch and (not max_wait_ms or wait <= 0):
                    break
        except ck.KafkaException as e:
            if not out:
                raise DependencyError("kafka", f"poll failed: {e}") from e
        finally:
            self._forward = False
        if stalled:
            out = self._stall(stalled, out)
        return out

    def _take(self, batch: list, out: list[Record], stalled: dict) -> None:
        for m in batch:
            err = m.error()
            if err is None:
                if self._seeks and (m.topic(), m.partition()) in self._seeks:
                    continue
                out.append(_record(m))
            elif err.code() in UNDECODABLE_ERRORS and m.topic() is not None:
                tp = (m.topic(), m.partition())
                if tp not in stalled:
                    stalled[tp] = UndecodableInput(tp[0], tp[1], m.offset(),
                                                   ck.KafkaException(err))
            elif err.code() != E._PARTITION_EOF:
                log.warning("kafka consumer: %s%s", err, f" ({m.topic()}[{m.partition()}])"
                            if m.topic() else "")

    def _stall(self, stalled: dict[TopicPartition, UndecodableInput],
               out: list[Record]) -> list[Record]:
        """An undecodable batch: librdkafka reports it and goes on past it; kafka-python
        (worker.kafka_io) stops there. Do the same here, so that a corrupt batch is never
        skipped without a word: hand over what came before it, rewind to it (it is fetched
        again, and a CRC error on the wire may pass), and raise when nothing else came."""
        keep = [r for r in out if (r.topic, r.partition) not in stalled
                or r.offset < stalled[(r.topic, r.partition)].offset]
        for tp, e in stalled.items():
            self.seek(tp, e.offset)
        if keep:
            return keep
        raise next(iter(stalled.values()))

    # --- positions ------------------------------------------------------------------------

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """librdkafka seeks only a partition it is fetching; one it refuses (assigned a moment
        ago, not started) is sought again before each poll, and its records are left out
        until then."""
        if self._held:
            self._held = [m for m in self._held if (m.topic(), m.partition()) != partition]
        try:
            self.consumer.seek(ck.TopicPartition(partition[0], partition[1], offset))
            self._seeks.pop(partition, None)
        except ck.KafkaException as e:
            if partition in self._assigned:
                log.debug("seek %s to %d not applied yet (%s): again before the next poll",
                          partition, offset, e)
                self._seeks[partition] = offset
            else:
                log.info("seek %s to %d ignored: not assigned (%s)", partition, offset, e)

    def _apply_seeks(self) -> None:
        for tp, offset in list(self._seeks.items()):
            self.seek(tp, offset)

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        try:
            found = self.consumer.committed([ck.TopicPartition(t, p) for t, p in partitions],
                                            timeout=self.timeout_s)
        except ck.KafkaException as e:
            raise DependencyError("kafka", f"reading committed offsets failed: {e}") from e
        for tp in found:
            if tp.error is not None:
                raise DependencyError("kafka", f"reading the committed offset of "
                                      f"{tp.topic}[{tp.partition}] failed: {tp.error}")
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in found}

    def offsets_for_time(self, partitions: Sequence[TopicPartition],
                         timestamp_ms: int) -> dict[TopicPartition, int | None]:
        try:
            found = self.consumer.offsets_for_times(
                [ck.TopicPartition(t, p, timestamp_ms) for t, p in partitions],
                timeout=self.timeout_s)
        except ck.KafkaException as e:
            raise DependencyError("kafka", f"offsets_for_times failed: {e}") from e
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in found}

    def _watermarks(self, tp: TopicPartition, consumer=None) -> tuple[int, int]:
        try:
            return (consumer or self.consumer).get_watermark_offsets(
                ck.TopicPartition(*tp), timeout=self.timeout_s, cached=False)
        except ck.KafkaException as e:
            raise DependencyError("kafka", f"listing the offsets of {tp[0]}[{tp[1]}] failed: "
                                  f"{e}") from e

    def reset_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        end = 0 if self.settings.auto_offset_reset == "earliest" else 1
        return {tp: self._watermarks(tp)[end] for tp in partitions}

    # --- commits --------------------------------------------------------------------------

    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        """Commit and wait for the answer, for at most ``request_timeout_ms``: librdkafka's
        own synchronous commit waits for ever while the coordinator is unreachable. The
        consumer is polled meanwhile (that is how librdkafka delivers the answer); records it
        returns, and rebalance callbacks it serves, are held for the next ``poll``. False
        means not committed: the records come again and are deduplicated."""
        answer: list[bool] = []
        pending = self._send_commit(offsets, lambda _offsets, ok: answer.append(ok))
        deadline = time.monotonic() + self.timeout_s
        while not answer:
            if time.monotonic() >= deadline:
                self._drop_commit(pending)
                log.warning("commit not answered within %.1fs", self.timeout_s)
                return False
            try:
                m = self.consumer.poll(COMMIT_POLL_S)
            except ck.KafkaException as e:
                log.warning("poll while committing failed: %s", e)
                continue
            if m is not None:
                self._held.append(m)
        return answer[0]

    def commit_async(self, offsets: Mapping[TopicPartition, int],
                     done: Callable[[dict[TopicPartition, int], bool], None]) -> None:
        """librdkafka sends the commit from its own thread and queues the answer; ``done``
        runs when the consumer next polls or commits (on this thread)."""
        self._send_commit(offsets, done)

    def _send_commit(self, offsets: Mapping[TopicPartition, int], done: Callable) -> _Commit | None:
        sent = dict(offsets)
        if not sent:
            done(sent, True)
            return None
        pending = _Commit(sent, done)
        key = frozenset(sent.items())
        self._commits.setdefault(key, []).append(pending)
        try:
            self.consumer.commit(offsets=[ck.TopicPartition(t, p, o) for (t, p), o in sent.items()],
                                 asynchronous=True)
        except ck.KafkaException as e:
            log.warning("commit not sent: %s", e)
            self._drop_commit(pending)
            done(sent, False)
            return None
        return pending

    def _drop_commit(self, pending: _Commit | None) -> None:
        if pending is None:
            return
        key = frozenset(pending.offsets.items())
        waiting = self._commits.get(key, [])
        if pending in waiting:
            waiting.remove(pending)
        if not waiting:
            self._commits.pop(key, None)

    def _commit_answered(self, err, partitions) -> None:
        """librdkafka's answer to a commit (the ``on_commit`` callback, one for the whole
        consumer): matched to the commit that sent these offsets."""
        parts = partitions or []
        key = frozenset(((p.topic, p.partition), p.offset) for p in parts)
        waiting = self._commits.get(key)
        if not waiting:
            return  # given up on (timed out), or no commit of ours
        pending = waiting.pop(0)
        if not waiting:
            del self._commits[key]
        failed = err or next((p.error for p in parts if p.error is not None), None)
        if failed is not None:
            log.warning("commit failed: %s", failed)
        pending.done(pending.offsets, failed is None)

    # --- outside the group ----------------------------------------------------------------

    def read_tail(self, topic: str, partition: int, count: int) -> list[Record]:
        """Read from ``count`` records before the end to the end with a consumer that never
        joins a group (assigned, never subscribed; it commits nothing). The end is where
        librdkafka reports the partition's end (``_PARTITION_EOF``), not ListOffsets: tansu
        answers "latest" with the base offset of the last record batch + 1, which can only
        start the read earlier."""
        if count <= 0:
            return []
        tp = (topic, partition)
        if self._reader is None:
            self._reader = _client(ck.Consumer, {
                **client_config(self.settings), "group.id": f"{self.settings.group_id}.tail",
                "enable.auto.commit": False, "enable.partition.eof": True,
                "check.crcs": True, "isolation.level": "read_uncommitted",
                "fetch.wait.max.ms": self.settings.fetch_max_wait_ms}, "tail reader")
        reader = self._reader
        first, end = self._watermarks(tp, reader)
        if end <= first:
            return []
        out: list[Record] = []
        try:
            reader.assign([ck.TopicPartition(topic, partition, max(first, end - count))])
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline:
                for m in reader.consume(1000, 0.1):
                    err = m.error()
                    if err is None:
                        out.append(_record(m))
                    elif err.code() == E._PARTITION_EOF:
                        return out[-count:]
                    elif err.code() in UNDECODABLE_ERRORS:
                        raise UndecodableInput(topic, partition, m.offset(),
                                               ck.KafkaException(err))
                    else:
                        log.warning("reading the tail of %s[%d]: %s", topic, partition, err)
        except ck.KafkaException as e:
            raise DependencyError("kafka", f"reading the tail of {topic}[{partition}] "
                                  f"failed: {e}") from e
        finally:
            try:
                reader.unassign()
            except ck.KafkaException:
                pass
        raise DependencyError("kafka", f"reading the tail of {topic}[{partition}] timed out")

    def lag(self, fresh: bool = False) -> dict[TopicPartition, int]:
        """High watermark (from fetch responses, as kafka-python's ``highwater``; from the
        broker when ``fresh``) minus the next offset to hand over, per assigned partition
        (the committed offset where none was handed over yet, when ``fresh``)."""
        if not self._assigned:
            return {}
        out = {}
        try:
            tps = [ck.TopicPartition(t, p) for t, p in self._assigned]
            positions = self.consumer.position(tps)
            if fresh and any(p.offset < 0 for p in positions):
                committed = {(c.topic, c.partition): c.offset for c in
                             self.consumer.committed(tps, timeout=self.timeout_s)}
                positions = [ck.TopicPartition(p.topic, p.partition,
                                               committed.get((p.topic, p.partition), -1))
                             if p.offset < 0 else p for p in positions]
            for p in positions:
                if p.offset < 0:
                    continue
                hw = self.consumer.get_watermark_offsets(
                    p, timeout=self.timeout_s, cached=not fresh)[1]
                if hw >= 0:
                    out[(p.topic, p.partition)] = max(0, hw - p.offset)
        except ck.KafkaException as e:
            raise DependencyError("kafka", f"reading positions failed: {e}") from e
        return out

    def assignment(self) -> list[TopicPartition]:
        return sorted(self._assigned)

    def rejoin(self) -> None:
        """Drop every partition and rejoin the group: positions restart from the commits.
        The revocation is served here, before subscribing again (records polled meanwhile
        are dropped: they come again from the commits): librdkafka 2.16 aborts in ``close``
        (assert ``!rkcg->rkcg_subscription``) after an unsubscribe and a subscribe with the
        revocation still unserved between them."""
        self.consumer.unsubscribe()
        self._held.clear()
        self._seeks.clear()
        self._deliver_deferred()
        deadline = time.monotonic() + self.timeout_s
        self._forward = True  # as kafka_io: the loop hears of the revocation in rejoin
        try:
            while self._assigned and time.monotonic() < deadline:
                try:
                    self.consumer.poll(0.05)
                except ck.KafkaException as e:
                    log.warning("poll while leaving the group failed: %s", e)
        finally:
            self._forward = False
        self._subscribe()

    def close(self) -> None:
        """Leave the group (bounded by ``request_timeout_ms``). Commits still unanswered are
        forgotten: the loop has finished and commits nothing more."""
        self._closing = True
        self._commits.clear()
        clients = [c for c in (self.consumer, self._reader) if c is not None]
        _close_within(clients, self.timeout_s, "consumer")


@dataclass(eq=False)
class RdSending:
    """Messages handed to librdkafka, not yet known to be acknowledged. Its delivery reports
    land in ``acked`` and ``failed`` (``delivered`` is their callback)."""

    messages: list[Outgoing]
    acked: list = field(default_factory=list)  # delivery reports (confluent Message)
    failed: list = field(default_factory=list)  # (KafkaError, Message)
    produced: int = 0
    rejected: list[tuple[Outgoing, str]] = field(default_factory=list)  # refused by produce()
    refused_at: set[int] = field(default_factory=set)  # their indexes in messages
    unsent: list[Outgoing] = field(default_factory=list)  # not handed over (a tail)
    error: BaseException | None = None
    done_at: list[float] = field(default_factory=list)  # when the last send was answered

    def delivered(self, err, msg) -> None:
        if err is None:
            self.acked.append(msg)
        else:
            self.failed.append((err, msg))

    @property
    def answered(self) -> bool:
        return len(self.acked) + len(self.failed) >= self.produced


class RdKafkaSink:
    """Sends (``send``) and waits for every acknowledgement (``wait``; acks=all). Sends that
    may succeed on a retry come back as ``DependencyError.pending``; sends refused for good
    are returned."""

    def __init__(self, settings: KafkaSettings, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        # One wait() waits this long for its acknowledgements; what is still unacknowledged
        # is retried by the loop, after a backoff, or given up when it is stopping.
        self.flush_s = min(timeout_s, settings.request_timeout_ms / 1000)
        self.producer = _client(ck.Producer, {**producer_config(settings, timeout_s),
                                              "error_cb": self._client_error}, "producer")

    @staticmethod
    def _client_error(err) -> None:
        log.warning("kafka producer: %s", err)

    def send(self, messages: Sequence[Outgoing]) -> RdSending:
        """Hand every message to librdkafka and return without waiting (``wait`` does)."""
        out = RdSending(list(messages))
        produce, delivered = self.producer.produce, out.delivered
        i = 0
        while i < len(messages):
            m = messages[i]
            try:
                produce(m.topic, m.value, m.key, -1 if m.partition is None else m.partition,
                        delivered)
            except BufferError as e:  # its queue is full: make room, bounded like a send
                if self._room(len(self.producer)):
                    continue
                out.unsent += messages[i:]
                out.error = e
                break
            except ck.KafkaException as e:
                err = e.args[0]
                if err.code() in PERMANENT_SEND_ERRORS:
                    out.rejected.append((m, str(err)))
                    out.refused_at.add(i)
                else:  # the client is wedged or closed: retry the rest
                    out.unsent += messages[i:]
                    out.error = e
                    break
            i += 1
        out.produced = i - len(out.refused_at)
        self.producer.poll(0)  # reports already in: their callbacks, now, while cheap
        return out

    def _room(self, queued: int) -> bool:
        deadline = time.monotonic() + self.flush_s
        while time.monotonic() < deadline:
            self.producer.poll(0.05)
            if len(self.producer) < queued:
                return True
        return False

    def wait(self, sending: RdSending) -> list[tuple[Outgoing, str]]:
        """Wait for every acknowledgement of ``sending``; return the sends refused for good,
        raise DependencyError(pending=...) with those that may succeed when retried."""
        deadline = time.monotonic() + self.flush_s
        while not sending.answered:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.producer.poll(left)  # returns once it has served reports
        if sending.answered and sending.acked:
            last = sending.acked[-1]  # reports are served in the order they came back
            sending.done_at.append(last.timestamp()[1] / 1000 + (last.latency() or 0.0))
        elif sending.answered:
            sending.done_at.append(time.time())
        if sending.answered and not sending.failed and not sending.unsent:
            return list(sending.rejected)
        rejected, pending, error = self._outcomes(sending)
        if pending:
            raise DependencyError("kafka", f"{len(pending)} of {len(sending.messages)} sends not "
                                  f"acknowledged ({error})", pending=pending, rejected=rejected)
        return rejected

    @staticmethod
    def _outcomes(s: RdSending) -> tuple[list, list, object]:
        """Which sends were refused for good, and which may pass on a retry: reports carry
        the message, not our Outgoing, so they are matched by topic, key and value."""
        def ident(topic, key, value) -> tuple:
            return topic, key, value
        acked = Counter(ident(m.topic(), m.key(), m.value()) for m in s.acked)
        failed: dict[tuple, list] = {}
        for err, m in s.failed:
            failed.setdefault(ident(m.topic(), m.key(), m.value()), []).append(err)
        rejected, pending = list(s.rejected), []
        error = s.error
        cut = len(s.messages) - len(s.unsent)
        for i, m in enumerate(s.messages[:cut]):
            if i in s.refused_at:
                continue
            k = ident(m.topic, m.key, m.value)
            if acked[k] > 0:
                acked[k] -= 1
            elif failed.get(k):
                err = failed[k].pop(0)
                if err.code() in PERMANENT_SEND_ERRORS:
                    rejected.append((m, str(err)))
                else:
                    pending.append(m)
                    error = error or err
            else:  # not answered in time
                pending.append(m)
                error = error or "timed out"
        return rejected, pending + s.unsent, error

    def close(self) -> None:
        """Flush for at most 5 s, then drop what is left: librdkafka would otherwise keep the
        process until every message timed out."""
        try:
            left = self.producer.flush(min(5.0, self.flush_s))
            if left:
                log.warning("producer closed with %d messages unacknowledged", left)
                self.producer.purge()
                self.producer.poll(0)
        except Exception as e:
            log.warning("producer close failed: %r", e)


def create_topics(settings: KafkaSettings, partitions: int | None = None) -> list[str]:
    """Create the input, output and dead-letter topics; existing ones are left alone."""
    n = partitions or settings.partitions
    names = [settings.input_topic, settings.output_topic, settings.dlq_topic]
    timeout = settings.request_timeout_ms / 1000
    admin = _client(AdminClient, client_config(settings), "admin client")
    futures = admin.create_topics([NewTopic(name, n, settings.replication_factor)
                                   for name in names], request_timeout=timeout)
    created = []
    for name in names:
        try:
            futures[name].result(timeout)
            created.append(name)
        except ck.KafkaException as e:
            if e.args[0].code() != E.TOPIC_ALREADY_EXISTS:
                raise DependencyError("kafka", f"creating topic {name} failed: {e}") from e
    return created
