"""Worker throughput with 1 vs N processes: ``python -m worker run --processes N``.

One invocation starts a tansu broker and a private redis-server (the shared Redis at
127.0.0.1:6379 is never touched). For each process count it pre-produces the same kind of
backlog as ``python -m bench.throughput`` (S sessions x K tokens/message, fresh topics,
group and Redis prefix), starts the real CLI (``--processes 1`` is a plain worker; N > 1
goes through the supervisor) and scrapes every child's /metrics every ``--sample-s`` seconds.

The rate is counted in steady state only: from the first sample at which every child holds
at least one partition (so the group join and the rebalance as the second child arrives are
excluded) to the first sample at which the whole backlog is done, as
(ok messages at the end - at the start) / elapsed. CPU per process (children, tansu, redis)
is read from /proc over the same window, and ``uptime``'s load average before and after.

    python -m bench.processes [--processes 1 2] [--messages 60000] ...

Writes bench/results/processes-<date>.json (``bench.common.write_result``) and prints a
table.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.common import Bench, Cpu
from devtools.launcher import WorkerProcess, http_get, parse_metrics


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
        m = parse_metrics(http_get(port, "/metrics")[1])
    except OSError:
        return None
    return m.get('gru_messages_total{outcome="ok"}', 0.0), m.get("gru_assigned_partitions", 0.0)


def base_port(n: int) -> int:
    """A port P with P .. P+n-1 all free a moment ago (child i serves metrics on P + i)."""
    import socket

    from devtools.services import free_port
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


def run_one(bench: Bench, model_dir: Path, n_proc: int, args) -> dict:
    names = bench.fresh(f"p{n_proc}")
    pairs = common.stream(args.sessions, args.tokens, args.messages, 40 + n_proc, f"p{n_proc}-")
    bench.backlog(names, pairs)
    port = base_port(n_proc)
    sup = WorkerProcess(
        ["--processes", str(n_proc), "--bootstrap", bench.kafka.bootstrap, "--group", names["group"],
         "--redis-url", bench.redis.url, "--model-dir", str(model_dir),
         "--batch-size", str(args.batch), "--batch-wait-ms", str(args.max_wait_ms),
         "--session-timeout-ms", str(common.SESSION_TIMEOUT_MS),
         "--heartbeat-interval-ms", str(common.HEARTBEAT_MS)], port=port,
        env={"GRU_KAFKA__INPUT_TOPIC": names["in"], "GRU_KAFKA__OUTPUT_TOPIC": names["out"],
             "GRU_KAFKA__DLQ_TOPIC": names["dlq"], "GRU_REDIS__PREFIX": names["prefix"],
             "GRU_MODEL__THREADS": str(args.threads), "GRU_LOG_LEVEL": "WARNING"})
    load_before, up_before = os.getloadavg(), uptime()
    ports = [port + i for i in range(n_proc)]
    samples = []  # (t, total ok, [assigned per child])
    start = None
    cpu0: dict = {}
    sup.start()
    try:
        deadline = time.monotonic() + args.timeout_s
        while time.monotonic() < deadline:
            if not sup.alive:
                raise RuntimeError(f"worker exited:\n{sup.log_tail()}")
            got = [scrape(p) for p in ports]
            now = time.perf_counter()
            if all(g is not None for g in got):
                ok = sum(g[0] for g in got)
                assigned = [g[1] for g in got]
                samples.append((now, ok, assigned))
                if start is None and all(a > 0 for a in assigned) and sum(assigned) == args.partitions:
                    pids = [sup.pid] if n_proc == 1 else children_of(sup.pid)
                    bench.cpu.pids.update({f"worker{i}": p for i, p in enumerate(pids)})
                    start, cpu0 = (now, ok), bench.cpu.snapshot()
                if ok >= len(pairs):
                    break
            time.sleep(args.sample_s)
        else:
            raise RuntimeError(f"timed out; last sample {samples[-1] if samples else None}")
        end, cpu1 = samples[-1], bench.cpu.snapshot()
    finally:
        with contextlib.suppress(Exception):
            sup.terminate(30)
        sup.kill()
        for i in range(n_proc):
            bench.cpu.pids.pop(f"worker{i}", None)
    if start is None:
        raise RuntimeError("never saw every child holding a partition before the backlog ran out")
    secs = end[0] - start[0]
    done = end[1] - start[1]
    first_ok = next((s for s in samples if s[1] > 0), samples[-1])
    return {"processes": n_proc, "messages": len(pairs), "steady_messages": done,
            "steady_seconds": secs, "msgs_per_s": done / secs, "tokens_per_s": done * args.tokens / secs,
            "done_before_steady": start[1],
            "startup_to_first_ok_s": first_ok[0] - samples[0][0] if samples else None,
            "load_before": load_before, "load_after": os.getloadavg(),
            "uptime_before": up_before, "uptime_after": uptime(),
            "cpu": Cpu.usage(cpu0, cpu1, secs, done)}


def main(argv=None) -> int:
    ap = common.parser("processes", __doc__)
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
    args = ap.parse_args(argv)

    model_dir = common.resolve_model(args.model)
    res = {"model_dir": str(model_dir),
           "params": {k: v for k, v in vars(args).items() if k != "out"}, "runs": []}
    with common.quiet_logs(), Bench(args.partitions) as bench:
        common.log(f"tansu {bench.kafka.bootstrap}, redis {bench.redis.url}, model {model_dir}")
        for rnd in range(args.repeat):
            for n in args.processes:
                common.log(f"round {rnd + 1}: --processes {n}; {uptime()}")
                r = run_one(bench, model_dir, n, args)
                r["round"] = rnd + 1
                res["runs"].append(r)
                common.log(f"  {r['msgs_per_s']:.0f} msg/s over {r['steady_seconds']:.1f}s steady "
                           f"({r['steady_messages']:.0f} msgs); load {r['load_before'][0]:.2f} -> "
                           f"{r['load_after'][0]:.2f}")
    print()
    print(f"{'round':>5} {'procs':>5} {'msgs/s':>8} {'tokens/s':>9} {'steady s':>8} "
          f"{'workers cores':>13} {'whole machine':>13} {'load 1m before/after':>21}")
    for r in res["runs"]:
        wc = sum(v["cores"] for k, v in r["cpu"].items() if k.startswith("worker"))
        print(f"{r['round']:>5} {r['processes']:>5} {r['msgs_per_s']:>8.0f} {r['tokens_per_s']:>9.0f} "
              f"{r['steady_seconds']:>8.1f} {wc:>13.2f} {r['cpu'].get('whole_machine', {}).get('cores', 0):>13.2f} "
              f"{r['load_before'][0]:>10.2f}/{r['load_after'][0]:<10.2f}")
    common.write_result("processes", res, args.out, with_clients=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
