"""Capacity: what a session costs in Redis, what a worker process sustains with a million live
sessions, how fast a lost Redis is rebuilt; and the deployment those figures imply.

    python -m bench.capacity [measure] [--sizes 10000 100000 1000000] [--only mwr]
    python -m bench.capacity table     # the sizing table of docs/capacity.md

``measure`` starts its own services (a private redis-server per layout, a one-node Redis
Cluster, tansu; the shared Redis is never touched) and writes
bench/results/capacity-<date>.json (``bench.common.write_result``):

  m  memory   states written through the real write path (``RedisStateStore.store``, the Lua
              script, values from ``worker.codec``) up to each size, for float32 / float16 and
              outboxes of 1 and 4 entries; INFO used_memory per session and MEMORY USAGE of
              sampled keys; the same on a cluster-enabled node with the cluster key layout;
  w  worker   the in-process worker (``bench.throughput.run_worker``) on a pre-produced
              backlog whose sessions continue states pre-populated under the keys it reads:
              1k sessions in a Redis holding 1k, the same shape in a Redis holding 1M, and 1M
              with every message of a different session; msg/s, batch p99, Redis CPU and
              bytes per message;
  r  rebuild  ``bench.rebuild.measure`` at a smaller scale (replayed messages per second).

The formulas and the constants a plan uses (``REFERENCE``, copied from the newest result) are
in the installed package, ``worker/capacity.py``: ``python -m worker plan`` prints a deployment.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import Bench
from worker import capacity

SESSION_ID = "call-{:08d}"  # 13 characters, the session ids the measurements use
LAYOUTS = [("float32", 1), ("float16", 1), ("float32", 4), ("float16", 4)]
TTL_MS = 86_400_000


# --- states through the real write path ----------------------------------------------------

def state_values(rng: np.random.Generator, n: int, dims: tuple[int, int, int], dtype: str,
                 outbox: int, seen: int = 4) -> list[bytes]:
    """``n`` values as the worker writes them after applying seq 0 (and ``outbox`` - 1 earlier
    entries, positions going back from 0): random ``h``, one prediction per outbox entry."""
    from worker.codec import OutboxEntry, PosKind, SessionState, encode_state
    layers, hidden, labels = dims
    hs = rng.standard_normal((n, layers, hidden), dtype=np.float32)
    probs = rng.dirichlet(np.ones(labels), n).astype(np.float32)
    out = []
    for i in range(n):
        p = tuple(float(x) for x in probs[i])
        box = tuple(OutboxEntry(-j, -j, seen, False, int(rng.integers(2**63)), p)
                    for j in reversed(range(outbox)))
        out.append(encode_state(SessionState(hs[i], 0, PosKind.SEQ, seen, 1, outbox=box),
                                labels, dtype))
    return out


class Populator:
    """Writes states for session ids ``SESSION_ID.format(i)`` through ``RedisStateStore.store``
    (the fenced, deduplicating Lua script), ``chunk`` writes per call. Off a cluster the state
    keys carry no partition, so one claimed partition of ``topic`` fences them all; on a
    cluster session i is written under partition i % ``partitions`` of ``topic``."""

    def __init__(self, client, keys, dims, dtype: str, outbox: int, topic: str,
                 partitions: int = 1, chunk: int = 2000, seed: int = 0) -> None:
        from worker.state import RedisStateStore
        self.store, self.keys = RedisStateStore(client, keys), keys
        self.dims, self.dtype, self.outbox, self.chunk = dims, dtype, outbox, chunk
        self.tps = [(topic, p) for p in range(partitions if keys.cluster else 1)]
        claims = self.store.claim(self.tps)
        self.tokens = {tp: claims[tp].token for tp in self.tps}
        self.next = dict.fromkeys(self.tps, 0)
        self.rng = np.random.default_rng(seed)

    def partition(self, i: int):
        return self.tps[i % len(self.tps)]

    def write(self, ids) -> None:
        from worker.ports import PartitionMark, StateWrite, WriteStatus
        ids = list(ids)
        for at in range(0, len(ids), self.chunk):
            part = ids[at:at + self.chunk]
            values = state_values(self.rng, len(part), self.dims, self.dtype, self.outbox)
            writes = [StateWrite(SESSION_ID.format(i), self.partition(i), None, 0, v, TTL_MS)
                      for i, v in zip(part, values)]
            marks = {}
            for tp in {w.partition for w in writes}:
                self.next[tp] += len(part)
                marks[tp] = PartitionMark(self.tokens[tp], self.next[tp])
            res = self.store.store(marks, writes)
            bad = sum(s != WriteStatus.OK for s in res.statuses)
            if bad:
                raise RuntimeError(f"{bad} of {len(writes)} pre-populating writes refused")


def memory_point(client, base: int, n: int, keys: list[str]) -> dict:
    info = client.info("memory")
    usage = [client.memory_usage(k, samples=0) for k in keys]
    return {"sessions": n, "used_memory": info["used_memory"],
            "used_memory_rss": info["used_memory_rss"],
            "bytes_per_session": round((info["used_memory"] - base) / n, 1),
            "memory_usage_mean": round(float(np.mean(usage)), 1)}


def measure_memory(sizes: list[int], dims, model_id: str, cluster_sizes: list[int]) -> dict:
    """Per layout, a fresh private redis-server filled up to each size in turn."""
    import redis

    from devtools.services import RedisServer
    from worker.codec import HEADER, OUTBOX_ENTRY
    from worker.state import Keys
    out = {"layouts": [], "cluster": []}
    keys = Keys("gru", model_id, "gru-worker")
    for dtype, outbox in LAYOUTS:
        with RedisServer(appendonly=False) as srv:
            client = srv.client()
            pop = Populator(client, keys, dims, dtype, outbox, "tokens")
            base = client.info("memory")["used_memory"]
            row = {"dtype": dtype, "outbox": outbox, "points": [],
                   "value_bytes": len(state_values(np.random.default_rng(0), 1, dims, dtype,
                                                   outbox)[0]),
                   "key_bytes": len(keys.session(SESSION_ID.format(0)))}
            done, t0 = 0, time.perf_counter()
            for n in sizes:
                pop.write(range(done, n))
                done = n
                sample = [keys.session(SESSION_ID.format(i))
                          for i in random.Random(n).sample(range(n), min(n, 1000))]
                row["points"].append(memory_point(client, base, n, sample))
                common.log(f"  {dtype} outbox {outbox}: {n} sessions, "
                    f"{row['points'][-1]['bytes_per_session']} B/session "
                    f"({n / (time.perf_counter() - t0):.0f} writes/s so far)")
            row["write_rate_per_s"] = round(done / (time.perf_counter() - t0))
            client.close()
        out["layouts"].append(row)
    # The cluster key layout ({topic|partition} hash tag) on a cluster-enabled node that owns
    # every slot: what a shard of a Redis Cluster holds per session.
    dtype, outbox = "float32", 1
    with RedisServer(appendonly=False, extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]) as srv:
        plain = srv.client()
        plain.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        from devtools.services import wait_for
        wait_for(lambda: plain.cluster("info").get("cluster_state") == "ok", 20,
                 what="a one-node cluster")
        client = redis.cluster.RedisCluster(host="127.0.0.1", port=srv.port)
        ckeys = Keys("gru", model_id, "gru-worker", cluster=True)
        pop = Populator(client, ckeys, dims, dtype, outbox, "tokens", partitions=64)
        base = plain.info("memory")["used_memory"]
        row = {"dtype": dtype, "outbox": outbox, "partitions": 64, "points": [],
               "value_bytes": len(state_values(np.random.default_rng(0), 1, dims, dtype,
                                               outbox)[0]),
               "key_bytes": len(ckeys.session(SESSION_ID.format(0), ("tokens", 0)))}
        done = 0
        for n in cluster_sizes:
            pop.write(range(done, n))
            done = n
            sample = [ckeys.session(SESSION_ID.format(i), pop.partition(i))
                      for i in random.Random(n).sample(range(n), min(n, 1000))]
            row["points"].append(memory_point(plain, base, n, sample))
            common.log(f"  cluster {dtype} outbox {outbox}: {n} sessions, "
                f"{row['points'][-1]['bytes_per_session']} B/session")
        client.close()
        plain.close()
    out["cluster"].append(row)
    out["value_layout"] = {"header": HEADER.size, "outbox_entry_fixed": OUTBOX_ENTRY.size}
    return out


# --- the worker with 1k vs 1M live sessions ------------------------------------------------

def continuing_stream(ids: list[int], per_session: int, tokens: int, seed: int,
                      encode=None) -> list[tuple[bytes, bytes]]:
    """Records for sessions ``SESSION_ID.format(i)`` that continue a state at seq 0:
    ``per_session`` messages each, seq 1, 2, ..., K tokens each, interleaved at random."""
    from devtools.streams import even_sessions
    from worker.client import interleave
    shapes = even_sessions(min(len(ids), 2000), tokens, per_session, seed, "x")
    streams = []
    for n, i in enumerate(ids):
        sid = SESSION_ID.format(i)
        body = []
        for j, chunk in enumerate(shapes[n % len(shapes)].chunks):
            m = {"session_id": sid, "seq": j + 1}
            if encode is not None:
                m["token_ids"] = encode(chunk)
            else:
                m["tokens"] = chunk
            body.append(m)
        streams.append(body)
    return [(m["session_id"].encode(), json.dumps(m, separators=(",", ":")).encode())
            for m in interleave(streams, seed)]


def input_bytes_per_token(tokens: int, encode=None, n: int = 2000) -> float:
    """Bytes one more token adds to an input record: mean record size at 2K and K tokens."""
    size = lambda k: np.mean([len(a) + len(b) for a, b in  # noqa: E731
                              continuing_stream(list(range(n)), 1, k, 5, encode)])
    return round(float(size(2 * tokens) - size(tokens)) / tokens, 2)


def output_sizes(bootstrap: str, topic: str, n: int = 2000) -> float:
    """Mean value + key bytes of the first ``n`` records of ``topic`` (uncompressed)."""
    from kafka import KafkaConsumer
    c = KafkaConsumer(bootstrap_servers=[bootstrap], auto_offset_reset="earliest",
                      enable_auto_commit=False, consumer_timeout_ms=3000)
    sizes: list[int] = []
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + 15
        while len(sizes) < n and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=500, max_records=n).values():
                sizes += [len(r.value) + len(r.key or b"") for r in recs]
    finally:
        c.close()
    return round(float(np.mean(sizes)), 1) if sizes else float("nan")


def measure_worker(bench: Bench, model_dir: Path, clf, args) -> list[dict]:
    from bench.throughput import run_worker
    from worker.state import Keys
    cfg = clf.model.config
    dims = (cfg.num_layers, cfg.state_size, cfg.num_labels)
    enc = clf.encode if args.ids else None
    client = bench.redis.client()
    big = args.live_sessions
    order = random.Random(7).sample(range(big), big)  # disjoint draws from the 1M
    taken = 0
    runs = []

    def populate(namespace: str, n: int) -> None:
        keys = Keys("gru", clf.model_id, namespace)
        t0 = time.perf_counter()
        Populator(client, keys, dims, "float32", 1, "populate").write(range(n))
        common.log(f"  populated {n} sessions in {time.perf_counter() - t0:.1f}s "
            f"(dbsize {client.dbsize()})")

    def one(case: str, namespace: str, ids: list[int], per: int, seed: int) -> None:
        names = bench.fresh(f"c{case}")
        pairs = continuing_stream(ids, per, args.tokens, seed, enc)[:args.messages]
        bench.backlog(names, pairs)
        net0 = client.info("stats")
        r = run_worker(bench, model_dir, names, len(pairs), args.batch, 0, 1,
                       redis={"url": bench.redis.url, "prefix": "gru"},
                       state={"namespace": namespace})
        net1 = client.info("stats")
        r.update(case=case, keys_in_redis=client.dbsize(), distinct_sessions=len(ids),
                 messages_per_session=per,
                 input_bytes_per_msg=round(float(np.mean([len(k) + len(v) for k, v in pairs])), 1),
                 output_bytes_per_msg=output_sizes(bench.kafka.bootstrap, names["out"]),
                 redis_net_in_per_msg=round((net1["total_net_input_bytes"]
                                             - net0["total_net_input_bytes"]) / len(pairs), 1),
                 redis_net_out_per_msg=round((net1["total_net_output_bytes"]
                                              - net0["total_net_output_bytes"]) / len(pairs), 1))
        runs.append(r)
        common.log(f"  {case}: {r['msgs_per_s']:.0f} msg/s, batch p99 "
            f"{r['stages'].get('batch', {}).get('p99_ms')} ms, outcomes {r['outcomes']}")

    per = -(-args.messages // 1000)
    for rnd in range(args.repeat):  # each round: a Redis of 1k keys, then one of 1M
        client.flushall()  # the private server of this bench only
        populate(f"small{rnd}", 1000)
        one("1k", f"small{rnd}", list(range(1000)), per, 10 + rnd)
        client.flushall()
        populate("big", big)
        ids = order[taken:taken + 1000]
        taken += 1000
        one("1M-same-shape", "big", ids, per, 20 + rnd)
        ids = order[taken:taken + args.messages]
        taken += args.messages
        one("1M-distinct", "big", ids, 1, 30 + rnd)
    client.close()
    return runs


# --- main ----------------------------------------------------------------------------------

def measure(args) -> int:
    import torch

    import model as model_pkg
    torch.set_num_threads(1)
    model_dir = common.resolve_model(args.model)
    clf = model_pkg.load(model_dir)
    cfg = clf.model.config
    dims = (cfg.num_layers, cfg.state_size, cfg.num_labels)
    res = {"model": {"dir": str(model_dir), "model_id": clf.model_id, "embed": cfg.embed_dim,
                     "hidden": cfg.hidden_size, "layers": cfg.num_layers,
                     "labels": cfg.num_labels, "vocab": len(clf.vocab)},
           "params": {k: v for k, v in vars(args).items() if k not in ("out", "func")}}
    with common.quiet_logs():
        if "m" in args.only:
            common.log("memory per session ...")
            res["memory"] = measure_memory(args.sizes, dims, clf.model_id, args.cluster_sizes)
        if "w" in args.only:
            common.log("worker with 1k vs 1M live sessions ...")
            with Bench(args.partitions) as bench:
                res["worker"] = measure_worker(bench, model_dir, clf, args)
            res["input_bytes_per_token"] = input_bytes_per_token(
                args.tokens, clf.encode if args.ids else None)
        if "r" in args.only:
            common.log("rebuild rate (bench.rebuild) ...")
            from bench import rebuild
            res["rebuild"] = rebuild.measure(args.rebuild_sessions, 2, model=str(model_dir))
    if args.merge:  # sections not measured in this run, from an earlier one (named in the result)
        earlier = json.loads(Path(args.merge).read_text())
        for section in ("memory", "worker", "rebuild", "input_bytes_per_token"):
            if section not in res and section in earlier:
                res[section] = earlier[section]
                res.setdefault("merged_from", {})[section] = {
                    "file": Path(args.merge).name, "date": earlier.get("date"),
                    "machine": earlier.get("machine")}
    path = common.write_result("capacity", res, args.out, with_clients=True)
    with contextlib.suppress(Exception):  # a partial run (--only) has no constants
        print(f"python -m worker plan uses worker.capacity.REFERENCE; to plan with this "
              f"measurement, give it --results {path}, or make it the reference (the fields "
              f"below; tests/test_sizing.py compares them with the newest result):\n"
              f"{capacity.Measured.load(path)}")
    return 0


def newest_result() -> Path:
    """The newest capacity result under bench/results, by the date measured (not mtime)."""
    found = sorted(common.RESULTS.glob("capacity-*.json"),
                   key=lambda p: json.loads(p.read_text()).get("date", ""))
    if not found:
        raise FileNotFoundError("no bench/results/capacity-*.json: run "
                                "python -m bench.capacity measure")
    return found[-1]


def table(args) -> int:
    """The docs' sizing table: 10k / 100k / 1M msg/s against 1M / 10M / 100M sessions."""
    m = capacity.REFERENCE if args.results is None else capacity.Measured.load(args.results)
    shape = None if args.model_dir is None else capacity.ModelShape.from_artifact(args.model_dir)
    print("| msg/s | sessions | partitions | worker processes (cores) | Redis shards "
          "(memory / CPU) | Redis used / resident GiB | fullest shard GiB | Kafka in / out "
          "MB/s | Redis MB/s | full rebuild h |")
    print("|" + "---:|" * 10)
    for rate in (10_000, 100_000, 1_000_000):
        for n in (1_000_000, 10_000_000, 100_000_000):
            pl = capacity.plan(capacity.Profile(msgs_per_s=rate, sessions=n, model=shape), m)
            print(f"| {rate:,} | {n:,} | {pl.partitions} | {pl.worker_processes} "
                  f"({pl.worker_cores:g}) | {pl.redis_shards} ({pl.redis_shards_for_memory} / "
                  f"{pl.redis_shards_for_cpu}) | {pl.redis_memory_gib:,.1f} / "
                  f"{pl.redis_rss_gib:,.1f} | {pl.shard_memory_gib:,.1f} | "
                  f"{rate * pl.kafka_in_bytes_per_msg / 1e6:,.1f} / "
                  f"{rate * pl.kafka_out_bytes_per_msg / 1e6:,.1f} | "
                  f"{rate * pl.redis_bytes_per_msg / 1e6:,.1f} | {pl.rebuild_hours:,.1f} |")
    return 0


def main(argv=None) -> int:
    ap = common.parser("capacity", __doc__)  # measure's options: it is the default command
    sub = ap.add_subparsers(dest="command")
    m = sub.add_parser("measure", help="measure on this machine (the default)")
    common.add_standard_options(m, "capacity")
    t = sub.add_parser("table", help="the sizing table of docs/capacity.md")
    t.add_argument("--results", default=None,
                   help="a capacity-*.json (default: worker.capacity.REFERENCE)")
    t.add_argument("--model-dir", default=None,
                   help="the model to size, an artifact (default: the measured model)")
    for a in (ap, m):
        a.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
        a.add_argument("--cluster-sizes", type=int, nargs="+", default=[10_000, 100_000])
        a.add_argument("--live-sessions", type=int, default=1_000_000)
        a.add_argument("--messages", type=int, default=30_000, help="per worker run")
        a.add_argument("--tokens", type=int, default=4, help="tokens per message")
        a.add_argument("--batch", type=int, default=512)
        a.add_argument("--partitions", type=int, default=4)
        a.add_argument("--repeat", type=int, default=2, help="rounds of the worker runs")
        a.add_argument("--rebuild-sessions", type=int, default=50_000)
        a.add_argument("--ids", action="store_true", help="send token_ids instead of tokens")
        a.add_argument("--only", default="mwr", help="m memory, w worker, r rebuild")
        a.add_argument("--merge", default=None,
                       help="an earlier capacity result: take the sections not in --only from it")
    args = ap.parse_args(argv)
    return table(args) if args.command == "table" else measure(args)


if __name__ == "__main__":
    sys.exit(main())
