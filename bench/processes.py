"""Worker throughput with 1 vs N processes: ``python -m worker run --processes N``.

One invocation starts a tansu broker and a private redis-server (the shared Redis at
127.0.0.1:6379 is never touched). For each process count it pre-produces the same kind of
backlog as bench/throughput.py (S sessions x K tokens/message, fresh topics, group and Redis
prefix), starts the real CLI (``--processes 1`` is a plain worker; N > 1 goes through the
supervisor) and scrapes every child's /metrics every ``--sample-s`` seconds.

The rate is counted in steady state only: from the first sample at which every child holds
at least one partition (so the group join and the rebalance as the second child arrives are
excluded) to the first sample at which the whole backlog is done, as
(ok messages at the end - at the start) / elapsed. CPU per process (children, tansu, redis)
is read from /proc over the same window, and ``uptime``'s load average before and after.

Usage:  .venv/bin/python bench/processes.py [--processes 1 2] [--messages 60000] ...
Writes bench/results/processes-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import throughput as tp  # noqa: E402  (make_stream, produce_all, CPU helpers)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
    return sorted(out)


def scrape(port: int) -> tuple[float, float] | None:
    """(ok messages, assigned partitions) from one child's /metrics, None if it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    ok = assigned = 0.0
    for line in text.splitlines():
        if line.startswith('gru_messages_total{outcome="ok"}'):
            ok = float(line.split()[-1])
        elif line.startswith("gru_assigned_partitions "):
            assigned = float(line.split()[-1])
    return ok, assigned


def base_port(n: int) -> int:
    """A port P with P .. P+n-1 all free a moment ago (child i serves metrics on P + i)."""
    import socket

    from worker.local_services import free_port
    for _ in range(100):
        p = free_port()
        try:
            for i in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + i))
        except OSError:
            continue
        return p
    raise RuntimeError("no run of free ports")


def run_one(kafka, redis_url, model_dir, n_proc, args, log) -> dict:
    t = f"p{n_proc}-{uuid.uuid4().hex[:6]}"
    names = {"in": f"{t}-in", "out": f"{t}-out", "dlq": f"{t}-dlq", "group": f"{t}-g",
             "prefix": f"bench-{t}"}
    kafka.create_topics([names["in"], names["out"], names["dlq"]], partitions=args.partitions)
    pairs = tp.make_stream(args.sessions, args.tokens, args.messages, 40 + n_proc, f"{t}-", False)
    rate = tp.produce_all(kafka.bootstrap, names["in"], pairs)
    log(f"  pre-produced {len(pairs)} messages at {rate:.0f} msg/s")
    port = base_port(n_proc)
    env = {**os.environ, "GRU_KAFKA__INPUT_TOPIC": names["in"], "GRU_KAFKA__OUTPUT_TOPIC": names["out"],
           "GRU_KAFKA__DLQ_TOPIC": names["dlq"], "GRU_REDIS__PREFIX": names["prefix"],
           "GRU_MODEL__THREADS": str(args.threads), "GRU_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "worker", "run", "--processes", str(n_proc),
           "--bootstrap", kafka.bootstrap, "--group", names["group"], "--redis-url", redis_url,
           "--model-dir", str(model_dir), "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
           "--batch-size", str(args.batch), "--batch-wait-ms", str(args.max_wait_ms),
           "--session-timeout-ms", str(tp.SESSION_TIMEOUT_MS),
           "--heartbeat-interval-ms", str(tp.HEARTBEAT_MS)]
    load_before = os.getloadavg()
    up_before = uptime()
    logf = open(ROOT / f"bench/results/.processes-{t}.log", "w+")
    sup = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    ports = [port + i for i in range(n_proc)]
    samples = []  # (t, total ok, [assigned per child])
    start = cpu0 = None
    pids: list[int] = []
    try:
        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline:
            if sup.poll() is not None:
                logf.seek(0)
                raise RuntimeError(f"worker exited with {sup.returncode}:\n{logf.read()[-3000:]}")
            got = [scrape(p) for p in ports]
            now = time.perf_counter()
            if all(g is not None for g in got):
                ok = sum(g[0] for g in got)
                assigned = [g[1] for g in got]
                samples.append((now, ok, assigned))
                if start is None and all(a > 0 for a in assigned) and sum(assigned) == args.partitions:
                    pids = [sup.pid] if n_proc == 1 else children_of(sup.pid)
                    tp.CPU_PIDS.update({f"worker{i}": p for i, p in enumerate(pids)})
                    start, cpu0 = (now, ok), tp.cpu_snapshot()
                if ok >= len(pairs):
                    break
            time.sleep(args.sample_s)
        else:
            raise RuntimeError(f"timed out; last sample {samples[-1] if samples else None}")
        end, cpu1 = samples[-1], tp.cpu_snapshot()
    finally:
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(30)
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait()
        for i in range(n_proc):
            tp.CPU_PIDS.pop(f"worker{i}", None)
        logf.close()
    load_after = os.getloadavg()
    if start is None:
        raise RuntimeError("never saw every child holding a partition before the backlog ran out")
    secs = end[0] - start[0]
    done = end[1] - start[1]
    first_ok = next((s for s in samples if s[1] > 0), samples[-1])
    res = {"processes": n_proc, "messages": len(pairs), "steady_messages": done,
           "steady_seconds": secs, "msgs_per_s": done / secs, "tokens_per_s": done * args.tokens / secs,
           "done_before_steady": start[1],
           "startup_to_first_ok_s": first_ok[0] - samples[0][0] if samples else None,
           "exit_code": sup.returncode, "load_before": load_before, "load_after": load_after,
           "uptime_before": up_before, "uptime_after": uptime(),
           "cpu": tp.cpu_usage(cpu0, cpu1, secs, done)}
    with contextlib.suppress(OSError):
        os.unlink(ROOT / f"bench/results/.processes-{t}.log")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the --processes list")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--messages", type=int, default=60000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--max-wait-ms", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample-s", type=float, default=0.2)
    ap.add_argument("--timeout-s", type=float, default=180)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from worker.local_services import RedisServer, Tansu

    model_dir = tp.resolve_model(args.model)
    t0 = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    res = {"date": dt.date.today().isoformat(), "argv": sys.argv, "machine": tp.machine(),
           "model_dir": str(model_dir), "params": {k: v for k, v in vars(args).items() if k != "out"},
           "runs": []}
    with Tansu() as kafka, RedisServer(appendonly=False) as rsrv:
        tp.CPU_PIDS.update(tansu=kafka.proc.pid, redis=rsrv.proc.pid)
        log(f"tansu {kafka.bootstrap}, redis {rsrv.url}, model {model_dir}")
        for rnd in range(args.repeat):
            for n in args.processes:
                log(f"round {rnd + 1}: --processes {n}; {uptime()}")
                r = run_one(kafka, rsrv.url, model_dir, n, args, log)
                r["round"] = rnd + 1
                res["runs"].append(r)
                log(f"  {r['msgs_per_s']:.0f} msg/s over {r['steady_seconds']:.1f}s steady "
                    f"({r['steady_messages']:.0f} msgs); load {r['load_before'][0]:.2f} -> "
                    f"{r['load_after'][0]:.2f}; cpu {r['cpu']}")
    res["machine"]["loadavg_end"] = os.getloadavg()
    print()
    print(f"{'round':>5} {'procs':>5} {'msgs/s':>8} {'tokens/s':>9} {'steady s':>8} "
          f"{'workers cores':>13} {'whole machine':>13} {'load 1m before/after':>21}")
    for r in res["runs"]:
        wc = sum(v["cores"] for k, v in r["cpu"].items() if k.startswith("worker"))
        print(f"{r['round']:>5} {r['processes']:>5} {r['msgs_per_s']:>8.0f} {r['tokens_per_s']:>9.0f} "
              f"{r['steady_seconds']:>8.1f} {wc:>13.2f} {r['cpu'].get('whole_machine', {}).get('cores', 0):>13.2f} "
              f"{r['load_before'][0]:>10.2f}/{r['load_after'][0]:<10.2f}")
    date = res["date"]
    out = Path(args.out) if args.out else ROOT / f"bench/results/processes-{date}.json"
    if out.exists() and not args.out:
        out = out.with_name(f"{out.stem}-{time.strftime('%H%M%S')}.json")
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
