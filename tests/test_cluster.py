"""The worker against a real 3-node Redis Cluster (``redis+cluster://``) and tansu.

The session-scoped ``redis_cluster`` (tests/fixtures.py) starts three ``redis-server
--cluster-enabled yes`` nodes on free loopback ports, joins them with ``redis-cli --cluster
create`` (no replicas) and waits for ``cluster_state:ok`` on every node. The tests check what
a user would: the predictions, and which node and slot each key ended up in.
"""

from __future__ import annotations

import json
import uuid

import pytest
import redis
import redis.cluster

import model
from worker.codec import decode_state
from worker.state import Keys
from worker.writer import GRACE_MS

from .services_support import (RedisCluster, join_and_poll, publish, read_topic, run_worker,
                               settings_for, stepped_worker)
from .streams import bbc_sessions, interleave, last_predictions

pytestmark = pytest.mark.services


def _spread_topic(cluster: RedisCluster, names: dict, model_id: str, partitions: int) -> str:
    """An input topic name whose partitions' hash tags land on more than one node: with three
    nodes a random name puts all partitions on one node 1 time in 9, so draw until not."""
    client = cluster.client()
    try:
        for _ in range(100):
            topic = f"in-{uuid.uuid4().hex[:8]}"
            keys = Keys(names["prefix"], model_id, names["group"], cluster=True)
            nodes = {client.get_node_from_key(keys.session("x", (topic, p))).name
                     for p in range(partitions)}
            if len(nodes) > 1:
                return topic
    finally:
        client.close()
    raise AssertionError("no topic name spread over more than one node in 100 draws")


def test_end_to_end_on_a_redis_cluster(broker, names, tiny_model_dir, redis_cluster):
    clf = model.load(tiny_model_dir)
    # A group id with braces used to put the epoch key in another slot (CROSSSLOT on every
    # write): keys now start with the partition's hash tag.
    names["group"] = "team{a}-" + names["group"]
    names["in"] = _spread_topic(redis_cluster, names, clf.model_id, 3)
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=3)
    sessions = bbc_sessions(40, seed=21, max_chunk=30, max_tokens=200)
    pairs = interleave(sessions, seed=21)
    publish(broker, names["in"], pairs)
    settings = settings_for(broker, names, tiny_model_dir, batch={"max_records": 128},
                            redis={"url": redis_cluster.url})
    app, summary = run_worker(settings)
    assert type(app.worker.store.client) is redis.cluster.RedisCluster
    assert app.worker.store.ping() is True  # what /readyz asks

    preds = read_topic(broker, names["out"])
    assert len(preds) == len(pairs) == summary.outcomes["ok"]
    assert sorted((p["session_id"], p["seq"]) for p in preds) == sorted(
        (json.loads(v)["session_id"], json.loads(v)["seq"]) for _, v in pairs)
    last, partition_of = last_predictions(preds), {}
    for p in preds:
        partition_of.setdefault(p["session_id"], set()).add(p["partition"])
    assert all(len(v) == 1 for v in partition_of.values())
    assert {p for v in partition_of.values() for p in v} == {0, 1, 2}

    keys = Keys(names["prefix"], clf.model_id, names["group"], cluster=True)
    client = redis_cluster.client()
    try:
        state_key = {}
        for s in sessions:
            want = clf.classify(s.tokens)
            got = last[s.session_id]
            assert max(abs(got["probs"][l] - want[l]) for l in want) <= 1e-5
            assert got["tokens_seen"] == len(s.tokens) and got["model_id"] == clf.model_id
            tp = (names["in"], got["partition"])
            key = state_key[s.session_id] = keys.session(s.session_id, tp)
            st = decode_state(client.get(key), 1, clf.model.config.state_size, 5)
            assert st.tokens_seen == len(s.tokens) and st.last_pos == len(s.chunks) - 1
            assert 0 < client.pttl(key) <= 86_400_000 + GRACE_MS
        # One slot per partition: its mark and every state key of its sessions.
        slot_of_partition = {}
        for p in range(3):
            epoch_key = keys.mark(names["in"], p)
            assert client.hget(epoch_key, "epoch").decode().startswith("1:")
            slots = {client.cluster_keyslot(epoch_key)} | {
                client.cluster_keyslot(state_key[sid]) for sid, ps in partition_of.items() if p in ps}
            assert len(slots) == 1, (p, slots)
            slot_of_partition[p] = slots.pop()
        assert len(set(slot_of_partition.values())) == 3
    finally:
        client.close()

    # Where the keys really are: each partition's keys on one node, more than one node in use,
    # and nothing else under the prefix.
    by_node = redis_cluster.keys_by_node(f"{names['prefix']}:*")
    expected = set(state_key.values()) | {keys.mark(names["in"], p) for p in range(3)}
    assert set().union(*by_node.values()) == expected
    assert sum(len(v) for v in by_node.values()) == len(expected)
    node_of_partition = {}
    for p in range(3):
        part_keys = {keys.mark(names["in"], p)} | {
            state_key[sid] for sid, ps in partition_of.items() if p in ps}
        holders = [port for port, ks in by_node.items() if part_keys & ks]
        assert len(holders) == 1 and part_keys <= by_node[holders[0]], (p, holders)
        node_of_partition[p] = holders[0]
    assert len(set(node_of_partition.values())) > 1, node_of_partition
    assert app.registry.get_sample_value("gru_messages_total", {"outcome": "ok"}) == len(pairs)


def test_stale_epoch_worker_is_fenced_on_a_redis_cluster(broker, names, tiny_model_dir,
                                                        redis_cluster):
    """A worker whose partition epoch was superseded (a paused zombie) writes nothing."""
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=1)
    sessions = bbc_sessions(3, seed=24, max_tokens=60)
    publish(broker, names["in"], interleave(sessions, seed=24))
    settings = settings_for(broker, names, tiny_model_dir, redis={"url": redis_cluster.url})
    with stepped_worker(settings) as app:
        w = app.worker
        records = join_and_poll(w)  # joins the group
        w.process([])  # claims partition 0 before its first batch: token 1
        assert records and w.ownership.tokens[(names["in"], 0)].startswith("1:")
        # Meanwhile the partition moved to another worker, which took a newer token.
        (newer,) = w.store.claim(list(w.ownership.tokens)).values()
        assert newer.token.startswith("2:")
        w.process(records)
        w.settle()
        held = redis_cluster.keys_by_node(f"{names['prefix']}:*")
        assert set().union(*held.values()) == {w.store.keys.mark(names["in"], 0)}
        assert w.summary.outcomes["fenced"] == len(records) and w.summary.outcomes["ok"] == 0
        assert app.registry.get_sample_value("gru_fenced_partitions_total") == 1
    assert read_topic(broker, names["out"]) == []
