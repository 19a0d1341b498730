"""Tier 3: what the two Kafka adapters (worker.kafka_io, worker.rdkafka_io) promise alike,
against tansu: where a key lands, a fixed partition, sends refused for good, the tail of a
partition read outside the group."""

from __future__ import annotations

import random
import time
import uuid

import pytest

from devtools.services import Tansu
from worker.app import build_kafka
from worker.config import KafkaSettings
from worker.ports import Outgoing

confluent_kafka = pytest.importorskip("confluent_kafka")
pytestmark = pytest.mark.services


def settings(broker, client: str, **kw) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=broker.bootstrap, client=client,
                         session_timeout_ms=6000, heartbeat_interval_ms=1000, **kw)


def where_keys_landed(bootstrap: str, topic: str, partitions: int) -> dict[bytes, int]:
    """Every record's key and partition, read back from the start of each partition."""
    c = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": "where",
                                  "enable.partition.eof": True, "enable.auto.commit": False})
    c.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
              for p in range(partitions)])
    out: dict[bytes, int] = {}
    ended: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while len(ended) < partitions and time.monotonic() < deadline:
            for m in c.consume(1000, 0.2):
                if m.error() is None:
                    out[m.key()] = m.partition()
                elif m.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    ended.add(m.partition())
    finally:
        c.close()
    return out


def test_the_key_hash_places_every_key_where_kafka_python_does(broker):
    """librdkafka's default partitioner (consistent_random, CRC32) would put keys elsewhere;
    the confluent sink uses murmur2_random, the Java client's hash: every key, of any length
    and bytes (session ids, the empty key), lands on the same partition with either client,
    and where Java's murmur2 formula says."""
    from kafka.partitioner.default import murmur2
    rng = random.Random(27)
    keys = {b""} | {f"session-{i}".encode() for i in range(1500)}
    keys |= {rng.randbytes(rng.randint(1, 40)) for _ in range(1500)}
    keys |= {f"doc-é-{i}-\U0001f600".encode() for i in range(200)}
    n = 7
    landed = {}
    for client in ("kafka-python", "confluent"):
        topic = f"keys-{client}-{uuid.uuid4().hex[:6]}"
        broker.create_topics([topic], partitions=n)
        _, sink = build_kafka(settings(broker, client))
        try:
            assert sink.wait(sink.send([Outgoing(topic, k, b"v") for k in sorted(keys)])) == []
        finally:
            sink.close()
        landed[client] = where_keys_landed(broker.bootstrap, topic, n)
    assert set(landed["kafka-python"]) == set(landed["confluent"]) == keys
    assert landed["confluent"] == landed["kafka-python"]
    assert all(p == (murmur2(k) & 0x7FFFFFFF) % n for k, p in landed["confluent"].items())
    assert len(set(landed["confluent"].values())) == n


def test_a_fixed_partition_is_honoured_and_sends_refused_for_good_are_returned(broker,
                                                                             kafka_client):
    """``Outgoing.partition`` is where the record goes whatever its key; a record over the
    request limit and a partition the topic lacks are refused for good (returned, so that the
    loop's dead-letter fallback runs), never retried, and do not hold up the others."""
    topic = f"fixed-{uuid.uuid4().hex[:6]}"
    broker.create_topics([topic], partitions=3)
    _, sink = build_kafka(settings(broker, kafka_client))
    big = Outgoing(topic, b"big", b"x" * 2_000_000)
    nowhere = Outgoing(topic, b"k", b"nowhere", partition=9)
    fixed = [Outgoing(topic, f"k{i}".encode(), b"fixed", partition=2) for i in range(20)]
    try:
        refused = sink.wait(sink.send([*fixed[:10], big, nowhere, *fixed[10:]]))
    finally:
        sink.close()
    assert [m for m, _ in refused] == [big, nowhere]
    assert all(why for _, why in refused)
    landed = where_keys_landed(broker.bootstrap, topic, 3)
    assert landed == {m.key: 2 for m in fixed}


def test_read_tail_reads_the_last_records_outside_the_group(broker, kafka_client):
    """The last ``count`` records of a partition (fewer when it holds fewer, none when it is
    empty), whatever the batches they came in, without joining or committing for the group."""
    topic = f"tail-{uuid.uuid4().hex[:6]}"
    group = f"g-{uuid.uuid4().hex[:6]}"
    broker.create_topics([topic], partitions=2)
    k = settings(broker, kafka_client, input_topic=topic, group_id=group)
    source, sink = build_kafka(k)
    try:
        for lo, hi in ((0, 7), (7, 30), (30, 31)):  # three sends: batches of 7, 23 and 1
            assert sink.wait(sink.send([Outgoing(topic, b"k", b"%d" % i, partition=0)
                                        for i in range(lo, hi)])) == []
        tail = source.read_tail(topic, 0, 10)
        assert [(r.partition, r.offset, r.value) for r in tail] == [
            (0, i, b"%d" % i) for i in range(21, 31)]
        assert [r.value for r in source.read_tail(topic, 0, 100)] == [b"%d" % i for i in range(31)]
        assert source.read_tail(topic, 1, 5) == []  # an empty partition
        assert source.read_tail(topic, 0, 0) == []
        assert source.committed([(topic, 0), (topic, 1)]) == {(topic, 0): None, (topic, 1): None}
    finally:
        source.close()
        sink.close()


def test_sends_not_acknowledged_in_time_come_back_pending_and_pass_later(kafka_client):
    """A hung broker: ``wait`` gives up after ``request_timeout_ms`` and returns every send as
    pending (DependencyError, nothing refused for good); sent again once the broker answers,
    they are acknowledged."""
    from worker.errors import DependencyError
    with Tansu() as own:
        topic = "pending"
        own.create_topics([topic], partitions=2)
        _, sink = build_kafka(settings(own, kafka_client, request_timeout_ms=1500))
        messages = [Outgoing(topic, f"k{i}".encode(), b"v") for i in range(50)]
        try:
            assert sink.wait(sink.send(messages[:5])) == []  # connected, metadata known
            with own.paused():
                time.sleep(0.3)
                t0 = time.monotonic()
                with pytest.raises(DependencyError) as caught:
                    sink.wait(sink.send(messages))
                assert time.monotonic() - t0 < 5
            assert sorted(m.key for m in caught.value.pending) == sorted(m.key for m in messages)
            assert caught.value.rejected == []
            assert sink.wait(sink.send(caught.value.pending)) == []
        finally:
            sink.close()
