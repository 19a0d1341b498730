"""What the tier-3 tests share besides fixtures (those are in tests/fixtures.py): the worker's
settings for the test broker and the shared Redis, running a worker in this process, writing
and reading topics, and a Redis Cluster on loopback. tests/workers.py is the tier-2
counterpart, on in-memory fakes."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time

import redis
import redis.cluster
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from devtools.services import RedisServer, ServiceError, free_port, wait_for
from worker.app import build_worker
from worker.config import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"  # the shared Redis the tier-3 tests write under a prefix


def settings_for(broker, names, model_dir, **extra) -> Settings:
    """The worker's settings for ``names``' topics, group and prefix on ``broker`` and the
    shared Redis; ``extra`` sections are merged into the defaults."""
    s = {"kafka": {"bootstrap_servers": broker.bootstrap, "input_topic": names["in"],
                   "output_topic": names["out"], "dlq_topic": names["dlq"],
                   "group_id": names["group"], "session_timeout_ms": 6000,
                   "heartbeat_interval_ms": 1000, "client": names["client"]},
         "redis": {"url": REDIS_URL, "prefix": names["prefix"]},
         "model": {"dir": model_dir, "threads": 1},
         "metrics": {"host": "127.0.0.1", "port": 0},
         "idle_exit_s": 4.0}
    for k, v in extra.items():
        s[k] = {**s.get(k, {}), **v} if isinstance(v, dict) else v
    return Settings(**s)


def publish(broker, topic, pairs):
    """Produce (key, value) pairs to ``topic`` and wait for every acknowledgement."""
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
    for key, value in pairs:
        p.send(topic, key=key, value=value)
    p.flush()
    p.close()


def read_topic(broker, topic) -> list[dict]:
    """Every message of ``topic``, from the start, as JSON."""
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                      fetch_max_wait_ms=50)
    parts = c.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in parts]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out, idle = [], 0
    while idle < 3:
        polled = c.poll(timeout_ms=300)
        idle = 0 if polled else idle + 1
        out += [json.loads(r.value) for recs in polled.values() for r in recs]
    c.close()
    return out


def run_worker(settings):
    """Build the worker as ``python -m worker run`` does and run it until it idles out."""
    app = build_worker(settings, CollectorRegistry())
    try:
        summary = app.worker.run()
    finally:
        app.close()
    return app, summary


@contextlib.contextmanager
def stepped_worker(settings):
    """A worker built but not run, for tests that drive poll/process by hand; closes all."""
    app = build_worker(settings, CollectorRegistry())
    try:
        yield app
    finally:
        app.worker.source.close()
        app.worker.sink.close()
        app.close()


def join_and_poll(worker, timeout_s: float = 30) -> list:
    """Poll until the worker has joined its group and holds records (or time runs out)."""
    records: list = []
    deadline = time.monotonic() + timeout_s
    while not records and time.monotonic() < deadline:
        records = worker.source.poll(500, 200)
    return records


class RedisCluster:
    """N cluster-enabled redis-server nodes on loopback, joined into one cluster (no replicas)."""

    def __init__(self, nodes: int = 3) -> None:
        if shutil.which("redis-cli") is None:
            raise ServiceError("redis-cli not found on PATH")
        self.nodes: list[RedisServer] = []
        self.count = nodes

    def start(self) -> "RedisCluster":
        try:
            for _ in range(self.count):
                port = free_port()
                # The bus port defaults to port + 10000, which may be taken or above 65535.
                node = RedisServer(port=port, extra_args=[
                    "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", "2000", "--cluster-port", str(free_port())])
                self.nodes.append(node)
                node.start()
            out = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise ServiceError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
            wait_for(self._ok, 30.0, interval=0.1, what="cluster_state:ok on every node")
        except BaseException:
            self.close()
            raise
        return self

    def _ok(self) -> bool:
        for n in self.nodes:
            c = n.client(socket_timeout=1)
            try:
                info = c.cluster("info")
            finally:
                c.close()
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return False
        return True

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def keys_by_node(self, pattern: str) -> dict[int, set[str]]:
        """The keys each node actually holds (SCAN on each node directly, no redirects)."""
        out = {}
        for n in self.nodes:
            c = n.client()
            try:
                out[n.port] = {k.decode() for k in c.scan_iter(pattern, count=1000)}
            finally:
                c.close()
        return out

    def close(self) -> None:
        for n in self.nodes:
            n.close()  # SIGTERM the process group, then remove its temp dir
        self.nodes = []
