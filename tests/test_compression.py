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
from .test_e2e import broker, names, run_worker, settings_for  # noqa: F401

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
