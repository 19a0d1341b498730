"""Support for tests/test_faults.py: real worker subprocesses, a paced producer, the oracle.

Everything that starts a process registers it with a ``Cluster``; ``Cluster.close()`` (run by
the test fixture, also on failure) kills every worker, then redis-server and tansu.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

import model
from devtools.launcher import TEST_GROUP_TIMEOUTS, WorkerProcess
from devtools.services import RedisServer, Tansu, unique_names, wait_for
from worker.codec import decode_state
from worker.state import Keys

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


class WorkerProc(WorkerProcess):
    """A worker of a ``Cluster``: its topics, group, prefix and services, a log file in the
    cluster's directory; killed by the cluster's ``close()``. ``crash_after_write=N`` runs it
    through ``devtools.faults`` (SIGKILL right after its Nth landed write)."""

    def __init__(self, cluster: "Cluster", name: str, env: dict[str, str] | None = None,
                 args: list[str] | None = None, crash_after_write: int | None = None,
                 crash_at_load: int | None = None) -> None:
        c = cluster
        super().__init__(
            ["--bootstrap", c.kafka.bootstrap, "--group", c.names["group"],
             "--kafka-client", c.client,
             "--input-topic", c.names["in"], "--output-topic", c.names["out"],
             "--redis-url", c.redis.url, "--model-dir", str(c.model_dir), *TEST_GROUP_TIMEOUTS,
             *(args or [])],
            env={"GRU_MODEL__THREADS": "1", "GRU_KAFKA__DLQ_TOPIC": c.names["dlq"],
                 "GRU_REDIS__PREFIX": c.names["prefix"], "GRU_RETRY__MAX_BACKOFF_S": "1.0",
                 **(env or {})},
            log_path=c.dir / f"{name}.log",
            **({"module": "devtools.faults",
                "command": ["--crash-after-write", str(crash_after_write), "run"]}
               if crash_after_write else
               {"module": "devtools.faults", "command": ["--crash-at-load", str(crash_at_load), "run"]}
               if crash_at_load else {}))
        self.cluster, self.name = cluster, name

    def start(self) -> "WorkerProc":
        super().start()
        if self not in self.cluster.workers:
            self.cluster.workers.append(self)
        return self

    def rss_kb(self) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1))


class Cluster:
    """tansu + a private redis-server (AOF, appendfsync always) + worker subprocesses, whose
    Kafka client is ``client`` (``kafka.client``). The test's own reads and writes use
    kafka-python whatever the workers use."""

    def __init__(self, model_dir: Path, partitions: int = 4, client: str = "kafka-python") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gru-faults-"))
        self.model_dir = model_dir
        self.client = client
        self.names = unique_names()
        self.workers: list[WorkerProc] = []
        self.kafka = Tansu()
        self.redis = RedisServer(appendonly=True)
        self.partitions = partitions
        self.feeders: list[Feeder] = []

    def __enter__(self) -> "Cluster":
        try:
            self.kafka.start()
            self.redis.start()
            self.kafka.create_topics([self.names["in"], self.names["out"], self.names["dlq"]],
                                     partitions=self.partitions)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self.feeders:
            f.stop()
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.kill()
        self.redis.close()
        self.kafka.close()
        if not os.environ.get("GRU_FAULTS_KEEP_LOGS"):  # failures already show the log tails
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- what happens to Redis in production ---------------------------------------------

    def redis_snapshot(self) -> Path:
        """SAVE an RDB snapshot and keep a copy (a backup, or what a lagging replica holds)."""
        client = self.redis.client()
        try:
            client.save()
        finally:
            client.close()
        path = self.dir / f"snapshot-{len(list(self.dir.glob('snapshot-*')))}.rdb"
        shutil.copy(self.redis.dir / "dump.rdb", path)
        return path

    def redis_restore(self, snapshot: Path) -> None:
        """Kill Redis and bring it back from ``snapshot``: every later write is gone (a
        restore from backup, a failover to a replica that lagged), the offsets committed to
        Kafka meanwhile are not."""
        self.redis.kill()
        shutil.rmtree(self.redis.dir / "appendonlydir", ignore_errors=True)
        shutil.copy(snapshot, self.redis.dir / "dump.rdb")
        self.redis.appendonly = False  # with AOF on and no AOF file, Redis ignores the RDB
        self.redis.start()
        client = self.redis.client()
        try:
            client.config_set("appendonly", "yes")
        finally:
            client.close()
        self.redis.appendonly = True

    def redis_wipe(self) -> None:
        """Kill Redis and start it empty (a restart without persistence, a lost volume)."""
        self.redis.kill()
        shutil.rmtree(self.redis.dir / "appendonlydir", ignore_errors=True)
        (self.redis.dir / "dump.rdb").unlink(missing_ok=True)
        self.redis.start()

    def recorded_offsets(self, model_id: str) -> dict[int, int]:
        """Each input partition's next_offset as Redis records it."""
        client = self.redis.client()
        try:
            keys = self.keys(model_id)
            out = {}
            for p in range(self.partitions):
                v = client.hget(keys.mark(self.names["in"], p), "next_offset")
                if v is not None:
                    out[p] = int(v)
            return out
        finally:
            client.close()

    def worker(self, name: str = "w", **kw) -> WorkerProc:
        return WorkerProc(self, name, **kw).start()

    def keys(self, model_id: str) -> Keys:
        return Keys(self.names["prefix"], model_id, self.names["group"])

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.dir.glob("*.log")))

    # --- Kafka I/O --------------------------------------------------------------------------

    def producer(self, **kw) -> KafkaProducer:
        opts = {"acks": "all", "linger_ms": 5, "enable_idempotence": False, **kw}
        return KafkaProducer(bootstrap_servers=self.kafka.bootstrap, **opts)

    def feed(self, pairs: list[tuple[bytes | None, bytes]], seconds: float, **kw) -> "Feeder":
        f = Feeder(self, pairs, seconds, **kw)
        self.feeders.append(f)
        f.start()
        return f

    def read(self, topic: str, idle_polls: int = 3) -> list:
        """Every record of ``topic`` (all partitions, from the start), as ConsumerRecords."""
        c = KafkaConsumer(bootstrap_servers=self.kafka.bootstrap, enable_auto_commit=False,
                          fetch_max_wait_ms=50, max_partition_fetch_bytes=8 << 20,
                          fetch_max_bytes=64 << 20)
        try:
            tps = [TopicPartition(topic, p) for p in range(self.partitions)]
            c.assign(tps)
            c.seek_to_beginning(*tps)
            out, idle = [], 0
            while idle < idle_polls:
                polled = c.poll(timeout_ms=300)
                idle = 0 if polled else idle + 1
                out += [r for recs in polled.values() for r in recs]
            return out
        finally:
            c.close()

    def committed(self) -> dict[int, int]:
        """The group's committed offset per input partition (without joining the group)."""
        c = KafkaConsumer(bootstrap_servers=self.kafka.bootstrap, group_id=self.names["group"],
                          enable_auto_commit=False)
        try:
            out = {}
            for p in range(self.partitions):
                off = c.committed(TopicPartition(self.names["in"], p))
                if off is not None:
                    out[p] = off
            return out
        finally:
            c.close()

    def predictions(self) -> list[dict]:
        return [json.loads(r.value) for r in self.read(self.names["out"])]

    def dead_letters(self) -> list[dict]:
        return [json.loads(r.value) for r in self.read(self.names["dlq"])]

    def wait_predictions(self, expected: set[tuple[str, int]], timeout: float) -> list[dict]:
        """Read the output topic until every expected (session, seq) has a prediction."""
        c = KafkaConsumer(bootstrap_servers=self.kafka.bootstrap, enable_auto_commit=False,
                          fetch_max_wait_ms=100)
        try:
            tps = [TopicPartition(self.names["out"], p) for p in range(self.partitions)]
            c.assign(tps)
            c.seek_to_beginning(*tps)
            preds: list[dict] = []
            seen: set[tuple[str, int]] = set()
            deadline = time.monotonic() + timeout
            while not expected <= seen:
                if time.monotonic() > deadline:
                    missing = sorted(expected - seen)
                    raise AssertionError(f"{len(missing)} of {len(expected)} (session, seq) have no "
                                         f"prediction after {timeout}s, e.g. {missing[:5]}\n"
                                         f"{self.logs()}")
                for recs in c.poll(timeout_ms=300).values():
                    for r in recs:
                        p = json.loads(r.value)
                        preds.append(p)
                        seen.add((p["session_id"], p["seq"]))
            return preds
        finally:
            c.close()


class Feeder(threading.Thread):
    """Produces ``pairs`` in order, paced evenly over ``seconds``; remembers what was acked."""

    def __init__(self, cluster: Cluster, pairs, seconds: float, **producer_kw) -> None:
        super().__init__(daemon=True, name="feeder")
        self.cluster, self.pairs, self.seconds = cluster, pairs, seconds
        self.producer_kw = producer_kw
        self.sent = 0
        self.futures: list = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            p = self.cluster.producer(**self.producer_kw)
            t0 = time.monotonic()
            gap = self.seconds / max(1, len(self.pairs))
            for i, (k, v) in enumerate(self.pairs):
                if self._halt.is_set():
                    break
                delay = t0 + i * gap - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.futures.append(p.send(self.cluster.names["in"], key=k, value=v))
                self.sent = i + 1
            p.flush(timeout=120)
            p.close(timeout=10)
        except BaseException as e:  # surfaced by join()
            self.error = e

    def positions(self) -> list[tuple[int, int]]:
        """(partition, offset) of every pair, in order (after finish())."""
        return [(m.partition, m.offset) for m in (f.get(timeout=60) for f in self.futures)]

    def progress(self) -> float:
        return self.sent / max(1, len(self.pairs))

    def wait_progress(self, fraction: float, timeout: float = 120) -> None:
        wait_for(lambda: self.progress() >= fraction or not self.is_alive(), timeout, 0.02,
                 f"feeder at {fraction:.0%}")

    def stop(self) -> None:
        self._halt.set()

    def finish(self, timeout: float = 180) -> None:
        self.join(timeout)
        assert not self.is_alive(), "feeder did not finish"
        if self.error:
            raise self.error


# --- the oracle --------------------------------------------------------------------------

@dataclass
class Expected:
    """What was produced for one session: its full token list and the seqs sent."""

    tokens: list[str] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)
    last_seq: int = -1
    ended: bool = False


def expected_from(pairs) -> dict[str, Expected]:
    """Replay the produced good messages as a user would define them (tokens in seq order)."""
    out: dict[str, Expected] = {}
    for _, v in pairs:
        body = json.loads(v)
        e = out.setdefault(body["session_id"], Expected())
        if body["seq"] in e.seqs:
            continue
        e.seqs.add(body["seq"])
        e.tokens += body["tokens"]
        e.last_seq = max(e.last_seq, body["seq"])
        e.ended = e.ended or bool(body.get("end"))
    return out


@dataclass
class OracleReport:
    sessions: int
    predictions: int
    duplicates_seen: int  # predictions beyond one per (session, seq)
    max_diff: float


def offline(clf, tokens: list[str]) -> tuple[np.ndarray, list[float]]:
    """(h (L, H), probs (C,)) after the whole token list, from a zero state."""
    ids = clf.encode(tokens)
    with torch.inference_mode():
        h, probs = clf.model.step(clf.model.initial_state(1), torch.tensor([ids]),
                                  torch.tensor([len(ids)]))
    return h[:, 0].float().numpy(), probs[0].float().tolist()


def check_oracle(cluster: Cluster, model_dir: Path, expected: dict[str, Expected],
                 preds: list[dict]) -> OracleReport:
    """The suite's oracle, on what users see: Redis states and the last predictions equal the
    model run offline over each session's full token list; every (session, seq) produced has
    at least one prediction."""
    clf = model.load(model_dir)
    keys = cluster.keys(clf.model_id)
    cfg = clf.model.config
    by_key: dict[tuple[str, int], list[dict]] = {}
    for p in preds:
        by_key.setdefault((p["session_id"], p["seq"]), []).append(p)
    want = {(sid, s) for sid, e in expected.items() for s in e.seqs}
    missing = sorted(want - set(by_key))
    assert not missing, f"{len(missing)} (session, seq) have no prediction, e.g. {missing[:5]}"
    client = cluster.redis.client()
    worst = 0.0
    try:
        for sid, e in expected.items():
            h_want, p_want = offline(clf, e.tokens)
            last = by_key[(sid, e.last_seq)]
            for p in last:  # every copy of the last prediction (replays included) is exact
                got = [p["probs"][l] for l in clf.labels]
                d = max(abs(a - b) for a, b in zip(got, p_want))
                worst = max(worst, d)
                assert d <= TOL, f"{sid}: last prediction differs from offline by {d}"
                assert p["tokens_seen"] == len(e.tokens), (sid, p["tokens_seen"], len(e.tokens))
                assert p["final"] == e.ended
            raw = client.get(keys.session(sid))
            assert raw is not None, f"{sid}: no state in Redis"
            st = decode_state(raw, cfg.num_layers, cfg.state_size, cfg.num_labels)
            assert st.last_pos == e.last_seq, (sid, st.last_pos, e.last_seq)
            assert st.tokens_seen == len(e.tokens), (sid, st.tokens_seen, len(e.tokens))
            assert st.messages == len(e.seqs), (sid, st.messages, len(e.seqs))
            assert st.ended == e.ended
            if not e.ended:
                d = float(np.abs(st.h - h_want).max())
                worst = max(worst, d)
                assert d <= TOL, f"{sid}: state h differs from offline by {d}"
    finally:
        client.close()
    return OracleReport(len(expected), len(preds), len(preds) - len(by_key), worst)

