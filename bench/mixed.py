"""CPU per token on a mixed-length workload against the uniform one (issue 26, F1).

Two workloads of the same number of records (``devtools.streams.mixed_sessions``):

* **uniform**: chat lines of 4-16 tokens, from ``--chat`` sessions, interleaved;
* **mixed**: the same chat lines with 1 % of the records (``--doc-share``) long documents
  of 1,024-4,096 tokens, one record each (a 4,096-token record is about 28 KB of JSON), at
  random places in the log.

Measured in one run, alternating uniform and mixed, each round on fresh state:

  (e) engine  ``Engine.apply`` on batches of ``--batch`` consecutive records, each session's
              state carried from batch to batch (steady state); process CPU per token,
              and each batch's wall time.
  (w) worker  the real worker, in this process, on a backlog of each workload pre-produced
              to tansu (a private redis-server for the states; ``bench.throughput.run_worker``);
              this process's CPU per token once the first batch is in.

The model is an artifact of the default recipe's shape with random weights
(``bench.common.shaped_model``: cost does not depend on the weights) unless ``--model``.

    python -m bench.mixed [--messages 20000] [--rounds 2] [--only ew]

Writes bench/results/mixed-<date>.json (``bench.common.write_result``) and prints each
round's CPU per token and the ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from bench import common


def workload(args, docs: bool, seed: int) -> list[tuple[bytes, bytes]]:
    """``--messages`` records: chat lines of ``--chat`` sessions, interleaved, or (``docs``)
    as many records with a share of documents at random places among them (fewer chat
    sessions making up the difference)."""
    import random

    from devtools.streams import mixed_sessions, pairs
    per = args.messages // args.chat
    n_docs = round(args.messages * args.doc_share) if docs else 0
    sessions = mixed_sessions((args.messages - n_docs) // per, per, n_docs, seed,
                              prefix=f"w{seed}-")
    records = pairs(sessions[:len(sessions) - n_docs], seed)
    rng = random.Random(seed)
    for doc in pairs(sessions[len(sessions) - n_docs:], seed):
        records.insert(rng.randrange(len(records) + 1), doc)
    return records


def run_engine(clf, records, batch: int) -> dict:
    from worker.engine import Engine
    from worker.messages import TokenMessage
    from worker.ports import Record

    engine = Engine(clf.model)
    msgs = []
    for off, (key, value) in enumerate(records):
        obj = json.loads(value)
        msgs.append(TokenMessage(obj["session_id"], obj["seq"], clf.encode(obj["tokens"]),
                                 obj.get("end", False), Record("in", 0, off, key, value, 0)))
    loaded: dict = {}
    cpu = wall = 0.0
    tokens, walls = 0, []
    for i in range(0, len(msgs), batch):
        part = msgs[i:i + batch]
        sids = {m.session_id for m in part}
        c0, t0 = time.process_time(), time.perf_counter()
        res = engine.apply(part, {s: loaded.get(s) for s in sids})
        c1, t1 = time.process_time(), time.perf_counter()
        cpu, wall = cpu + c1 - c0, wall + t1 - t0
        walls.append((t1 - t0) * 1000)
        tokens += res.tokens
        loaded.update((u.session_id, u.value) for u in res.updates)
    return {"messages": len(msgs), "tokens": tokens, "cpu_s": round(cpu, 3),
            "cpu_us_per_token": round(cpu / tokens * 1e6, 3),
            "cpu_us_per_msg": round(cpu / len(msgs) * 1e6, 2),
            "batch_ms_p50": round(statistics.median(walls), 2),
            "batch_ms_max": round(max(walls), 2)}


def run_worker(bench, model_dir, records, batch: int, threads: int) -> dict:
    from bench.throughput import run_worker as worker
    names = bench.fresh("mx")
    bench.backlog(names, records)
    r = worker(bench, model_dir, names, len(records), batch, 0, threads)
    cpu_s = r["cpu"]["bench_process"]["cpu_us_per_msg"] * r["messages"] / 1e6
    r["cpu_us_per_token"] = round(cpu_s / max(r["tokens"], 1) * 1e6, 3)
    return r


def main(argv=None) -> int:
    ap = common.parser("mixed", __doc__, model="random weights in the default recipe's shape")
    ap.add_argument("--messages", type=int, default=20000, help="records per workload")
    ap.add_argument("--chat", type=int, default=1000, help="chat sessions")
    ap.add_argument("--doc-share", type=float, default=0.01, help="share of long documents")
    ap.add_argument("--batch", type=int, default=512, help="records per batch (the worker's "
                    "batch.max_records; its latency budget applies as configured)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--only", default="ew", help="e: engine, w: worker")
    args = ap.parse_args(argv)

    import torch

    import model as model_pkg
    torch.set_num_threads(args.threads)
    model_dir = common.shaped_model() if args.model is None else common.resolve_model(args.model)
    clf = model_pkg.load(model_dir)
    cfg = clf.model.config
    loads = {"uniform": workload(args, False, 1), "mixed": workload(args, True, 2)}
    res = {"model": {"dir": str(model_dir), "model_id": clf.model_id,
                     "shaped_random_weights": args.model is None, "embed": cfg.embed_dim,
                     "hidden": cfg.hidden_size, "mean_dim": cfg.mean_dim,
                     "vocab": len(clf.vocab)},
           "params": {k: v for k, v in vars(args).items() if k != "out"},
           "records": {k: len(v) for k, v in loads.items()}, "rounds": []}

    def show(kind, rnd, name, r):
        print(f"round {rnd} {kind} {name:<8} {r['cpu_us_per_token']:8.2f} us CPU/token "
              f"({r['tokens']} tokens)", flush=True)

    if "e" in args.only:
        for rnd in range(1, args.rounds + 1):
            for name, records in loads.items():
                r = run_engine(clf, records, args.batch)
                res["rounds"].append({"kind": "engine", "round": rnd, "workload": name, **r})
                show("engine", rnd, name, r)
    if "w" in args.only:
        with common.quiet_logs(), common.Bench(args.partitions) as bench:
            for rnd in range(1, args.rounds + 1):
                for name, records in loads.items():
                    r = run_worker(bench, model_dir, records, args.batch, args.threads)
                    res["rounds"].append({"kind": "worker", "round": rnd, "workload": name,
                                          **r})
                    show("worker", rnd, name, r)
    res["ratios"] = {}
    for kind in ("engine", "worker"):
        per = {w: [r["cpu_us_per_token"] for r in res["rounds"]
                   if r["kind"] == kind and r["workload"] == w] for w in loads}
        if per["uniform"] and per["mixed"]:
            ratio = statistics.median(per["mixed"]) / statistics.median(per["uniform"])
            res["ratios"][f"{kind}_mixed_vs_uniform_cpu_per_token"] = round(ratio, 3)
            print(f"{kind}: mixed / uniform CPU per token = {ratio:.2f} (medians of "
                  f"{len(per['mixed'])} rounds)")
    common.write_result("mixed", res, args.out, with_clients="w" in args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
