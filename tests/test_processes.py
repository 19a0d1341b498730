"""``python -m worker run --processes 2`` against tansu and the shared Redis.

The supervisor starts two children in one consumer group (metrics on P and P+1); both must
hold a partition, every input must get its prediction, and SIGTERM to the supervisor must
stop both children and exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

import model
from worker.local_services import free_port

from .streams import assert_exact, bbc_sessions, interleave
from .test_e2e import broker, names, publish, read_topic  # noqa: F401

pytestmark = pytest.mark.services


def _two_free_ports() -> int:
    """A port P with P and P+1 both free a moment ago."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two adjacent free ports")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


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
    port = _two_free_ports()
    env = {**os.environ, "GRU_KAFKA__INPUT_TOPIC": names["in"], "GRU_KAFKA__OUTPUT_TOPIC": names["out"],
           "GRU_KAFKA__DLQ_TOPIC": names["dlq"], "GRU_REDIS__URL": "redis://127.0.0.1:6379/0",
           "GRU_REDIS__PREFIX": names["prefix"], "GRU_MODEL__THREADS": "1"}
    log = tempfile.TemporaryFile(mode="w+")
    sup = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--processes", "2", "--bootstrap", broker.bootstrap,
         "--group", names["group"], "--model-dir", str(tiny_model_dir), "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1", "--session-timeout-ms", "6000", "--heartbeat-interval-ms", "1000"],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    kids: list[int] = []

    def output() -> str:
        log.seek(0)
        return log.read()[-6000:]

    try:
        # Both children ready at once, each holding one of the two partitions.
        deadline = time.monotonic() + 45
        ready = {}
        while time.monotonic() < deadline:
            assert sup.poll() is None, output()
            ready = {}
            for p in (port, port + 1):
                try:
                    ready[p] = _get(p, "/readyz")
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
            ok = 0.0
            for p in (port, port + 1):
                for line in _get(p, "/metrics")[1].splitlines():
                    if line.startswith('gru_messages_total{outcome="ok"}'):
                        ok += float(line.split()[-1])
            if ok >= len(pairs):
                break
            time.sleep(0.3)
        assert ok == len(pairs), (ok, len(pairs), output())

        preds = read_topic(broker, names["out"])
        assert sorted((p["session_id"], p["seq"]) for p in preds) == sorted(
            (json.loads(v)["session_id"], json.loads(v)["seq"]) for _, v in pairs)
        assert {p["partition"] for p in preds} == {0, 1}
        assert_exact(clf, sessions, preds)

        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0, output()
        assert [k for k in kids if _alive(k)] == [], output()
        assert "all 2 workers stopped: exit codes [0, 0]" in output()
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        log.close()
