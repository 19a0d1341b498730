"""The sink's partitioner caches key hashes; it must place every key exactly where kafka-python's
(and the Java client's) default partitioner does, or a session's predictions would move."""

import random

import pytest
from kafka.partitioner.default import DefaultPartitioner

from worker.kafka_io import KeyHashPartitioner

pytestmark = pytest.mark.unit


class Cluster:
    """The part of kafka-python's ClusterMetadata a partitioner reads."""

    def __init__(self, partitions: dict[str, int]) -> None:
        self.partitions = partitions

    def topics(self):
        return set(self.partitions)

    def partitions_for_topic(self, topic):
        n = self.partitions.get(topic)
        return None if n is None else set(range(n))

    def available_partitions_for_topic(self, topic):
        return self.partitions_for_topic(topic)


def test_same_partition_as_the_default_for_every_key_and_count():
    rng = random.Random(7)
    keys = [f"session-{i}".encode() for i in range(300)] + \
        [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    ours, default = KeyHashPartitioner(), DefaultPartitioner()
    for n in (1, 3, 4, 12):
        cluster = Cluster({"predictions": n})
        for _ in range(2):  # the second pass is served from the cache
            for k in keys:
                assert ours.partition("predictions", None, k, None, None, cluster) == \
                    default.partition("predictions", None, k, None, None, cluster)


def test_a_topic_that_grows_is_followed_and_the_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(KeyHashPartitioner, "MAX_KEYS", 10)
    ours, default = KeyHashPartitioner(), DefaultPartitioner()
    cluster = Cluster({"t": 2})
    keys = [f"k{i}".encode() for i in range(25)]
    for n in (2, 5):
        cluster.partitions["t"] = n
        for k in keys:
            assert ours.partition("t", None, k, None, None, cluster) == \
                default.partition("t", None, k, None, None, cluster)
    assert len(ours._hashes) <= 10


def test_unkeyed_records_and_unknown_topics_take_the_default_path():
    ours, cluster = KeyHashPartitioner(), Cluster({"t": 3})
    assert ours.partition("t", None, None, None, None, cluster) in {0, 1, 2}
    with pytest.raises(ValueError):
        ours.partition("missing", None, b"k", None, None, cluster)
