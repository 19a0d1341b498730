"""The capacity plan (``worker.capacity``, ``python -m worker plan``) against what Redis holds.

- Bytes per session: states of the default model's shape written through the real write path
  (``RedisStateStore.store``, the Lua script, ``worker.codec`` values) into a private
  redis-server; ``INFO used_memory`` growth per session within 3 % of the plan's.
- At small scale on a cluster: ``python -m worker run --processes 2`` against the test
  suite's 3-node Redis Cluster. What the nodes hold per session must be within 30 % of what
  the plan predicts for the tiny test model and these tests' key names, with each node's
  fixed part (bytes per session fall from 10k to 1M sessions as c + F / n).

Memory per session is the prediction checked because it is robust on a shared 2-core box;
the plan's throughput figures are not checked here (see docs/capacity.md).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from devtools.launcher import TEST_GROUP_TIMEOUTS, WorkerProcess, http_get, parse_metrics
from devtools.services import RedisServer, two_free_ports
from devtools.streams import even_sessions, pairs
from worker import capacity
from worker.codec import OutboxEntry, PosKind, SessionState, encode_state
from worker.ports import PartitionMark, StateWrite, WriteStatus
from worker.state import Keys, RedisStateStore

from .services_support import publish

pytestmark = pytest.mark.services

SESSION_ID = "call-{:08d}"  # 13 characters, as bench.capacity's measurement


def default_model_shape() -> capacity.ModelShape:
    """The default recipe's shape (model/train.py), with BBC News' five labels."""
    from model.train import TrainConfig
    t = TrainConfig()
    return capacity.ModelShape(t.num_layers, t.hidden_size, 5, t.embed_dim, t.mean_dim)


def write_states(client, keys: Keys, shape: capacity.ModelShape, n: int, dtype: str,
                 chunk: int = 2000) -> None:
    """``n`` states as the worker writes them after a session's first message: random h, one
    outbox entry, through the fenced write script, ``chunk`` writes per call."""
    store = RedisStateStore(client, keys)
    tp = ("tokens", 0)
    token = store.claim([tp])[tp].token
    rng = np.random.default_rng(0)
    for at in range(0, n, chunk):
        ids = range(at, min(n, at + chunk))
        hs = rng.standard_normal((len(ids), shape.layers, shape.state_size), dtype=np.float32)
        probs = rng.dirichlet(np.ones(shape.labels), len(ids))
        writes = []
        for i, h, p in zip(ids, hs, probs):
            box = (OutboxEntry(0, 0, 4, False, int(rng.integers(2**63)), tuple(map(float, p))),)
            value = encode_state(SessionState(h, 0, PosKind.SEQ, 4, 1, outbox=box),
                                 shape.labels, dtype)
            writes.append(StateWrite(SESSION_ID.format(i), tp, None, 0, value, 86_400_000))
        res = store.store({tp: PartitionMark(token, at + len(ids))}, writes)
        assert all(s == WriteStatus.OK for s in res.statuses)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bytes_per_session_through_the_write_path_are_what_the_plan_says(dtype):
    n = 20_000
    shape = default_model_shape()
    keys = Keys("gru", "0123456789abcdef", "gru-worker")
    with RedisServer() as srv:
        client = srv.client()
        try:
            base = client.info("memory")["used_memory"]
            write_states(client, keys, shape, n, dtype)
            assert client.dbsize() == n + 1  # the states and the partition's mark
            measured = (client.info("memory")["used_memory"] - base) / n
            sample = client.get(keys.session(SESSION_ID.format(n - 1)))
        finally:
            client.close()
    profile = capacity.Profile(msgs_per_s=1, sessions=n, model=shape, dtype=dtype,
                               cluster=False, session_id_len=len(SESSION_ID.format(0)))
    pl = capacity.plan(profile)
    assert pl.value_bytes == len(sample)
    predicted = capacity.redis_used_bytes(profile, capacity.REFERENCE, 1) / n
    print(f"{n} sessions, state {shape.layers} x {shape.state_size} {dtype}: measured "
          f"{measured:.1f} B/session, the plan {predicted:.1f} B ({pl.bytes_per_session:.0f} B "
          f"+ the fixed part over {n}; {measured / predicted - 1:+.1%})")
    assert abs(measured - predicted) <= 0.03 * predicted


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


@pytest.mark.heavy
@pytest.mark.slow
def test_redis_memory_per_session_on_a_cluster_is_what_the_plan_predicts(
        broker, names, tiny_model_dir, redis_cluster):
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

        profile = capacity.Profile(
            msgs_per_s=1, sessions=SESSIONS,
            model=capacity.ModelShape.from_artifact(tiny_model_dir),
            session_id_len=round(sum(len(s.session_id) for s in sessions) / SESSIONS),
            cluster=True, key_prefix=names["prefix"], namespace=names["group"],
            topic=names["in"])
        predicted = capacity.redis_used_bytes(profile, capacity.REFERENCE, len(
            redis_cluster.nodes), PARTITIONS) / SESSIONS
        print(f"Redis Cluster, 2 workers, {SESSIONS} sessions: measured {measured:.0f} B/session,"
              f" the plan predicts {predicted:.0f} B ({measured / predicted - 1:+.1%})")
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
