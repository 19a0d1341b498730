"""Tier 3: input from a producer we did not write, with every codec, read back by a consumer
we did not write. confluent-kafka (librdkafka) produces BBC sessions compressed with none,
gzip, snappy, lz4 and zstd; the worker answers with the same codec on its output; a
confluent-kafka consumer reads the predictions, which must equal the model run offline."""

from __future__ import annotations

import json
import time
import uuid

import pytest

import model
from worker.kafka_io import missing_codecs

from .streams import assert_exact, bbc_sessions, interleave
from .services_support import run_worker, settings_for

confluent_kafka = pytest.importorskip("confluent_kafka")
pytestmark = pytest.mark.services
CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def produce_with_librdkafka(bootstrap: str, topic: str, pairs, codec: str,
                            partition: int | None = None) -> None:
    p = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "compression.type": codec,
                                  "linger.ms": 20, "acks": "all"})
    for key, value in pairs:
        kw = {} if partition is None else {"partition": partition}
        p.produce(topic, key=key, value=value, **kw)
    assert p.flush(30) == 0


def read_with_librdkafka(bootstrap: str, topic: str, expected: int, partitions: int = 2,
                         timeout_s: float = 30) -> list:
    c = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                                  "enable.auto.commit": False})
    out = []
    try:  # assigned, not subscribed: no group join to wait for
        c.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                  for p in range(partitions)])
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            out.append(json.loads(m.value()))
    finally:
        c.close()
    return out


def test_every_codec_is_installed():
    assert missing_codecs() == []


@pytest.mark.parametrize("codec", CODECS)
def test_librdkafka_input_with_every_codec_is_exact(broker, names, tiny_model_dir, codec):
    clf = model.load(tiny_model_dir)
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=2)
    sessions = bbc_sessions(12, seed=50, max_tokens=150)
    pairs = interleave(sessions, seed=50)
    produce_with_librdkafka(broker.bootstrap, names["in"], pairs, codec)
    app, summary = run_worker(settings_for(broker, names, tiny_model_dir,
                                           kafka={"compression_type": codec}))
    assert summary.outcomes["ok"] == len(pairs), summary.line()
    preds = read_with_librdkafka(broker.bootstrap, names["out"], len(pairs))
    assert len(preds) == len(pairs)
    assert_exact(clf, sessions, preds)
    assert app.registry.get_sample_value("gru_undecodable_batches_total",
                                         {"topic": names["in"], "partition": "0"}) is None


@pytest.mark.parametrize("kafka_client", ["kafka-python"])  # librdkafka has every codec built in
def test_a_codec_the_client_lacks_stalls_one_partition_loudly(broker, names, tiny_model_dir,
                                                             monkeypatch, caplog):
    """What a worker without the zstd library did: no prediction, no dead letter, no metric,
    a log line every 0.1 s. Now: the other partitions go on, and the stalled one is counted
    and named with its offset, with growing backoff."""
    import kafka.codec
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=2)
    plain = interleave(bbc_sessions(4, seed=51, max_tokens=60, prefix="p"), seed=51)
    packed = interleave(bbc_sessions(4, seed=52, max_tokens=60, prefix="z"), seed=52)
    produce_with_librdkafka(broker.bootstrap, names["in"], plain, "none", partition=0)
    produce_with_librdkafka(broker.bootstrap, names["in"], packed, "zstd", partition=1)
    monkeypatch.setattr(kafka.codec, "has_zstd", lambda: False)
    with caplog.at_level("ERROR", logger="worker.loop"):
        app, summary = run_worker(settings_for(
            broker, names, tiny_model_dir, idle_exit_s=6.0,
            retry={"initial_backoff_s": 0.05, "max_backoff_s": 0.4}))
    assert summary.outcomes["ok"] == len(plain)
    stalls = app.registry.get_sample_value("gru_undecodable_batches_total",
                                           {"topic": names["in"], "partition": "1"})
    assert stalls and stalls >= 2
    assert any(f"{names['in']}[1] at offset 0" in r.getMessage() and "zstd" in r.getMessage()
               for r in caplog.records)


def produce_a_corrupt_batch(bootstrap: str, topic: str, partition: int, monkeypatch) -> None:
    """One record batch whose CRC-32C is wrong, as a disk or a network could leave it (tansu
    stores batches as they come)."""
    import kafka
    import kafka.record.default_records as records
    crc = records.calc_crc32c
    with monkeypatch.context() as m:
        m.setattr(records, "calc_crc32c", lambda data: crc(data) ^ 0xFFFF)
        p = kafka.KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        p.send(topic, key=b"c", value=b"corrupt", partition=partition).get(10)
        p.close()


def test_a_corrupt_batch_stalls_its_partition_loudly_and_the_others_go_on(
        broker, names, tiny_model_dir, monkeypatch, caplog):
    """A batch that fails its CRC: kafka-python raises where it stands; librdkafka reports it
    and goes on past it, and its adapter rewinds so that nothing is skipped without a word.
    Either way: what came before it is applied, nothing after it, the partition is counted
    and named with the batch's offset, and the other partition goes on."""
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=2)
    plain = interleave(bbc_sessions(4, seed=53, max_tokens=60, prefix="p"), seed=53)
    before = interleave(bbc_sessions(2, seed=54, max_tokens=30, prefix="b"), seed=54)
    after = interleave(bbc_sessions(2, seed=55, max_tokens=30, prefix="a"), seed=55)
    produce_with_librdkafka(broker.bootstrap, names["in"], plain, "none", partition=0)
    produce_with_librdkafka(broker.bootstrap, names["in"], before, "none", partition=1)
    produce_a_corrupt_batch(broker.bootstrap, names["in"], 1, monkeypatch)
    produce_with_librdkafka(broker.bootstrap, names["in"], after, "lz4", partition=1)
    with caplog.at_level("ERROR", logger="worker.loop"):
        app, summary = run_worker(settings_for(
            broker, names, tiny_model_dir, idle_exit_s=6.0,
            retry={"initial_backoff_s": 0.05, "max_backoff_s": 0.4}))
    assert summary.outcomes["ok"] == len(plain) + len(before), summary.line()
    stalls = app.registry.get_sample_value("gru_undecodable_batches_total",
                                           {"topic": names["in"], "partition": "1"})
    assert stalls and stalls >= 2
    assert any(f"{names['in']}[1] at offset {len(before)}" in r.getMessage() for r in caplog.records)
