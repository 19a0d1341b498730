"""Tier 1: the /metrics, /healthz and /readyz server, and what a client that reaches its port
cannot do to it: idle, half-open and slow connections hold no thread and are closed, and the
threads that answer are few and bounded (issue 26, F6)."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from worker.metrics import HealthServer

pytestmark = pytest.mark.unit


def os_threads() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))


def get(server: HealthServer, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture
def registry():
    r = CollectorRegistry()
    Counter("gru_test_total", "a counter", registry=r).inc(3)
    return r


@pytest.fixture
def serve(registry):
    servers = []

    def start(ready=lambda: (True, {"partitions": 2}), **kw) -> HealthServer:
        servers.append(HealthServer(registry, "127.0.0.1", 0, ready, **kw).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def test_metrics_health_and_readiness_answer(serve):
    s = serve()
    assert get(s, "/healthz") == (200, b'{"alive": true}')
    status, body = get(s, "/metrics")
    assert status == 200 and b"gru_test_total 3.0" in body
    assert get(s, "/readyz?verbose=1") == (200, b'{"ready": true, "partitions": 2}')
    assert get(s, "/nothing")[0] == 404
    req = urllib.request.Request(f"http://127.0.0.1:{s.port}/healthz", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=2)
    assert e.value.code == 501


def test_a_failing_readiness_check_still_answers(serve):
    def broken():
        raise RuntimeError("redis went away")
    status, body = get(serve(ready=broken), "/readyz")
    assert status == 503 and b"redis went away" in body


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_thousand_idle_connections_hold_no_thread_and_are_closed(serve):
    s = serve(max_connections=64, timeout_s=1.0)
    before = os_threads()
    conns = []
    try:
        for _ in range(1000):
            conns.append(socket.create_connection(("127.0.0.1", s.port), timeout=2))
        time.sleep(0.3)  # let the server accept them all
        during = os_threads()
        t0 = time.monotonic()
        assert get(s, "/healthz", timeout=1.0) == (200, b'{"alive": true}')
        answered = time.monotonic() - t0
        print(f"threads {before} -> {during} with 1000 idle connections; GET in "
              f"{answered * 1000:.1f} ms")
        assert during <= before + 1 and answered < 1.0
        for c in conns:
            c.setblocking(False)
        open_now = sum(not _closed_by_server(c) for c in conns)
        assert open_now <= 64, open_now  # the oldest were closed to make room
        time.sleep(1.6)  # past timeout_s: the rest are closed as idle
        assert sum(not _closed_by_server(c) for c in conns) == 0
    finally:
        for c in conns:
            c.close()


def test_a_slow_head_is_cut_off_at_the_deadline(serve):
    s = serve(timeout_s=1.0)
    c = socket.create_connection(("127.0.0.1", s.port), timeout=3)
    t0 = time.monotonic()
    try:
        for part in (b"GET /hea", b"lthz HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: 1\r\n"):
            c.sendall(part)  # a byte now and then keeps no connection alive past its deadline
            time.sleep(0.4)
        assert c.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        c.close()
    assert time.monotonic() - t0 < 2.5


def test_answering_threads_are_bounded_and_excess_requests_refused(serve):
    release = threading.Event()

    def slow_ready():
        release.wait(5)
        return True, {}

    s = serve(ready=slow_ready, threads=2, timeout_s=5.0)
    before = os_threads()
    results: list = []

    def ask():
        try:
            results.append(get(s, "/readyz", timeout=6)[0])
        except (urllib.error.URLError, ConnectionError, OSError):
            results.append("refused")

    askers = [threading.Thread(target=ask) for _ in range(6)]
    for a in askers:
        a.start()
        time.sleep(0.1)
    # 2 answering (blocked in ready), 2 waiting for a thread, 2 refused; the server added
    # no thread (the 6 are this test's clients).
    assert os_threads() <= before + 6
    assert sorted(results, key=str) == ["refused", "refused"]
    release.set()
    for a in askers:
        a.join(10)
    assert sorted(results, key=str) == [200, 200, 200, 200, "refused", "refused"]
