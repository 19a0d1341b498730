"""Throughput and latency benchmark of the streaming worker against real local services.

One invocation starts a tansu broker and a private redis-server (appendonly off; the shared
Redis at 127.0.0.1:6379 is never touched), then measures, for S sessions x K tokens/message:

  (a) passthrough  kafka-python consume -> produce loop, flush + commit per poll batch
                   (producer linger 2 ms / 16 KiB batches, as in the first series), and
  (a')             the same with the worker's producer settings (linger 50 ms / 256 KiB;
                   --no-passthrough-worker-producer skips it)
  (b) naive        per message: Redis GET, model.step (batch 1), Redis SET, produce;
                   flush + commit per poll batch (the generous variant of a naive loop)
  (c) worker       worker.app.build_worker(Settings(...)).worker.run(), in-process, for
                   each --batch value; per-stage wall time from wrappers on the worker's
                   own methods (no source change)
  (d) latency      the worker fed at --latency-fraction x the best (c) rate by a paced
                   producer process; a second process consumes the predictions topic and
                   e2e = prediction arrival - send time of the input message

Input for (a)-(c) is produced before the consumer starts (fresh topics, groups and Redis
prefix per measurement), so they measure consume capacity. Rates are counted from the first
polled batch to the last processed one (the group join, ~3 s on tansu, is excluded).

Usage:  .venv/bin/python bench/throughput.py [--sessions 1000] [--tokens 4] ...
Writes bench/results/throughput-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SESSION_TIMEOUT_MS, HEARTBEAT_MS = 6000, 1000  # tansu joins take ~session_timeout/2


# --- input ---------------------------------------------------------------------------------

def make_stream(n_sessions: int, k: int, n_messages: int, seed: int, prefix: str,
                ids: bool, encode=None) -> list[tuple[bytes, bytes]]:
    """n_messages (key, value) pairs: n_sessions BBC articles cut into K-token messages,
    interleaved at random while keeping each session's order (seq 0, 1, ...)."""
    from model.data import load_bbc
    from model.tokenizer import tokenize

    rng = random.Random(seed)
    docs = load_bbc()
    per = -(-n_messages // n_sessions)
    chosen = rng.sample(docs, min(n_sessions, len(docs)))
    while len(chosen) < n_sessions:
        chosen.append(rng.choice(docs))
    sessions = []
    for i, d in enumerate(chosen):
        toks = tokenize(d.text)
        need = per * k
        toks = (toks * (need // max(len(toks), 1) + 1))[:need]  # wrap short articles
        sessions.append((f"{prefix}{i}", [toks[j * k:(j + 1) * k] for j in range(per)]))
    cursors = [0] * n_sessions
    live = list(range(n_sessions))
    out = []
    while len(out) < n_messages and live:
        at = rng.randrange(len(live))
        i = live[at]
        sid, chunks = sessions[i]
        seq = cursors[i]
        body = {"session_id": sid, "seq": seq}
        if ids:
            body["token_ids"] = encode(chunks[seq])
        else:
            body["tokens"] = chunks[seq]
        out.append((sid.encode(), json.dumps(body, separators=(",", ":")).encode()))
        cursors[i] += 1
        if cursors[i] == per:
            live[at] = live[-1]
            live.pop()
    return out


def produce_all(bootstrap: str, topic: str, pairs) -> float:
    from kafka import KafkaProducer

    t0 = time.perf_counter()
    p = KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=20,
                      batch_size=256 * 1024, max_in_flight_requests_per_connection=5)
    for key, value in pairs:
        p.send(topic, key=key, value=value)
    p.flush()
    p.close()
    return len(pairs) / (time.perf_counter() - t0)


# --- helpers -------------------------------------------------------------------------------

_TCK = os.sysconf("SC_CLK_TCK")
CPU_PIDS: dict[str, int] = {}  # name -> pid of the processes whose CPU time is reported


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds (user + system, all threads) of this process and the services so far."""
    out = {}
    for name, pid in {"bench_process": os.getpid(), **CPU_PIDS}.items():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / _TCK
    with contextlib.suppress(OSError, ValueError):  # every process on the machine, ours or not
        v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
        out["whole_machine"] = (sum(v) - v[3] - v[4]) / _TCK
    return out


def cpu_usage(before, after, seconds, n) -> dict:
    """Per process: share of one core used, and CPU microseconds per message."""
    return {k: {"cores": round((after[k] - before[k]) / seconds, 2),
                "cpu_us_per_msg": round((after[k] - before[k]) / max(n, 1) * 1e6, 1)}
            for k in before if k in after}


def pct(values, q):
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


class Stage:
    """Accumulated wall time of one wrapped callable."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def consumer_for(bootstrap, topic, group, **kw):
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=group, enable_auto_commit=False,
                      auto_offset_reset="earliest", session_timeout_ms=SESSION_TIMEOUT_MS,
                      heartbeat_interval_ms=HEARTBEAT_MS, fetch_max_wait_ms=20, **kw)
    c.subscribe([topic])
    return c


def producer_for(bootstrap, linger_ms=2, **kw):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=linger_ms,
                         enable_idempotence=False, **kw)


def commit_batch(consumer, polled):
    from kafka.structs import OffsetAndMetadata

    consumer.commit({tp: OffsetAndMetadata(recs[-1].offset + 1, "", -1)
                     for tp, recs in polled.items() if recs})


# --- (a) pass-through ----------------------------------------------------------------------

def run_passthrough(bootstrap, topic_in, topic_out, n, batch, linger_ms=2, batch_bytes=None):
    c = consumer_for(bootstrap, topic_in, f"pt-{uuid.uuid4().hex[:6]}")
    p = producer_for(bootstrap, linger_ms, **({"batch_size": batch_bytes} if batch_bytes else {}))
    done, t_first, batches = 0, None, 0
    deadline = time.monotonic() + 120
    try:
        while done < n and time.monotonic() < deadline:
            polled = c.poll(timeout_ms=200, max_records=batch)
            if not polled:
                continue
            if t_first is None:
                t_first, cpu0 = time.perf_counter(), cpu_snapshot()
            for recs in polled.values():
                for r in recs:
                    p.send(topic_out, key=r.key, value=r.value)
                done += len(recs)
            p.flush()
            commit_batch(c, polled)
            batches += 1
        secs = time.perf_counter() - t_first
        cpu1 = cpu_snapshot()
    finally:
        c.close(autocommit=False)
        p.close()
    return {"messages": done, "seconds": secs, "msgs_per_s": done / secs,
            "linger_ms": linger_ms, "producer_batch_bytes": batch_bytes or 16384,
            "batches": batches, "mean_batch": done / max(batches, 1),
            "cpu": cpu_usage(cpu0, cpu1, secs, done)}


# --- (b) naive per-message loop ------------------------------------------------------------

def run_naive(bootstrap, topic_in, topic_out, redis_url, clf, seconds, batch, k):
    import redis
    import torch

    from worker.messages import Prediction, Record, encode_prediction
    from worker.state import PosKind, SessionState, decode_state, encode_state

    cfg = clf.model.config
    L, H, C = cfg.num_layers, cfg.hidden_size, cfg.num_labels
    r = redis.Redis.from_url(redis_url)
    prefix = f"naive-{uuid.uuid4().hex[:6]}"
    c = consumer_for(bootstrap, topic_in, f"nv-{uuid.uuid4().hex[:6]}")
    p = producer_for(bootstrap)
    model = clf.model.eval()
    done = tokens = 0
    t_first = None
    try:
        with torch.inference_mode():
            while True:
                polled = c.poll(timeout_ms=200, max_records=batch)
                if not polled:
                    if t_first is not None:
                        break
                    continue
                if t_first is None:
                    t_first, cpu0 = time.perf_counter(), cpu_snapshot()
                for tp, recs in polled.items():
                    for rec in recs:
                        obj = json.loads(rec.value)
                        sid = obj["session_id"]
                        ids = obj["token_ids"] if "token_ids" in obj else clf.encode(obj["tokens"])
                        key = f"{prefix}:{sid}"
                        raw = r.get(key)                                    # GET
                        st = decode_state(raw, L, H, C) if raw else None
                        h0 = torch.from_numpy(st.h).unsqueeze(1) if st else torch.zeros(L, 1, H)
                        h1, probs = model.step(h0, torch.tensor([ids]),     # step, batch 1
                                               torch.tensor([len(ids)]))
                        pr = tuple(probs[0].tolist())
                        seen = (st.tokens_seen if st else 0) + len(ids)
                        new = SessionState(h1[:, 0].numpy(), obj["seq"], PosKind.SEQ, seen,
                                           (st.messages if st else 0) + 1)
                        r.set(key, encode_state(new, C), px=86_400_000)     # SET
                        pred = Prediction(sid, obj["seq"], pr, seen, False,
                                          Record(tp.topic, tp.partition, rec.offset, rec.key,
                                                 rec.value, rec.timestamp))
                        p.send(topic_out, key=rec.key,                       # produce
                               value=encode_prediction(pred, clf.labels, clf.model_id))
                        done += 1
                        tokens += len(ids)
                p.flush()
                commit_batch(c, polled)                                     # commit per poll
                if time.perf_counter() - t_first >= seconds:
                    break
        secs = time.perf_counter() - t_first
        cpu1 = cpu_snapshot()
    finally:
        c.close(autocommit=False)
        p.close()
        with contextlib.suppress(Exception):
            keys = list(r.scan_iter(f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 1000):
                r.delete(*keys[i:i + 1000])
        r.close()
    return {"messages": done, "seconds": secs, "msgs_per_s": done / secs,
            "tokens_per_s": tokens / secs, "commit": "per poll batch (flush first)",
            "cpu": cpu_usage(cpu0, cpu1, secs, done)}


# --- (c) the real worker -------------------------------------------------------------------

LINGER_MS = None  # None: the Settings default (kafka.linger_ms)


def worker_settings(bootstrap, redis_url, model_dir, names, batch, max_wait_ms, threads, **extra):
    from worker.config import Settings

    s = {"kafka": {"bootstrap_servers": bootstrap, "input_topic": names["in"],
                   "output_topic": names["out"], "dlq_topic": names["dlq"],
                   "group_id": names["group"], "session_timeout_ms": SESSION_TIMEOUT_MS,
                   "heartbeat_interval_ms": HEARTBEAT_MS,
                   **({} if LINGER_MS is None else {"linger_ms": LINGER_MS})},
         "redis": {"url": redis_url, "prefix": names["prefix"]},
         "model": {"dir": str(model_dir), "threads": threads},
         "batch": {"max_records": batch, "max_wait_ms": max_wait_ms},
         "metrics": {"host": "127.0.0.1", "port": 0},
         "log_level": "WARNING", "idle_exit_s": 15.0}
    s.update(extra)
    return Settings(**s)


def instrument(worker):
    """Wrap the worker's stage methods (instance attributes; the classes are untouched)."""
    st = defaultdict(Stage)
    w = worker
    w.source.poll = st["kafka_poll"].wrap(w.source.poll)
    w.source.commit = st["kafka_commit"].wrap(w.source.commit)
    w.sink.deliver = st["kafka_produce_flush"].wrap(w.sink.deliver)
    w._decode = st["decode_json"].wrap(w._decode)
    w._load = st["redis_mget"].wrap(w._load)
    w.engine.apply = st["engine_apply"].wrap(w.engine.apply)
    w._write = st["redis_lua_write"].wrap(w._write)
    w._outgoing = st["encode_predictions"].wrap(w._outgoing)
    w._account = st["metrics_account"].wrap(w._account)
    batches = []  # (start, end, n)
    orig = w.process
    step = {"seconds": 0.0}
    orig_apply = w.engine.apply

    def apply(*a, **kw):
        res = orig_apply(*a, **kw)
        step["seconds"] += res.step_seconds
        return res
    w.engine.apply = apply

    cpu = {}

    def process(records):
        t0 = time.perf_counter()
        if not batches:  # steady state starts now: forget the group-join polls
            for v in st.values():
                v.seconds, v.calls = 0.0, 0
            step["seconds"] = 0.0
            cpu["first"] = cpu_snapshot()
        orig(records)
        batches.append((t0, time.perf_counter(), len(records)))
        cpu["last"] = cpu_snapshot()
    w.process = process
    return st, batches, step, cpu


def run_worker(bootstrap, redis_url, model_dir, names, n, batch, max_wait_ms, threads,
               profile=None):
    from prometheus_client import CollectorRegistry

    from worker.app import build_worker

    settings = worker_settings(bootstrap, redis_url, model_dir, names, batch, max_wait_ms,
                               threads, max_messages=n)
    app = build_worker(settings, CollectorRegistry())
    st, batches, step, cpu = instrument(app.worker)
    spy = None
    try:
        if profile:  # py-spy attaches once the first batch arrives (after the group join)
            def attach():
                while not batches:
                    time.sleep(0.05)
                return subprocess.Popen([profile["py_spy"], "record", "--pid", str(os.getpid()),
                                         "--rate", "200", "--format", profile["format"],
                                         "--output", profile["out"], "--nonblocking",
                                         "--duration", str(profile["seconds"])],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            holder = {}
            t = threading.Thread(target=lambda: holder.setdefault("p", attach()), daemon=True)
            t.start()
        summary = app.worker.run()
        if profile:
            t.join(5)
            spy = holder.get("p")
            if spy is not None:
                spy.wait(profile["seconds"] + 30)
    finally:
        app.close()
    t_first, t_last = batches[0][0], batches[-1][1]
    secs = t_last - t_first
    n_done = sum(b[2] for b in batches)
    busy = sum(b[1] - b[0] for b in batches)
    per_batch = [(b[1] - b[0]) * 1000 for b in batches]
    sizes = [b[2] for b in batches]
    stages = {k: round(v.seconds, 3) for k, v in sorted(st.items(), key=lambda kv: -kv[1].seconds)}
    stages["model_step (inside engine_apply)"] = round(step["seconds"], 3)
    stages["loop_wall"] = round(secs, 3)
    reg = app.registry
    e2e_n = reg.get_sample_value("gru_e2e_latency_seconds_count") or 0
    return {"batch_max_records": batch, "max_wait_ms": max_wait_ms, "messages": n_done,
            "seconds": secs, "msgs_per_s": n_done / secs, "tokens_per_s": summary.tokens / secs,
            "batches": len(batches), "mean_batch": float(np.mean(sizes)),
            "batch_ms_p50": pct(per_batch, 50), "batch_ms_p99": pct(per_batch, 99),
            "process_busy_share": busy / secs, "outcomes": summary.outcomes,
            "histogram_e2e_count": e2e_n, "stage_seconds": stages,
            "cpu": cpu_usage(cpu["first"], cpu["last"], secs, n_done),
            "py_spy": (profile["out"] if profile and spy is not None and spy.returncode == 0
                       else (spy.stderr.read().decode()[-500:] if spy is not None else None))}


# --- (d) latency at a fixed rate -----------------------------------------------------------

def _feeder(bootstrap, topic, pairs, rate, q):
    """Child process: send pairs at `rate` msgs/s; report send times by (session, seq)."""
    p = producer_for(bootstrap, linger_ms=1)
    sent = {}
    t0 = time.time()
    i = 0
    n = len(pairs)
    while i < n:
        due = min(n, int((time.time() - t0) * rate) + 1)
        while i < due:
            key, value, ident = pairs[i]
            sent[ident] = time.time()
            p.send(topic, key=key, value=value)
            i += 1
        time.sleep(0.001)
    p.flush()
    p.close()
    q.put(("feeder", {"sent": sent, "start": t0, "end": time.time()}))


def _collector(bootstrap, topic, n, fetch_wait_ms, timeout_s, q, ready):
    """Child process: read the predictions topic from the start; arrival time per (session, seq)."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    c = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False,
                      fetch_max_wait_ms=fetch_wait_ms, auto_offset_reset="earliest")
    parts = None
    while not parts:
        parts = c.partitions_for_topic(topic)
        time.sleep(0.05)
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    c.poll(timeout_ms=100)
    ready.set()
    got = {}
    deadline = time.time() + timeout_s
    while len(got) < n and time.time() < deadline:
        for recs in c.poll(timeout_ms=100).values():
            now = time.time()
            for r in recs:
                obj = json.loads(r.value)
                got.setdefault((obj["session_id"], obj["seq"]), now)
    c.close()
    q.put(("collector", {"got": got}))


def run_latency(bootstrap, redis_url, model_dir, names, pairs, rate, batch, max_wait_ms,
                threads, fetch_wait_ms, warmup_s):
    from prometheus_client import CollectorRegistry

    from worker.app import build_worker

    ctx = mp.get_context("spawn")
    q, ready = ctx.Queue(), ctx.Event()
    settings = worker_settings(bootstrap, redis_url, model_dir, names, batch, max_wait_ms,
                               threads, idle_exit_s=None)
    app = build_worker(settings, CollectorRegistry())
    w = app.worker
    _, batches, _, cpu = instrument(w)
    duration = len(pairs) / rate
    collector = ctx.Process(target=_collector, args=(bootstrap, names["out"], len(pairs),
                                                     fetch_wait_ms, duration + 60, q, ready))
    triples = [(k, v, (o["session_id"], o["seq"])) for k, v in pairs for o in [json.loads(v)]]
    feeder = ctx.Process(target=_feeder, args=(bootstrap, names["in"], triples, rate, q))
    results = {}
    procs = [collector, feeder]

    def drive():
        try:
            collector.start()
            # wait for the worker to hold its partitions and the collector to be in place
            t_end = time.monotonic() + 60
            while (not w.epochs or not ready.is_set()) and time.monotonic() < t_end:
                time.sleep(0.05)
            time.sleep(1.0)  # let the first empty fetches settle
            feeder.start()
            CPU_PIDS.update(feeder=feeder.pid, collector=collector.pid)
            for _ in procs:
                name, res = q.get(timeout=duration + 90)
                results[name] = res
        except Exception as e:  # noqa: BLE001 - reported below
            results["error"] = repr(e)
        finally:
            w.stop()

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        summary = w.run()  # the worker runs in this (main) thread, as in production
    finally:
        app.close()
        driver.join(10)
        for pr in procs:
            if pr.is_alive():
                pr.terminate()
            pr.join(5)
    CPU_PIDS.pop("feeder", None)
    CPU_PIDS.pop("collector", None)
    if "error" in results:
        raise RuntimeError(f"latency run failed: {results['error']}")
    sent, got = results["feeder"]["sent"], results["collector"]["got"]
    t_start = results["feeder"]["start"]
    lat = [(got[k] - ts) * 1000 for k, ts in sent.items() if k in got and ts - t_start >= warmup_s]
    feed_secs = results["feeder"]["end"] - t_start
    reg = app.registry
    hist = {}
    count = reg.get_sample_value("gru_e2e_latency_seconds_count") or 0
    for b in ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25"):
        v = reg.get_sample_value("gru_e2e_latency_seconds_bucket", {"le": b})
        if v is not None and count:
            hist[f"le_{b}s"] = round(v / count, 4)
    return {"target_rate": rate, "achieved_feed_rate": len(sent) / feed_secs,
            "messages": len(sent), "received": len(got), "measured": len(lat),
            "warmup_s": warmup_s, "batch_max_records": batch, "max_wait_ms": max_wait_ms,
            "collector_fetch_max_wait_ms": fetch_wait_ms,
            "e2e_ms_p50": pct(lat, 50), "e2e_ms_p90": pct(lat, 90), "e2e_ms_p99": pct(lat, 99),
            "e2e_ms_max": max(lat) if lat else float("nan"),
            "mean_batch": float(np.mean([b[2] for b in batches])) if batches else 0,
            "batch_ms_p50": pct([(b[1] - b[0]) * 1000 for b in batches], 50),
            "batch_ms_p99": pct([(b[1] - b[0]) * 1000 for b in batches], 99),
            "worker_busy_share": (sum(b[1] - b[0] for b in batches) / (batches[-1][1] - batches[0][0])
                                  if len(batches) > 1 else None),
            "cpu": (cpu_usage(cpu["first"], cpu["last"], batches[-1][1] - batches[0][0], len(sent))
                    if len(batches) > 1 else None),
            "worker_histogram_share_le": hist, "worker_outcomes": summary.outcomes}


# --- main ----------------------------------------------------------------------------------

def resolve_model(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    for cand in (ROOT / "artifacts/bbc-gru", ROOT / "artifacts/bench-gru"):
        if (cand / "config.json").exists():
            return cand
    out = ROOT / "artifacts/bench-gru"
    print(f"no model artifact found: training {out} (2 epochs) ...", flush=True)
    subprocess.run([sys.executable, "-m", "model", "train", "--out", str(out), "--epochs", "2",
                    "--threads", "2", "--quiet"], cwd=ROOT, check=True)
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count()}
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    with contextlib.suppress(Exception):
        kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(kb / 2**20, 1)
    with contextlib.suppress(Exception):
        info["loadavg_start"] = os.getloadavg()
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=4, help="tokens per message (K)")
    ap.add_argument("--messages", type=int, default=30000, help="input messages for (c)")
    ap.add_argument("--passthrough-messages", type=int, default=60000)
    ap.add_argument("--passthrough-worker-producer", action=argparse.BooleanOptionalAction,
                    default=True, help="also run (a) with the worker's producer linger/batch size")
    ap.add_argument("--naive-seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, nargs="+", default=[512, 1024],
                    help="worker batch.max_records values for (c)")
    ap.add_argument("--max-wait-ms", type=int, default=20, help="worker batch.max_wait_ms")
    ap.add_argument("--latency-batch", type=int, default=512)
    ap.add_argument("--latency-fraction", type=float, nargs="+", default=[0.5],
                    help="feed rates for (d), as fractions of the best (c) rate")
    ap.add_argument("--latency-seconds", type=float, default=15.0)
    ap.add_argument("--latency-warmup-s", type=float, default=2.0)
    ap.add_argument("--collector-fetch-wait-ms", type=int, default=5)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--linger-ms", type=int, default=None, help="worker kafka.linger_ms (default: "
                    "the Settings default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (worker and naive)")
    ap.add_argument("--ids", action="store_true", help="send token_ids instead of tokens")
    ap.add_argument("--model", default=None, help="artifact dir (default: artifacts/bbc-gru, "
                    "else artifacts/bench-gru, trained if missing)")
    ap.add_argument("--only", default="abcd", help="subset of measurements to run, e.g. 'cd'")
    ap.add_argument("--py-spy", default=None, help="path to py-spy: profile the first (c) run")
    ap.add_argument("--py-spy-format", default="raw", choices=["raw", "flamegraph", "speedscope"])
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/throughput-<date>.json)")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "worker"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import torch

    import model as model_pkg
    from worker.local_services import RedisServer, Tansu

    torch.set_num_threads(args.threads)
    global LINGER_MS
    LINGER_MS = args.linger_ms
    from kafka.record import util as kafka_record_util
    model_dir = resolve_model(args.model)
    clf = model_pkg.load(model_dir)
    cfg = clf.model.config
    t_bench = time.monotonic()
    date = dt.date.today().isoformat()
    res = {"date": date, "argv": sys.argv, "machine": machine(),
           "model": {"dir": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
                     "model_id": clf.model_id, "embed": cfg.embed_dim, "hidden": cfg.hidden_size,
                     "layers": cfg.num_layers, "vocab": len(clf.vocab)},
           "params": {k: v for k, v in vars(args).items() if k not in ("out",)},
           "torch_threads": torch.get_num_threads(),
           "kafka_python_crc32c_c_extension": kafka_record_util.crc32c_c is not None,
           "results": {}}
    R = res["results"]
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    enc = clf.encode if args.ids else None

    def log(msg):
        print(f"[{time.monotonic() - t_bench:6.1f}s] {msg}", flush=True)

    with contextlib.ExitStack() as stack:
        kafka = stack.enter_context(Tansu())
        rsrv = stack.enter_context(RedisServer(appendonly=False))
        CPU_PIDS.update(tansu=kafka.proc.pid, redis=rsrv.proc.pid)
        log(f"tansu on {kafka.bootstrap}, redis on {rsrv.url}, model {model_dir} "
            f"(E={cfg.embed_dim} H={cfg.hidden_size} L={cfg.num_layers}), torch threads {args.threads}")

        def fresh(tag):
            t = f"{tag}-{uuid.uuid4().hex[:6]}"
            names = {"in": f"{t}-in", "out": f"{t}-out", "dlq": f"{t}-dlq", "group": f"{t}-g",
                     "prefix": f"bench-{t}"}
            kafka.create_topics([names["in"], names["out"], names["dlq"]], partitions=args.partitions)
            return names

        def feed(names, n, seed, prefix):
            pairs = make_stream(args.sessions, args.tokens, n, seed, prefix, args.ids, enc)
            rate = produce_all(kafka.bootstrap, names["in"], pairs)
            log(f"  pre-produced {n} messages to {names['in']} at {rate:.0f} msg/s")
            return pairs

        if "a" in args.only:
            names = fresh("pt")
            feed(names, args.passthrough_messages, 1, "a")
            log("(a) pass-through ...")
            R["passthrough"] = run_passthrough(kafka.bootstrap, names["in"], names["out"],
                                               args.passthrough_messages, max(args.batch))
            log(f"  {R['passthrough']['msgs_per_s']:.0f} msg/s")
            if args.passthrough_worker_producer:
                names = fresh("pt50")
                feed(names, args.passthrough_messages, 1, "a")
                log("(a') pass-through with the worker's producer settings (linger 50, 256 KiB) ...")
                R["passthrough_worker_producer"] = run_passthrough(
                    kafka.bootstrap, names["in"], names["out"], args.passthrough_messages,
                    max(args.batch), 50, 262_144)
                log(f"  {R['passthrough_worker_producer']['msgs_per_s']:.0f} msg/s")
        if "b" in args.only:
            names = fresh("nv")
            est = int(args.naive_seconds * 1500) + 2000
            feed(names, est, 2, "b")
            log("(b) naive per-message loop ...")
            R["naive"] = run_naive(kafka.bootstrap, names["in"], names["out"], rsrv.url, clf,
                                   args.naive_seconds, 512, args.tokens)
            log(f"  {R['naive']['msgs_per_s']:.0f} msg/s")
        if "c" in args.only:
            R["worker"] = []
            for i, b in enumerate(args.batch):
                names = fresh(f"w{b}")
                feed(names, args.messages, 3 + i, f"c{i}-")
                log(f"(c) worker batch.max_records={b} ...")
                prof = None
                if args.py_spy and i == 0:
                    prof = {"py_spy": args.py_spy, "format": args.py_spy_format, "seconds": 6,
                            "out": str(ROOT / f"bench/results/pyspy-{date}.{'txt' if args.py_spy_format == 'raw' else 'svg' if args.py_spy_format == 'flamegraph' else 'json'}")}
                r = run_worker(kafka.bootstrap, rsrv.url, model_dir, names, args.messages, b,
                               args.max_wait_ms, args.threads, prof)
                R["worker"].append(r)
                log(f"  {r['msgs_per_s']:.0f} msg/s, mean batch {r['mean_batch']:.0f}, "
                    f"stages {r['stage_seconds']}")
        if "d" in args.only:
            best = max((r["msgs_per_s"] for r in R.get("worker", [])), default=None)
            if best is None:
                best = 2000.0
                log("  no (c) result in this run: assuming a max of 2000 msg/s")
            R["latency"] = []
            for frac in args.latency_fraction:
                rate = frac * best
                n = int(rate * args.latency_seconds)
                names = fresh("lat")
                pairs = make_stream(args.sessions, args.tokens, n, 9, "d", args.ids, enc)
                log(f"(d) latency: {n} messages at {rate:.0f} msg/s = {frac:g} x {best:.0f} "
                    f"(batch {args.latency_batch}) ...")
                r = run_latency(kafka.bootstrap, rsrv.url, model_dir, names, pairs, rate,
                                args.latency_batch, args.max_wait_ms, args.threads,
                                args.collector_fetch_wait_ms, args.latency_warmup_s)
                r["fraction_of_max"] = frac
                R["latency"].append(r)
                log(f"  p50 {r['e2e_ms_p50']:.1f} ms, p99 {r['e2e_ms_p99']:.1f} ms, "
                    f"cpu {r['cpu']}")

    res["wall_seconds"] = round(time.monotonic() - t_bench, 1)
    with contextlib.suppress(Exception):
        res["machine"]["loadavg_end"] = os.getloadavg()
    print_table(res, args)
    out = Path(args.out) if args.out else ROOT / f"bench/results/throughput-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not args.out:  # keep earlier runs of the same day
        out = out.with_name(f"{out.stem}-{time.strftime('%H%M%S')}.json")
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {out}")
    return 0


def print_table(res, args) -> None:
    R = res["results"]
    K = args.tokens
    pt = R.get("passthrough", {}).get("msgs_per_s")
    nv = R.get("naive", {}).get("msgs_per_s")
    rows = []
    pt2 = R.get("passthrough_worker_producer", {}).get("msgs_per_s")
    if pt:
        rows.append(("(a) pass-through consume->produce", pt, pt * K, "", ""))
    if pt2:
        rows.append(("(a') pass-through, linger 50 / 256 KiB", pt2, pt2 * K, "", ""))
    if nv:
        rows.append(("(b) naive per-message loop", nv, R["naive"]["tokens_per_s"], "", ""))
    for r in R.get("worker", []):
        rows.append((f"(c) worker max_records={r['batch_max_records']} (mean batch {r['mean_batch']:.0f})",
                     r["msgs_per_s"], r["tokens_per_s"],
                     f"batch {r['batch_ms_p50']:.1f}", f"batch {r['batch_ms_p99']:.1f}"))
    for L in R.get("latency", []):
        rows.append((f"(d) worker fed at {L['fraction_of_max']:g} x max ({L['target_rate']:.0f} msg/s)",
                     L["achieved_feed_rate"], L["achieved_feed_rate"] * K,
                     f"e2e {L['e2e_ms_p50']:.1f}", f"e2e {L['e2e_ms_p99']:.1f}"))
    print()
    print(f"{'measurement':<52} {'msgs/s':>9} {'tokens/s':>10} {'p50 ms':>11} {'p99 ms':>11}")
    for name, m, t, p50, p99 in rows:
        print(f"{name:<52} {m:>9.0f} {t:>10.0f} {p50:>11} {p99:>11}")
    ratios = {}
    best = max((r["msgs_per_s"] for r in R.get("worker", [])), default=None)
    if best and nv:
        ratios["worker_vs_naive"] = best / nv
    if best and pt:
        ratios["worker_vs_passthrough"] = best / pt
    if best and pt2:
        ratios["worker_vs_passthrough_linger50"] = best / pt2
    for L in R.get("latency", []):
        ratios[f"p99_e2e_ms_at_{L['fraction_of_max']:g}x_max"] = L["e2e_ms_p99"]
    res["ratios"] = ratios
    print()
    for k, v in ratios.items():
        print(f"{k:<28} {v:.2f}")
    print("(targets: worker_vs_naive >= 10, worker_vs_passthrough >= 0.6, p99 <= 50 ms)")


if __name__ == "__main__":
    sys.exit(main())
