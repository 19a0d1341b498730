"""Latency at fixed offered loads, open loop, against real local services.

    python -m bench.latency [--modes pinned unpinned] [--rates 0.1 0.25 0.5 0.75]
        [--seconds 20] [--variant NAME:GRU_X=V,GRU_Y=W ...]

For each mode:

1. **Services.** tansu and a private redis-server. ``pinned``: this process, and so the
   broker, Redis, the feeder and the collector it starts, run on CPU 1; the worker runs alone
   on CPU 0 (``sched_setaffinity``, as ``taskset`` does). ``unpinned``: no affinity.
2. **Max.** A feeder offers more than the worker can take (``--overload``, 25k msg/s) for
   ``--max-seconds``; the rate at which the worker (a real ``python -m worker run`` process,
   default settings) applies messages meanwhile, read from its own counters, is this run's
   max. The broker ingests while the worker consumes, as at every rate after it (a backlog
   produced beforehand would spare the broker that work and overstate the max).
3. **Rates.** For each fraction of that max, a feeder process (librdkafka) sends record ``i``
   at its scheduled time ``t0 + i / rate``, whatever the worker does: the feeder never waits
   on it. A collector process (librdkafka, ``fetch.wait.max.ms`` 5, polled without batching
   delay) stamps each prediction's arrival. The collector is the measuring instrument, so
   its own wait must be small: at 100 ms it added about 30 ms to the p50 of the worker and
   of the pass-through alike (at 10 % load), because a librdkafka fetch that tansu holds is
   evidently not always answered when a record arrives. Latency = arrival - scheduled time,
   so a feeder that falls behind counts against the worker, never for it (no coordinated
   omission). The first ``--warmup`` seconds of each rate are left out. Per-stage p99s and
   GC pauses come from the worker's /metrics, scraped around each rate.
4. **Floor** (on unless ``--no-floor``): the same rates through the same client's
   pass-through (``bench.common.PASS_THROUGHS``) in the worker's place (the worker's consumer
   and producer settings, on its CPU when pinned): consume, send each value unchanged, wait
   for the acknowledgements, commit. What it measures is the broker and the two client hops
   alone, the least any worker with that client on this broker can show.
5. **Variants** (optional): the rates again with a worker started with other settings
   (``--variant nofreeze:GRU_BATCH__GC_FREEZE=false``), each on fresh topics, all at
   fractions of the same max.

Steps 2-5 run for each Kafka client of ``--clients`` (kafka-python and confluent-kafka by
default), each at fractions of its own max and against its own floor, in one run.

Writes bench/results/latency-<date>.json (``bench.common.write_result``) and prints one
table per mode, client and variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import Bench

COLLECTOR_FETCH_WAIT_MS = 5  # see the module docstring: at 100 the collector itself added ~30 ms
FEEDER_LINGER_MS = 5  # librdkafka's default; at 1 ms each record was its own request, and the
                      # broker (on the same two cores) spent most of a core on them


# --- the feeder and the collector (child processes) ---------------------------------------

def feed(args) -> int:
    """Send ``rate * seconds`` records on schedule (``rate`` 0: all at once)."""
    import confluent_kafka
    n = args.count
    pairs = common.stream(args.sessions, args.tokens, n, args.seed, args.prefix)
    p = confluent_kafka.Producer({"bootstrap.servers": args.bootstrap, "linger.ms": FEEDER_LINGER_MS,
                                  "acks": "all", "queue.buffering.max.messages": 2_000_000,
                                  "queue.buffering.max.kbytes": 2_000_000})
    sent = np.zeros(n)
    t0 = time.time() + 0.3
    i = 0
    while time.time() < t0:
        time.sleep(0.01)
    while i < n:
        now = time.time()
        due = n if args.rate <= 0 else min(n, int((now - t0) * args.rate) + 1)
        while i < due:
            key, value = pairs[i]
            try:
                p.produce(args.topic, value, key)
            except BufferError:
                p.poll(0.01)
                continue
            sent[i] = time.time()
            i += 1
        p.poll(0)
        if i < n and args.rate > 0:
            wait = t0 + i / args.rate - time.time()
            if wait > 0:
                time.sleep(min(wait, 0.002))
    left = p.flush(60)
    sids, seqs = zip(*((json.loads(v)["session_id"], json.loads(v)["seq"]) for _, v in pairs))
    np.savez(args.out, t0=t0, rate=args.rate, sent=sent, sid=np.array(sids), seq=np.array(seqs),
             unflushed=left)
    return 0


def collect(args) -> int:
    """Stamp every record of ``--topic`` with its arrival until SIGTERM; then write them."""
    import confluent_kafka
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    c = confluent_kafka.Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"lat-{os.getpid()}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": args.wait_ms,
                                  "fetch.min.bytes": 1, "auto.offset.reset": "earliest"})
    c.assign([confluent_kafka.TopicPartition(args.topic, p, confluent_kafka.OFFSET_BEGINNING)
              for p in range(args.partitions)])
    arrivals, values = [], []
    c.consume(1, 0.5)
    print("ready", flush=True)
    while not stop:
        # consume(n, timeout) waits for n messages or the timeout: it would hold arrivals up
        # to the timeout. poll() returns at the first message; then take what is queued.
        first = c.poll(0.05)
        t = time.time()
        if first is None:
            continue
        for m in [first, *c.consume(5000, 0)]:
            if m.error() is None:
                arrivals.append(t)
                values.append(m.value())
    c.close()
    sids, seqs = [], []
    for v in values:
        d = json.loads(v)
        sids.append(d["session_id"])
        seqs.append(d["seq"])
    np.savez(args.out, arrival=np.array(arrivals), sid=np.array(sids), seq=np.array(seqs))
    return 0


def passthrough(args) -> int:
    """The floor: ``common.PASS_THROUGHS[args.client]`` with the worker's consumer and
    producer settings, in batches of up to 512, until SIGTERM; then prints how many records
    it forwarded."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    pt = common.PASS_THROUGHS[args.client](args.bootstrap, args.topic, args.out, args.prefix,
                                           worker_producer=True)
    pt.join()  # as the worker's /readyz: the group join is not part of the measurement
    print("ready", flush=True)
    done = 0
    while not stop:
        done += pt.step(512)
    pt.close()
    print(done, flush=True)
    return 0


def start_collector(bench: Bench, args, topic: str, out: Path) -> subprocess.Popen:
    """The collector process on ``topic``, once it is assigned and reading."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.latency", "_collect", "--bootstrap", bench.kafka.bootstrap,
         "--topic", topic, "--partitions", str(args.partitions), "--out", str(out),
         "--wait-ms", str(args.collector_wait_ms)],
        cwd=common.ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def start_feeder(bench: Bench, args, topic: str, rate: float, count: int, seed: int,
                 prefix: str, out: Path) -> subprocess.Popen:
    """The feeder process: ``count`` records to ``topic`` on the schedule of ``rate``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.latency", "_feed", "--bootstrap", bench.kafka.bootstrap,
         "--topic", topic, "--rate", str(rate), "--count", str(count),
         "--sessions", str(args.sessions), "--tokens", str(args.tokens),
         "--seed", str(seed), "--prefix", prefix, "--out", str(out)],
        cwd=common.ROOT)
    bench.cpu.pids["feeder"] = proc.pid
    return proc


# --- one worker on fresh topics, and its phases ---------------------------------------------

class Rig:
    """A worker process, a collector process and fresh topics for one mode and variant."""

    def __init__(self, bench: Bench, model_dir: Path, args, tag: str, env: dict[str, str],
                 worker_cpus: set[int] | None, workdir: Path, client: str = "kafka-python") -> None:
        from devtools.launcher import TEST_GROUP_TIMEOUTS, WorkerProcess
        self.bench, self.args, self.workdir, self.tag = bench, args, workdir, tag
        self.names = bench.fresh(tag)
        n = self.names
        self.collector_out = workdir / f"{tag}-collected.npz"
        self.collector = start_collector(bench, args, n["out"], self.collector_out)
        self.worker = WorkerProcess(
            ["--bootstrap", bench.kafka.bootstrap, "--input-topic", n["in"], "--output-topic", n["out"],
             "--group", n["group"], "--redis-url", bench.redis.url, "--redis-prefix", n["prefix"],
             "--model-dir", str(model_dir), "--threads", "1", "--log-level", "WARNING",
             "--kafka-client", client, *TEST_GROUP_TIMEOUTS],
            env={"GRU_KAFKA__DLQ_TOPIC": n["dlq"], **env}, cpus=worker_cpus,
            log_path=workdir / f"{tag}-worker.log").start()
        self.worker.wait_ready(90)
        bench.cpu.pids.update(worker=self.worker.pid, collector=self.collector.pid)
        self.phases: list[dict] = []

    def ok(self) -> float:
        return self.worker.outcome("ok")

    def run_phase(self, name: str, rate: float, count: int, seed: int, drain: bool = True) -> dict:
        """Feed ``count`` records at ``rate`` (0: at once); wait until the worker applied them
        (``drain``), or only until the feeder is done."""
        from devtools.launcher import parse_metrics
        out = self.workdir / f"{self.tag}-{name}-fed.npz"
        start_ok = self.ok()
        before = parse_metrics(self.worker.get("/metrics")[1])
        feeder = start_feeder(self.bench, self.args, self.names["in"], rate, count, seed,
                              f"{self.tag}-{name}-", out)
        cpu0, t_cpu0 = self.bench.cpu.snapshot(), time.time()
        progress = []  # (time, applied) while the worker drains: the max rate comes from it
        deadline = None
        while True:
            done = self.ok() - start_ok
            progress.append((time.time(), done))
            if done >= count or (not drain and feeder.poll() is not None):
                break
            if feeder.poll() is not None:
                if feeder.returncode:
                    raise RuntimeError(f"feeder failed ({feeder.returncode})")
                deadline = deadline or time.time() + self.args.drain_s
                if time.time() > deadline:  # not sustained: report what arrived, go on
                    print(f"  {name}: the worker applied {done:.0f} of {count} within "
                          f"{self.args.drain_s:g} s of the feeder's end: not sustained", flush=True)
                    break
            time.sleep(0.25)
        cpu1, t_cpu1 = self.bench.cpu.snapshot(), time.time()
        feeder.wait(120)
        sustained = done >= count
        time.sleep(1.0)  # the last predictions reach the collector
        after = parse_metrics(self.worker.get("/metrics")[1])
        gauges = {k: v for k, v in after.items()
                  if k.startswith(("gru_batch_limit_records", "gru_batch_cost_seconds"))}
        phase = {"name": name, "rate": rate, "count": count, "fed": str(out), "sustained": sustained,
                 "gauges_after": gauges,
                 "cores": {k: v["cores"] for k, v in common.Cpu.usage(
                     cpu0, cpu1, t_cpu1 - t_cpu0, count).items()},
                 "stages": common.stage_report(common.stages_from_text(before),
                                               common.stages_from_text(after)),
                 "progress": progress}
        self.phases.append(phase)
        return phase

    def close(self) -> dict[str, np.ndarray]:
        self.worker.terminate(30)
        self.collector.send_signal(signal.SIGTERM)
        self.collector.wait(60)
        return dict(np.load(self.collector_out))


class FloorRig:
    """``Rig``'s interface with the pass-through (``passthrough``) of the client in the
    worker's place: the same broker, feeder, collector and CPUs, none of the worker's work."""

    def __init__(self, bench: Bench, args, tag: str, worker_cpus: set[int] | None,
                 workdir: Path, client: str = "kafka-python") -> None:
        self.bench, self.args, self.workdir, self.tag = bench, args, workdir, tag
        self.names = n = bench.fresh(tag)
        self.collector_out = workdir / f"{tag}-collected.npz"
        self.collector = start_collector(bench, args, n["out"], self.collector_out)
        self.forwarder = subprocess.Popen(
            [sys.executable, "-m", "bench.latency", "_passthrough", "--bootstrap", bench.kafka.bootstrap,
             "--topic", n["in"], "--out", n["out"], "--prefix", n["group"], "--client", client],
            cwd=common.ROOT, stdout=subprocess.PIPE, text=True)
        if worker_cpus:
            os.sched_setaffinity(self.forwarder.pid, worker_cpus)  # before it has threads
        assert self.forwarder.stdout.readline().strip() == "ready"
        bench.cpu.pids.update(worker=self.forwarder.pid, collector=self.collector.pid)
        self.phases: list[dict] = []

    def run_phase(self, name: str, rate: float, count: int, seed: int) -> dict:
        out = self.workdir / f"{self.tag}-{name}-fed.npz"
        feeder = start_feeder(self.bench, self.args, self.names["in"], rate, count, seed,
                              f"{self.tag}-{name}-", out)
        cpu0, t0 = self.bench.cpu.snapshot(), time.time()
        if feeder.wait(self.args.seconds * 4 + 120):
            raise RuntimeError(f"feeder failed ({feeder.returncode})")
        cpu1, t1 = self.bench.cpu.snapshot(), time.time()
        time.sleep(3.0)  # the last records through the pass-through and to the collector
        phase = {"name": name, "rate": rate, "count": count, "fed": str(out), "stages": {},
                 "cores": {k: v["cores"] for k, v in common.Cpu.usage(cpu0, cpu1, t1 - t0, count).items()}}
        self.phases.append(phase)
        return phase

    def close(self) -> dict[str, np.ndarray]:
        for proc in (self.forwarder, self.collector):
            proc.send_signal(signal.SIGTERM)
        forwarded = self.forwarder.communicate(timeout=60)[0].split()
        self.collector.wait(60)
        for ph in self.phases:
            ph["forwarded"] = int(forwarded[-1]) if forwarded else None
        return dict(np.load(self.collector_out))


def sustained_rate(progress: list[tuple[float, float]], seconds: float) -> float:
    """Messages per second applied over the last 70 % of the overload (the first 30 %: the
    group join's backlog and warm-up)."""
    t = np.array([p[0] for p in progress])
    d = np.array([p[1] for p in progress])
    t0 = t[0] + 0.3 * seconds
    keep = t >= t0
    return float((d[keep][-1] - np.interp(t0, t, d)) / (t[keep][-1] - t0))


def latencies(phase: dict, collected: dict[str, np.ndarray], warmup_s: float) -> dict:
    fed = np.load(phase["fed"])
    index = {(s, int(q)): i for i, (s, q) in enumerate(zip(fed["sid"].tolist(), fed["seq"].tolist()))}
    arrival = np.full(len(index), np.nan)
    for s, q, a in zip(collected["sid"].tolist(), collected["seq"].tolist(),
                       collected["arrival"].tolist()):
        i = index.get((s, int(q)))
        if i is not None and not arrival[i] <= a:  # first arrival wins (NaN compares false)
            arrival[i] = a
    rate, t0 = float(fed["rate"]), float(fed["t0"])
    scheduled = t0 + np.arange(len(index)) / rate
    keep = scheduled >= t0 + warmup_s
    lat = (arrival - scheduled)[keep] * 1000
    missing = int(np.isnan(lat).sum())
    lat = lat[~np.isnan(lat)]
    behind = (fed["sent"] - scheduled)[keep] * 1000  # how late the feeder sent
    q = lambda v: round(float(np.percentile(lat, v)), 2) if lat.size else None
    return {"samples": int(lat.size), "missing": missing, "p50_ms": q(50), "p90_ms": q(90),
            "p99_ms": q(99), "p99_9_ms": q(99.9), "max_ms": round(float(lat.max()), 2) if lat.size else None,
            "feeder_late_p99_ms": round(float(np.percentile(behind, 99)), 3)}


# --- main ------------------------------------------------------------------------------------

def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    env = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, env


def run_mode(mode: str, args, model_dir: Path, workdir: Path) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "pinned":
        if len(cpus) < 2:
            raise SystemExit("pinned mode needs two CPUs")
        worker_cpus, others = {cpus[0]}, {cpus[1]}
        os.sched_setaffinity(0, others)  # the services, feeder and collector inherit it
    else:
        worker_cpus = None
    out: dict = {"mode": mode, "worker_cpus": sorted(worker_cpus) if worker_cpus else "any",
                 "clients": {}}
    try:
        with Bench(args.partitions) as bench:
            common.log(f"[{mode}] tansu {bench.kafka.bootstrap}, redis {bench.redis.url}")
            for client in args.clients:
                out["clients"][client] = run_client(bench, mode, client, args, model_dir,
                                                    worker_cpus, workdir)
    finally:
        os.sched_setaffinity(0, set(cpus))
    return out


def run_client(bench: Bench, mode: str, client: str, args, model_dir: Path,
               worker_cpus: set[int] | None, workdir: Path) -> dict:
    """One client: its worker's max, the rates at fractions of it (each variant), and its own
    pass-through at the same rates."""
    out: dict = {"variants": {}}
    tag = f"{mode[:3]}-{'rd' if client == 'confluent' else 'kp'}"
    where = f"{mode}/{client}"
    peak = None
    for vname, env in [("default", {})] + [parse_variant(v) for v in args.variant]:
        if peak is None:
            rig = Rig(bench, model_dir, args, f"{tag}-max", {}, worker_cpus, workdir, client)
            try:
                ph = rig.run_phase("max", args.overload, int(args.overload * args.max_seconds),
                                   100, drain=False)
            finally:
                rig.close()
            peak = sustained_rate(ph["progress"], args.max_seconds)
            out["max_msgs_per_s"] = round(peak, 1)
            out["max_stages"] = ph["stages"]
            out["max_cores"] = ph.get("cores")
            common.log(f"[{where}] max {peak:.0f} msg/s (sustained under an offered "
                       f"{args.overload:g} msg/s)")
        rows = []
        for ri, frac in enumerate(args.rates):
            # Fresh topics per rate: tansu's in-memory log gets slower to fetch from as
            # a topic grows, so one rate's backlog would tax the next.
            rig = Rig(bench, model_dir, args, f"{tag}-{vname}-{ri}", env, worker_cpus, workdir,
                      client)
            try:
                rate = frac * peak
                count = int(rate * args.seconds)
                common.log(f"[{where}/{vname}] {frac:.0%} of max: {rate:.0f} msg/s for "
                           f"{args.seconds:g} s")
                rig.run_phase(f"r{frac:g}", rate, count, 200 + ri)
            finally:
                collected = rig.close()
            for ph in rig.phases:
                ph.pop("progress", None)
                ph["fraction_of_max"] = round(ph["rate"] / peak, 3)
                ph["latency"] = latencies(ph, collected, args.warmup)
                rows.append(ph)
        out["variants"][vname] = {"env": env, "phases": rows}
    if args.floor:
        rows = []
        for ri, frac in enumerate(args.rates):
            rig = FloorRig(bench, args, f"{tag}-floor-{ri}", worker_cpus, workdir, client)
            try:
                rate = frac * peak
                common.log(f"[{where}/floor] {frac:.0%} of max: {rate:.0f} msg/s through the "
                           f"pass-through")
                rig.run_phase(f"r{frac:g}", rate, int(rate * args.seconds), 200 + ri)
            finally:
                collected = rig.close()
            for ph in rig.phases:
                ph["fraction_of_max"] = round(ph["rate"] / peak, 3)
                ph["latency"] = latencies(ph, collected, args.warmup)
                rows.append(ph)
        out["floor"] = {"phases": rows}
    return out


def print_mode(res: dict) -> None:
    for client, c in res["clients"].items():
        print(f"\n== {res['mode']} (worker on CPUs {res['worker_cpus']}), {client}: max "
              f"{c['max_msgs_per_s']:.0f} msg/s")
        floor = {f"floor ({client} pass-through)": {"env": {}, **c["floor"]}} if "floor" in c else {}
        for vname, v in {**c["variants"], **floor}.items():
            print(f"-- variant {vname} {v['env'] or ''}")
            print(f"{'load':>6} {'msg/s':>7} {'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7}  "
                  f"{'n':>6} {'miss':>4}  per-stage p99 ms (batch, poll, load, engine, store, "
                  f"produce, commit, gc2)")
            for ph in v["phases"]:
                if "latency" not in ph:
                    continue
                lat, st = ph["latency"], ph["stages"]
                p = lambda k, st=st: f"{st[k]['p99_ms']:.1f}" if k in st else "-"
                print(f"{ph['fraction_of_max']:>6.0%} {ph['rate']:>7.0f} {lat['p50_ms']:>7.1f} "
                      f"{lat['p99_ms']:>7.1f} {lat['p99_9_ms']:>7.1f} {lat['max_ms']:>7.1f}  "
                      f"{lat['samples']:>6} {lat['missing']:>4}  "
                      f"{p('batch')}, {p('poll')}, {p('redis_load')}, {p('engine')}, "
                      f"{p('redis_write')}, {p('produce')}, {p('commit')}, {p('gc_gen2')}")
                print(f"{'':>6} cores: " + ", ".join(f"{k} {v:.2f}"
                                                      for k, v in ph.get("cores", {}).items()))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_feed", "_collect", "_passthrough"):
        ap = argparse.ArgumentParser(prog=f"python -m bench.latency {argv[0]}")
        for a in ("--bootstrap", "--topic", "--out", "--prefix"):
            ap.add_argument(a)
        ap.add_argument("--client", default="kafka-python", choices=common.CLIENTS)
        for a in ("--count", "--sessions", "--tokens", "--seed", "--partitions"):
            ap.add_argument(a, type=int, default=0)
        ap.add_argument("--wait-ms", type=int, default=COLLECTOR_FETCH_WAIT_MS)
        ap.add_argument("--rate", type=float, default=0)
        a = ap.parse_args(argv[1:])
        return {"_feed": feed, "_collect": collect, "_passthrough": passthrough}[argv[0]](a)

    ap = common.parser("latency", __doc__)
    ap.add_argument("--modes", nargs="+", default=["pinned", "unpinned"], choices=["pinned", "unpinned"])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75],
                    help="fractions of the measured max")
    ap.add_argument("--seconds", type=float, default=20.0, help="per rate")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds left out at each rate's start")
    ap.add_argument("--drain-s", type=float, default=30.0,
                    help="after the feeder ends, wait this long for the worker to catch up")
    ap.add_argument("--overload", type=float, default=25000,
                    help="offered msg/s for the max: the worker's applied rate under it, with "
                         "the broker ingesting at the same time, is this run's max")
    ap.add_argument("--max-seconds", type=float, default=10.0, help="length of the overload")
    ap.add_argument("--collector-wait-ms", type=int, default=COLLECTOR_FETCH_WAIT_MS,
                    help="the collector's fetch.wait.max.ms")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=4, help="tokens per message")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:ENV=VALUE,... a worker with other settings, at the same rates")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip each client's pass-through at the same rates")
    ap.add_argument("--clients", nargs="+", default=list(common.CLIENTS), choices=common.CLIENTS,
                    help="the worker's Kafka clients, each at fractions of its own max and "
                         "against its own pass-through")
    args = ap.parse_args(argv)

    model_dir = common.resolve_model(args.model)
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = cfg.get("architecture", {})
    res = {"model": {
        "dir": str(model_dir), "model_id": cfg.get("model_id"),
        **{k: arch.get(k) for k in ("embed_dim", "hidden_size", "num_layers")}},
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "collector_fetch_wait_ms": args.collector_wait_ms, "modes": []}
    import tempfile
    workdir = Path(tempfile.mkdtemp(prefix="gru-latency-"))
    with contextlib.suppress(KeyboardInterrupt):
        for mode in args.modes:
            res["modes"].append(run_mode(mode, args, model_dir, workdir))
            print_mode(res["modes"][-1])
    common.write_result("latency", res, args.out, with_clients=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
