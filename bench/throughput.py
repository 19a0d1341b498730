"""Throughput of the streaming worker against real local services, with its baselines.

One invocation starts a tansu broker and a private redis-server, then measures, for
S sessions x K tokens/message, each on a backlog produced before it starts (so each measures
consume capacity; the group join is excluded), for each Kafka client (``--clients``,
kafka-python and confluent-kafka by default), so that each client's worker stands beside its
own floor in the same run:

  (a)  passthrough  consume -> produce -> wait for the acks -> commit, per poll batch: the
                    client's pass-through (``bench.common.PASS_THROUGHS``) with the worker's
                    consumer settings and the client's own producer (linger 2 ms);
  (a')              the same with the worker's producer settings (linger, batch bytes and
                    compression from the worker's defaults);
  (b)  naive        per message: Redis GET, model step (batch 1), Redis SET, produce;
                    flush + commit per poll batch (a generous naive loop; (a)'s kafka-python
                    consumer and producer);
  (c)  worker       the real worker, in-process, with that client, for each --batch value.
                    Its per-stage times come from its own histograms (gru_*_seconds), read
                    from its registry between the first polled batch and the end.

Latency at fixed rates is ``python -m bench.latency``.

    python -m bench.throughput [--sessions 1000] [--tokens 4] [--only abc]
        [--clients kafka-python confluent] ...

Writes bench/results/throughput-<date>.json (``bench.common.write_result``) and prints a
table per client with the ratios to its own floor.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from pathlib import Path

from bench import common
from bench.common import Bench, Cpu

# --- (a) and (a') pass-through --------------------------------------------------------------

def run_passthrough(bench: Bench, names: dict, n: int, batch: int, client: str,
                    worker_producer: bool) -> dict:
    """``common.PASS_THROUGHS[client]`` over a backlog of ``n`` records. The clock starts
    once its first batch is through (the group join and the first fetch left out); the
    records counted are those after it."""
    pt = common.PASS_THROUGHS[client](bench.kafka.bootstrap, names["in"], names["out"],
                                      f"pt-{uuid.uuid4().hex[:6]}", worker_producer)
    deadline = time.monotonic() + 120
    try:
        first = 0
        while not first and time.monotonic() < deadline:
            first = pt.step(batch)
        t0, cpu0 = time.perf_counter(), bench.cpu.snapshot()
        done = batches = 0
        while first + done < n and time.monotonic() < deadline:
            got = pt.step(batch)
            done += got
            batches += bool(got)
        secs = time.perf_counter() - t0
        cpu1 = bench.cpu.snapshot()
    finally:
        pt.close()
    return {"client": client, "messages": done, "seconds": secs, "msgs_per_s": done / secs,
            "worker_producer": worker_producer, "producer": pt.producer_settings,
            "batches": batches, "mean_batch": done / max(batches, 1),
            "cpu": Cpu.usage(cpu0, cpu1, secs, done)}


# --- (b) naive per-message loop ------------------------------------------------------------

def run_naive(bench: Bench, names: dict, clf, seconds: float, batch: int) -> dict:
    import redis
    import torch

    from worker.codec import (
        PosKind,
        SessionState,
        decode_state,
        encode_state,
        token_digest,
    )
    from worker.messages import Prediction, encode_prediction
    from worker.ports import Record

    cfg = clf.model.config
    L, H, C = cfg.num_layers, cfg.state_size, cfg.num_labels
    r = redis.Redis.from_url(bench.redis.url)
    prefix = f"naive-{uuid.uuid4().hex[:6]}"
    # (a)'s consumer and producer, with per-message work between the poll and the send
    pt = common.KafkaPythonPassThrough(bench.kafka.bootstrap, names["in"], names["out"],
                                       f"nv-{uuid.uuid4().hex[:6]}", worker_producer=False)
    c, p = pt.consumer, pt.producer
    model = clf.model.eval()
    done = tokens = 0
    t_first, cpu0 = None, {}
    try:
        with torch.inference_mode():
            while True:
                polled = c.poll(timeout_ms=200, max_records=batch)
                if not polled:
                    if t_first is not None:
                        break
                    continue
                if t_first is None:
                    t_first, cpu0 = time.perf_counter(), bench.cpu.snapshot()
                for tp, recs in polled.items():
                    for rec in recs:
                        obj = json.loads(rec.value)
                        sid = obj["session_id"]
                        ids = obj["token_ids"] if "token_ids" in obj else clf.encode(obj["tokens"])
                        key = f"{prefix}:{sid}"
                        raw = r.get(key)                                    # GET
                        st = decode_state(raw, L, H, C, with_outbox=False) if raw else None
                        h0 = torch.from_numpy(st.h).unsqueeze(1) if st else torch.zeros(L, 1, H)
                        h1, probs = model.step(h0, torch.tensor([ids]),     # step, batch 1
                                               torch.tensor([len(ids)]))
                        pr = tuple(probs[0].tolist())
                        seen = (st.tokens_seen if st else 0) + len(ids)
                        new = SessionState(h1[:, 0].numpy(), obj["seq"], PosKind.SEQ, seen,
                                           (st.messages if st else 0) + 1)
                        token_digest(ids, False)  # what an outbox entry costs, for fairness
                        r.set(key, encode_state(new, C), px=86_400_000)     # SET
                        pred = Prediction(sid, obj["seq"], pr, seen, False,
                                          Record(tp.topic, tp.partition, rec.offset, rec.key,
                                                 rec.value, rec.timestamp))
                        p.send(names["out"], key=rec.key,                    # produce
                               value=encode_prediction(pred, clf.labels, clf.model_id))
                        done += 1
                        tokens += len(ids)
                p.flush()
                pt.commit(polled)                                           # commit per poll
                if time.perf_counter() - t_first >= seconds:
                    break
        secs = time.perf_counter() - t_first
        cpu1 = bench.cpu.snapshot()
    finally:
        pt.close()
        with contextlib.suppress(Exception):
            keys = list(r.scan_iter(f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 1000):
                r.delete(*keys[i:i + 1000])
        r.close()
    return {"messages": done, "seconds": secs, "msgs_per_s": done / secs,
            "tokens_per_s": tokens / secs, "commit": "per poll batch (flush first)",
            "cpu": Cpu.usage(cpu0, cpu1, secs, done)}


# --- (c) the real worker -------------------------------------------------------------------

def run_worker(bench: Bench, model_dir: Path, names: dict, n: int, batch: int, max_wait_ms: int,
               threads: int, target_latency_ms: float | None = None,
               client: str = "kafka-python", **settings) -> dict:
    from prometheus_client import CollectorRegistry

    from worker.app import build_worker

    s = common.worker_settings(bench, model_dir, names, batch, max_wait_ms, threads,
                               max_messages=n, kafka={"client": client}, **settings)
    if target_latency_ms is not None:
        s.batch.target_latency_ms = target_latency_ms
    app = build_worker(s, CollectorRegistry())
    w, reg = app.worker, app.registry
    mark: dict = {}

    def first_batch() -> None:  # steady state: after the group join
        mark.update(t0=time.perf_counter(), cpu0=bench.cpu.snapshot(),
                    stages0=common.stages_snapshot(reg), done0=w.summary.messages,
                    tokens0=w.summary.tokens)

    w.source = w.intake.source = common.FirstPoll(w.source, first_batch)  # Intake polls
    try:
        summary = w.run()
    finally:
        app.close()
    t_end, cpu1 = time.perf_counter(), bench.cpu.snapshot()
    secs = t_end - mark["t0"]
    done = summary.messages - mark["done0"]
    stages = common.stage_report(mark["stages0"], common.stages_snapshot(reg))
    batches = stages.get("batch", {}).get("calls", 0)
    return {"client": client, "batch_max_records": batch, "max_wait_ms": max_wait_ms,
            "target_latency_ms": s.batch.target_latency_ms, "messages": done,
            "seconds": secs, "msgs_per_s": done / secs, "tokens_per_s": summary.tokens / secs,
            "tokens": summary.tokens - mark["tokens0"],
            "batches": batches, "mean_batch": done / max(batches, 1), "outcomes": summary.outcomes,
            "stages": stages, "cpu": Cpu.usage(mark["cpu0"], cpu1, secs, done)}


# --- main ----------------------------------------------------------------------------------

def print_table(res: dict, tokens: int) -> dict:
    """One table per client: its floor, the naive loop, its worker; ratios to its own floor."""
    R = res["results"]
    nv = R.get("naive", {}).get("msgs_per_s")
    ratios: dict = {}
    for client, C in R.get("clients", {}).items():
        rows = []
        pt = C.get("passthrough", {}).get("msgs_per_s")
        pt2 = C.get("passthrough_worker_producer", {}).get("msgs_per_s")
        if pt:
            rows.append(("(a) pass-through consume->produce", pt, C["passthrough"]))
        if pt2:
            rows.append(("(a') pass-through, the worker's producer", pt2,
                         C["passthrough_worker_producer"]))
        if nv and client == "kafka-python":
            rows.append(("(b) naive per-message loop", nv, R["naive"]))
        for r in C.get("worker", []):
            rows.append((f"(c) worker max_records={r['batch_max_records']} budget="
                         f"{r.get('target_latency_ms', 0):g}ms (mean batch {r['mean_batch']:.0f})",
                         r["msgs_per_s"], r))
        print(f"\n== {client}\n{'measurement':<58} {'msgs/s':>9} {'tokens/s':>10} "
              f"{'CPU us/msg':>10}")
        for name, m, r in rows:
            cpu = r.get("cpu", {}).get("bench_process", {}).get("cpu_us_per_msg", float("nan"))
            print(f"{name:<58} {m:>9.0f} {m * tokens:>10.0f} {cpu:>10.1f}")
        mine = ratios[client] = {}
        best = max((r["msgs_per_s"] for r in C.get("worker", [])), default=None)
        if best and nv:
            mine["worker_vs_naive"] = best / nv
        if best and pt:
            mine["worker_vs_passthrough"] = best / pt
        if best and pt2:
            mine["worker_vs_passthrough_worker_producer"] = best / pt2
        for k, v in mine.items():
            print(f"{k:<40} {v:.2f}")
        for r in C.get("worker", []):
            print(f"worker max_records={r['batch_max_records']} budget "
                  f"{r.get('target_latency_ms', 0):g} ms: stage  mean ms  p99 ms  share of wall")
            for stage, v in r["stages"].items():
                print(f"  {stage:<12} {v['mean_ms']:>8.3f} {v['p99_ms']:>7.2f} "
                      f"{v['seconds'] / r['seconds']:>8.1%}")
    workers = {c: max((r["msgs_per_s"] for r in C.get("worker", [])), default=None)
               for c, C in R.get("clients", {}).items()}
    if workers.get("confluent") and workers.get("kafka-python"):
        ratios["worker_confluent_vs_kafka_python"] = workers["confluent"] / workers["kafka-python"]
        print(f"\nworker, confluent / kafka-python: {ratios['worker_confluent_vs_kafka_python']:.2f}")
    return ratios


def main(argv=None) -> int:
    ap = common.parser("throughput", __doc__)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=4, help="tokens per message (K)")
    ap.add_argument("--messages", type=int, default=30000, help="input messages for (c)")
    ap.add_argument("--passthrough-messages", type=int, default=60000)
    ap.add_argument("--naive-seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, nargs="+", default=[512, 1024],
                    help="worker batch.max_records values for (c)")
    ap.add_argument("--max-wait-ms", type=int, default=0, help="worker batch.max_wait_ms")
    ap.add_argument("--target-latency-ms", type=float, nargs="+", default=[None],
                    help="worker batch.target_latency_ms values for (c) (default: the worker's; "
                         "0: no budget)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (worker and naive)")
    ap.add_argument("--ids", action="store_true", help="send token_ids instead of tokens")
    ap.add_argument("--only", default="abc", help="subset of measurements, e.g. 'ac'")
    ap.add_argument("--clients", nargs="+", default=list(common.CLIENTS), choices=common.CLIENTS,
                    help="Kafka clients for (a), (a') and (c), each against its own floor")
    args = ap.parse_args(argv)

    import torch

    import model as model_pkg
    torch.set_num_threads(args.threads)
    model_dir = common.resolve_model(args.model)
    clf = model_pkg.load(model_dir)
    cfg = clf.model.config
    enc = clf.encode if args.ids else None
    res = {"model": {"dir": str(model_dir), "model_id": clf.model_id, "embed": cfg.embed_dim,
                     "hidden": cfg.hidden_size, "layers": cfg.num_layers, "vocab": len(clf.vocab)},
           "params": {k: v for k, v in vars(args).items() if k != "out"},
           "torch_threads": torch.get_num_threads(), "results": {}}
    R = res["results"]
    with common.quiet_logs(), Bench(args.partitions) as bench:
        common.log(f"tansu {bench.kafka.bootstrap}, redis {bench.redis.url}, model {model_dir} "
                   f"(E={cfg.embed_dim} H={cfg.hidden_size} L={cfg.num_layers})")

        def backlog(tag: str, n: int, seed: int) -> dict:
            names = bench.fresh(tag)
            bench.backlog(names, common.stream(args.sessions, args.tokens, n, seed, f"{tag}-", enc))
            return names

        R["clients"] = {c: {} for c in args.clients}
        if "a" in args.only:
            n = args.passthrough_messages
            for client, C in R["clients"].items():
                for key, tag, worker_producer, what in (
                        ("passthrough", "pt", False, "(a) pass-through"),
                        ("passthrough_worker_producer", "ptw", True,
                         "(a') pass-through with the worker's producer settings")):
                    common.log(f"{what}, {client} ...")
                    C[key] = run_passthrough(bench, backlog(tag, n, 1), n, max(args.batch),
                                             client, worker_producer)
                    common.log(f"  {C[key]['msgs_per_s']:.0f} msg/s")
        if "b" in args.only:
            common.log("(b) naive per-message loop ...")
            names = backlog("nv", int(args.naive_seconds * 1500) + 2000, 2)
            R["naive"] = run_naive(bench, names, clf, args.naive_seconds, 512)
            common.log(f"  {R['naive']['msgs_per_s']:.0f} msg/s")
        if "c" in args.only:
            runs = [(b, t) for b in args.batch for t in args.target_latency_ms]
            for client, C in R["clients"].items():
                C["worker"] = []
                for i, (b, t) in enumerate(runs):
                    common.log(f"(c) worker, {client}, batch.max_records={b} "
                               f"target_latency_ms={t} ...")
                    names = backlog(f"w{b}", args.messages, 3 + i)
                    r = run_worker(bench, model_dir, names, args.messages, b, args.max_wait_ms,
                                   args.threads, t, client=client)
                    C["worker"].append(r)
                    common.log(f"  {r['msgs_per_s']:.0f} msg/s, mean batch {r['mean_batch']:.0f}")
    res["ratios"] = print_table(res, args.tokens)
    common.write_result("throughput", res, args.out, with_clients=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
