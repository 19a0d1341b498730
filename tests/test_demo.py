"""The demo, bounded, as CI runs it: it must finish and print its summary."""

import re
import subprocess
import sys

import pytest



def _tansu_pids() -> set[str]:
    out = subprocess.run(["pgrep", "-f", "tansu.*broker"], capture_output=True, text=True).stdout
    return set(out.split())


def _orphaned(pids: set[str]) -> set[str]:
    """Those of ``pids`` left without their parent (re-parented to init): what a demo that
    did not clean up leaves. A broker whose parent lives belongs to someone else's run."""
    left = set()
    for pid in pids:
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone
        if ppid == 1:
            left.add(pid)
    return left


@pytest.mark.services
@pytest.mark.heavy
def test_bounded_demo_runs_to_completion_and_leaves_nothing_behind(tiny_model_dir, kafka_client):
    before = _tansu_pids()
    proc = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--model-dir", str(tiny_model_dir),
         "--sessions", "8", "--max-tokens", "120", "--max-seconds", "60", "--rate", "300",
         "--metrics-port", "0", "--kafka-client", kafka_client],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = re.search(r"summary: (\d+)/(\d+) sessions finished, final accuracy ([0-9.]+) .*"
                  r"latency p50 ([0-9.]+) ms, p99 ([0-9.]+) ms", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert m.group(1) == m.group(2) == "8"
    assert 0.0 <= float(m.group(3)) <= 1.0
    assert 0 < float(m.group(4)) <= float(m.group(5))
    split = re.search(r"produce to its send p50 ([0-9.-]+) ms, p99 ([0-9.-]+) ms; its send to "
                      r"received p50 ([0-9.-]+) ms, p99 ([0-9.-]+) ms", proc.stdout)
    assert split, proc.stdout[-2000:]
    worker_side, reader_side = float(split.group(1)), float(split.group(3))
    assert 0 <= worker_side <= float(m.group(5)) and 0 <= reader_side <= float(m.group(5))
    assert "metrics: http://127.0.0.1:" in proc.stdout
    # bench/demo.py reads the same summary (the demo's figures in docs/benchmarks.md)
    from bench.demo import parse
    assert parse(proc.stdout)["p50_ms"] == float(m.group(4))
    # The model-quality panels' series, read from the worker's /metrics.
    assert re.search(r"model quality \w+: final labels .*\(prior 0\.\d\d\)", proc.stdout), proc.stdout
    assert re.search(r"model quality \w+: mean confidence 0\.\d+, mean tokens until the final "
                     r"label was first reached \d", proc.stdout), proc.stdout
    assert "state store:" in proc.stderr and "Kafka: a local tansu broker" in proc.stderr
    assert f"the worker's client: {kafka_client}" in proc.stderr
    assert not _orphaned(_tansu_pids() - before)


@pytest.mark.unit
def test_follow_waits_5_ms_per_fetch_unless_told(monkeypatch):
    """``worker.client.follow`` asks for a short fetch wait (the demo's latency hop), and a
    caller's own consumer settings override it instead of clashing with it."""
    import kafka

    from worker.client import follow
    made = []

    class Consumer:
        def __init__(self, **options):
            made.append(options)

        def partitions_for_topic(self, topic):
            return None

        def close(self):
            pass

    monkeypatch.setattr(kafka, "KafkaConsumer", Consumer)
    list(follow("p", {"bootstrap_servers": "x:1"}, timeout_s=0.01))
    list(follow("p", {"bootstrap_servers": "x:1", "fetch_max_wait_ms": 50}, timeout_s=0.01))
    assert [m["fetch_max_wait_ms"] for m in made] == [5, 50]
    assert all(m["enable_auto_commit"] is False for m in made)


@pytest.mark.unit
def test_follow_records_carry_each_records_timestamp(monkeypatch):
    """``follow_records`` yields each prediction with its record's timestamp in seconds (the
    worker's send), from every partition; ``follow`` the predictions alone."""
    import json as _json
    from types import SimpleNamespace

    import kafka

    from worker.client import Followed, follow, follow_records

    class Consumer:
        def __init__(self, **options):
            self.batches = [{("p", 0): [SimpleNamespace(value=_json.dumps({"seq": 1}).encode(),
                                                         timestamp=1_700_000_000_123)],
                             ("p", 1): [SimpleNamespace(value=_json.dumps({"seq": 2}).encode(),
                                                         timestamp=1_700_000_000_456)]}]

        def partitions_for_topic(self, topic):
            return {0, 1}

        def assign(self, tps):
            self.tps = tps

        def seek_to_beginning(self, *tps):
            pass

        def poll(self, timeout_ms):
            return self.batches.pop() if self.batches else {}

        def close(self):
            pass

    monkeypatch.setattr(kafka, "KafkaConsumer", Consumer)
    got = list(follow_records("p", {"bootstrap_servers": "x:1"}, timeout_s=0.05))
    assert got == [Followed({"seq": 1}, 1_700_000_000.123), Followed({"seq": 2}, 1_700_000_000.456)]
    assert list(follow("p", {"bootstrap_servers": "x:1"}, timeout_s=0.05)) == [{"seq": 1}, {"seq": 2}]
