"""``python -m worker run --processes 2`` against tansu and the shared Redis.

The supervisor starts two children in one consumer group (metrics on P and P+1); both must
hold a partition, every input must get its prediction, and SIGTERM to the supervisor must
stop both children and exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

import model
from devtools.launcher import TEST_GROUP_TIMEOUTS, WorkerProcess, http_get, parse_metrics
from devtools.services import two_free_ports

from .streams import assert_exact, bbc_sessions, interleave
from .services_support import publish, read_topic

pytestmark = [pytest.mark.services, pytest.mark.heavy]  # worker subprocesses


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_processes_share_the_partitions_and_stop_on_sigterm(broker, names, tiny_model_dir):
    clf = model.load(tiny_model_dir)
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=2)
    sessions = bbc_sessions(16, seed=31, max_chunk=20, max_tokens=100)
    pairs = interleave(sessions, seed=31)
    port = two_free_ports()
    log = Path(tempfile.mkdtemp()) / "supervisor.log"
    sup = WorkerProcess(
        ["--processes", "2", "--bootstrap", broker.bootstrap, "--group", names["group"],
         "--kafka-client", names["client"],
         "--model-dir", str(tiny_model_dir), *TEST_GROUP_TIMEOUTS], port=port, log_path=log,
        env={"GRU_KAFKA__INPUT_TOPIC": names["in"], "GRU_KAFKA__OUTPUT_TOPIC": names["out"],
             "GRU_KAFKA__DLQ_TOPIC": names["dlq"], "GRU_REDIS__URL": "redis://127.0.0.1:6379/0",
             "GRU_REDIS__PREFIX": names["prefix"], "GRU_MODEL__THREADS": "1"}).start()
    kids: list[int] = []
    output = sup.log_tail

    try:
        # Both children ready at once, each holding one of the two partitions.
        deadline = time.monotonic() + 45
        ready = {}
        while time.monotonic() < deadline:
            assert sup.alive, output()
            ready = {}
            for p in (port, port + 1):
                try:
                    ready[p] = http_get(p, "/readyz")
                except OSError:
                    ready[p] = (None, "")
            if all(code == 200 for code, _ in ready.values()):
                break
            time.sleep(0.3)
        assert all(code == 200 for code, _ in ready.values()), (ready, output())
        held = [json.loads(body)["assigned_partitions"] for _, body in ready.values()]
        assert held == [1, 1], held
        kids = _children(sup.pid)
        assert len(kids) == 2, kids

        publish(broker, names["in"], pairs)
        deadline = time.monotonic() + 30
        ok = 0.0
        while time.monotonic() < deadline:
            ok = sum(parse_metrics(http_get(p, "/metrics")[1])['gru_messages_total{outcome="ok"}']
                     for p in (port, port + 1))
            if ok >= len(pairs):
                break
            time.sleep(0.3)
        assert ok == len(pairs), (ok, len(pairs), output())

        preds = read_topic(broker, names["out"])
        assert sorted((p["session_id"], p["seq"]) for p in preds) == sorted(
            (json.loads(v)["session_id"], json.loads(v)["seq"]) for _, v in pairs)
        assert {p["partition"] for p in preds} == {0, 1}
        assert_exact(clf, sessions, preds)

        assert sup.terminate(timeout=30) == 0, output()
        assert [k for k in kids if _alive(k)] == [], output()
        assert "all 2 workers stopped: exit codes [0, 0]" in output()
    finally:
        sup.kill()
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
