"""What one fetch may bring into the worker (issue 26, F3). Tier 1: every consumer of ours is
built with the fetch bounds. Tier 3 (tansu): a record over the per-partition bound still comes
(the partition does not stall) and is dead-lettered by size; and the bounds count compressed
bytes, so a small zstd batch still inflates in memory, as docs/security.md says."""

from __future__ import annotations

import os
import time

import pytest
from pydantic import ValidationError

from devtools.services import unique_names
from worker.config import KafkaSettings, LimitSettings, Settings
from worker.errors import DependencyError
from worker.messages import Rejection, decode


class RecordingConsumer:
    made: list[dict] = []

    def __init__(self, **kwargs) -> None:
        RecordingConsumer.made.append(kwargs)

    def assign(self, partitions) -> None:
        from kafka.errors import KafkaError
        raise KafkaError("no broker here")


@pytest.mark.unit
def test_every_consumer_is_built_with_the_fetch_bounds(monkeypatch):
    from worker import kafka_io
    monkeypatch.setattr(kafka_io, "KafkaConsumer", RecordingConsumer)
    RecordingConsumer.made = []
    kafka_io.KafkaSource(KafkaSettings())
    [kw] = RecordingConsumer.made
    assert kw["fetch_max_bytes"] == 16 * 2**20 and kw["max_partition_fetch_bytes"] == 2**20
    assert kafka_io.fetch_bounds(KafkaSettings()) == {
        "fetch_max_wait_ms": 20, "fetch_max_bytes": 16 * 2**20,
        "max_partition_fetch_bytes": 2**20}
    source = kafka_io.KafkaSource(KafkaSettings(fetch_max_bytes=2**21,
                                                max_partition_fetch_bytes=2**20))
    assert RecordingConsumer.made[-1]["fetch_max_bytes"] == 2**21
    with pytest.raises(DependencyError):
        source.read_tail("tokens", 0, 10)  # its own consumer, outside the group: bounded too
    assert RecordingConsumer.made[-1]["fetch_max_bytes"] == 2**21
    assert RecordingConsumer.made[-1]["group_id"] is None


@pytest.mark.unit
def test_a_partition_bound_over_the_fetch_bound_is_refused():
    with pytest.raises(ValidationError, match="MAX_PARTITION_FETCH_BYTES 2097152 must be at most "
                       "GRU_KAFKA__FETCH_MAX_BYTES 1048576"):
        Settings(kafka=KafkaSettings(fetch_max_bytes=2**20, max_partition_fetch_bytes=2**21))


def _poll_all(source, want: int, timeout_s: float = 30) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        out += source.poll(100, 0)
    return out


def _source(broker, topic: str, **kw):
    from worker.kafka_io import KafkaSource
    source = KafkaSource(KafkaSettings(bootstrap_servers=broker.bootstrap, input_topic=topic,
                                       group_id=topic, session_timeout_ms=6000,
                                       heartbeat_interval_ms=1000, **kw))
    source.bind(lambda tps: None, lambda tps: None)
    return source


@pytest.mark.services
def test_a_record_over_the_partition_bound_comes_and_is_dead_lettered(broker):
    from kafka import KafkaProducer
    topic = unique_names()["in"]
    broker.create_topics([topic], partitions=1)
    big = os.urandom(3 * 2**19)  # 1.5 MiB, incompressible: over max_partition_fetch_bytes
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 * 2**20)
    p.send(topic, key=b"s1", value=big)
    p.send(topic, key=b"s1", value=b'{"session_id":"s1","seq":0,"text":"after"}')
    p.flush()
    p.close()
    source = _source(broker, topic, max_partition_fetch_bytes=2**20)
    try:
        got = _poll_all(source, 2)
    finally:
        source.close()
    assert [len(r.value) for r in got] == [len(big), 42]  # no stall behind the large batch
    rejected = decode(got[0], 100, lambda toks: [1] * len(toks), LimitSettings())
    assert isinstance(rejected, Rejection) and "over max_message_bytes=1000000" in rejected.reason


@pytest.mark.services
def test_the_fetch_bounds_count_compressed_bytes(broker):
    """The hole docs/security.md names: 32 MiB of zeros is a few KB of zstd, well within every
    fetch bound, and kafka-python inflates it whole before the worker sees its size."""
    from kafka import KafkaProducer
    topic = unique_names()["in"]
    broker.create_topics([topic], partitions=1)
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, compression_type="zstd",
                      max_request_size=64 * 2**20, batch_size=2**20)
    p.send(topic, key=b"s1", value=bytes(32 * 2**20))
    p.flush()
    p.close()
    source = _source(broker, topic, fetch_max_bytes=2**20, max_partition_fetch_bytes=2**20)
    try:
        [record] = _poll_all(source, 1)
    finally:
        source.close()
    assert len(record.value) == 32 * 2**20
    rejected = decode(record, 100, lambda toks: [1] * len(toks), LimitSettings())
    assert isinstance(rejected, Rejection)  # dead-lettered, once inflated
