"""The sizing guide checked at small scale: ``python -m worker run --processes 2`` against the
test suite's 3-node Redis Cluster. What the cluster's nodes hold per session must be within
30 % of what the guide predicts (``bench.sizing`` with the constants committed under
bench/results, a 1M-session measurement on one cluster-enabled node, applied here to the
tiny test model and these tests' key names, plus each node's fixed part, which the same
measurement gives: bytes per session fall from 10k to 1M sessions as c + F / n).

Memory per session is the prediction checked because it is robust on a shared 2-core box;
the guide's throughput figures are not checked here (see docs/capacity.md).
"""

from __future__ import annotations

import time

import pytest

import model
from bench import sizing
from devtools.launcher import TEST_GROUP_TIMEOUTS, WorkerProcess, http_get, parse_metrics
from devtools.services import two_free_ports
from devtools.streams import even_sessions, pairs

from .test_cluster import redis_cluster  # noqa: F401
from .test_e2e import broker, names, publish  # noqa: F401

pytestmark = [pytest.mark.services, pytest.mark.slow]

SESSIONS, PARTITIONS = 6000, 4


def _used_memory(cluster) -> int:
    total = 0
    for node in cluster.nodes:
        c = node.client()
        try:
            total += c.info("memory")["used_memory"]
        finally:
            c.close()
    return total


def _ok(ports: list[int]) -> float:
    total = 0.0
    for p in ports:
        try:
            total += parse_metrics(http_get(p, "/metrics")[1]).get(
                'gru_messages_total{outcome="ok"}', 0.0)
        except OSError:
            pass
    return total


def test_redis_memory_per_session_on_a_cluster_is_what_the_guide_predicts(
        broker, names, tiny_model_dir, redis_cluster):  # noqa: F811
    cfg = model.load(tiny_model_dir).model.config
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=PARTITIONS)
    sessions = even_sessions(SESSIONS, 4, 1, seed=41, prefix="cap-")  # one message: outbox 1
    publish(broker, names["in"], pairs(sessions, 41))
    before = _used_memory(redis_cluster)
    port = two_free_ports()
    sup = WorkerProcess(
        ["--processes", "2", "--bootstrap", broker.bootstrap, "--group", names["group"],
         "--kafka-client", names["client"],
         "--redis-url", redis_cluster.url, "--model-dir", str(tiny_model_dir),
         *TEST_GROUP_TIMEOUTS], port=port,
        env={"GRU_KAFKA__INPUT_TOPIC": names["in"], "GRU_KAFKA__OUTPUT_TOPIC": names["out"],
             "GRU_KAFKA__DLQ_TOPIC": names["dlq"], "GRU_REDIS__PREFIX": names["prefix"],
             "GRU_MODEL__THREADS": "1"}).start()
    try:
        deadline = time.monotonic() + 180
        while _ok([port, port + 1]) < SESSIONS and time.monotonic() < deadline:
            assert sup.alive, sup.log_tail()
            time.sleep(0.5)
        assert _ok([port, port + 1]) == SESSIONS, sup.log_tail()
        assert sup.terminate(timeout=30) == 0, sup.log_tail()
    finally:
        sup.kill()
    held = redis_cluster.keys_by_node(f"{names['prefix']}:*")
    try:
        assert sum(len(k) for k in held.values()) == SESSIONS + PARTITIONS  # states + marks
        assert sum(1 for k in held.values() if k) > 1  # spread over more than one node
        measured = (_used_memory(redis_cluster) - before) / SESSIONS

        profile = sizing.Profile(
            msgs_per_s=1, sessions=SESSIONS, hidden=cfg.state_size, layers=cfg.num_layers,
            embed=cfg.embed_dim, session_id_len=round(sum(len(s.session_id) for s in sessions)
                                                      / SESSIONS),
            cluster=True, key_prefix=names["prefix"], namespace=names["group"],
            topic=names["in"])
        predicted = sizing.redis_used_bytes(profile, sizing.Measured.load(), len(
            redis_cluster.nodes), PARTITIONS) / SESSIONS
        print(f"Redis Cluster, 2 workers, {SESSIONS} sessions: measured {measured:.0f} B/session,"
              f" the guide predicts {predicted:.0f} B ({measured / predicted - 1:+.1%})")
        assert abs(measured - predicted) <= 0.30 * predicted
    finally:
        for n in redis_cluster.nodes:  # this test's keys only, node by node
            c = n.client()
            try:
                mine = held.get(n.port, set())
                for k in mine:
                    c.delete(k)
            finally:
                c.close()
