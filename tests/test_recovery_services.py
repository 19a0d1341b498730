"""Recovery end to end (issue 24): worker subprocesses, tansu and a private redis-server.

* A session that has lived longer than the state TTL (every gap below it) is rebuilt whole
  after Redis loses everything: the replay starts at its first message, which the partition's
  checkpoint record in Kafka remembers, not at now - TTL.
* An operator's offset reset past a record batch the worker cannot decode frees the
  partition: the worker honours the skip instead of taking it for a Redis rollback and seeking
  back onto the bad batch.
"""

from __future__ import annotations

import json
import time

import pytest
from kafka import KafkaAdminClient
from kafka.structs import OffsetAndMetadata, TopicPartition

import model
from devtools.services import wait_for

from .faults_support import Cluster, offline

pytestmark = [pytest.mark.services, pytest.mark.heavy]  # worker subprocesses
confluent_kafka = pytest.importorskip("confluent_kafka")

WORDS = ["the", "match", "ended", "shares", "fell", "film", "won", "in", "a", "draw", "profits",
         "rose", "election", "minister", "phone", "software"]


def words(i: int) -> list[str]:
    return [WORDS[(i * 7 + k) % len(WORDS)] for k in range(4)]


def message(sid: str, seq: int, tokens: list[str], **extra) -> tuple[bytes, bytes]:
    return sid.encode(), json.dumps({"session_id": sid, "seq": seq, "tokens": tokens,
                                     **extra}).encode()


def send(cluster: Cluster, pairs) -> None:
    p = cluster.producer()
    try:
        for k, v in pairs:
            p.send(cluster.names["in"], key=k, value=v)
        p.flush(30)
    finally:
        p.close(5)


def last(preds, sid):
    return max((p for p in preds if p["session_id"] == sid), key=lambda p: p["seq"])


def test_a_session_older_than_the_ttl_is_rebuilt_whole_after_redis_loses_everything(
        tiny_model_dir):
    clf = model.load(tiny_model_dir)
    sessions = [f"long{i}" for i in range(12)]
    tokens: dict[str, list[str]] = {s: [] for s in sessions}
    with Cluster(tiny_model_dir, partitions=2) as cluster:
        ttl = {"GRU_STATE__TTL_SECONDS": "5"}
        w = cluster.worker("a", env=ttl).wait_ready(60)
        for round_ in range(5):  # one message per session every 2 s: each lives 8 s > TTL
            send(cluster, [message(s, round_, words(round_ + i)) for i, s in enumerate(sessions)])
            for i, s in enumerate(sessions):
                tokens[s] += words(round_ + i)
            cluster.wait_predictions({(s, round_) for s in sessions}, 30)
            time.sleep(2.0)
        w.terminate()
        cluster.redis_wipe()
        w = cluster.worker("b", env=ttl)
        send(cluster, [message(s, 5, words(5 + i)) for i, s in enumerate(sessions)])
        for i, s in enumerate(sessions):
            tokens[s] += words(5 + i)
        preds = cluster.wait_predictions({(s, 5) for s in sessions}, 60)
        wait_for(lambda: w.metrics().get('gru_state_rebuilds_total{reason="loss"}', 0) >= 1,
                 10, what="the rebuild counted")
        w.terminate()
    for s in sessions:
        got = last(preds, s)
        _, want = offline(clf, tokens[s])
        diff = max(abs(got["probs"][label] - p) for label, p in zip(clf.labels, want))
        assert got["context"] == "full" and got["tokens_seen"] == len(tokens[s]), (s, got)
        assert diff <= 1e-5, (s, diff)


def test_an_operators_reset_past_an_undecodable_batch_frees_the_partition(tiny_model_dir,
                                                                         tmp_path):
    """The worker runs without the zstandard library, so a zstd batch (librdkafka's) is one it
    cannot decode: the partition stalls, loudly. The operator stops the worker, moves the
    group past the batch with the admin API (what kafka-consumer-groups --reset-offsets
    does), and starts it again: the partition moves on."""
    shadow = tmp_path / "no-zstd"
    shadow.mkdir()
    (shadow / "zstandard.py").write_text("raise ImportError('zstandard hidden by the test')\n")
    env = {"PYTHONPATH": str(shadow), "GRU_RETRY__MAX_BACKOFF_S": "0.5"}
    with Cluster(tiny_model_dir, partitions=1) as cluster:
        topic, group = cluster.names["in"], cluster.names["group"]
        send(cluster, [message("a", 0, words(0)), message("b", 0, words(1))])
        w = cluster.worker("a", env=env).wait_ready(60)
        cluster.wait_predictions({("a", 0), ("b", 0)}, 30)
        zstd = confluent_kafka.Producer({"bootstrap.servers": cluster.kafka.bootstrap,
                                         "compression.type": "zstd", "linger.ms": 50,
                                         "partitioner": "murmur2_random"})
        for k, v in [message("a", 1, words(2)), message("c", 0, words(3))]:
            zstd.produce(topic, key=k, value=v, partition=0)
        assert zstd.flush(30) == 0
        send(cluster, [message("a", 2, words(4)), message("b", 1, words(5))])
        wait_for(lambda: w.metrics().get(
            f'gru_undecodable_batches_total{{partition="0",topic="{topic}"}}', 0) >= 2,
            30, what="the undecodable batch reported")
        assert cluster.committed() == {0: 2}
        assert w.terminate() == 0
        admin = KafkaAdminClient(bootstrap_servers=cluster.kafka.bootstrap)
        try:  # past the zstd batch (offsets 2 and 3)
            admin.alter_group_offsets(group, {TopicPartition(topic, 0): OffsetAndMetadata(4, "", -1)})
        finally:
            admin.close()
        w = cluster.worker("b", env=env)
        preds = cluster.wait_predictions({("a", 2), ("b", 1)}, 60)
        m = w.metrics()
        assert m.get('gru_state_rebuilds_total{reason="rollback"}') == 0
        assert m.get("gru_offset_skips_total") == 1
        assert w.get("/readyz")[0] == 200
        w.terminate()
    after = {p["session_id"]: p for p in preds if p["offset"] >= 4}
    assert after["a"]["context"] == "partial"  # its seq 1 was in the skipped batch
    assert after["b"]["context"] == "full" and after["b"]["tokens_seen"] == 8  # seq went on
