"""What the benchmarks share: the machine's description, CPU accounting from /proc, the local
services with fresh names per measurement, pre-produced backlogs, the worker's own stage
histograms, and where results go.

Run the scripts from the repository root (``.venv/bin/python bench/throughput.py``); they
import the project as installed in ``.venv``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SESSION_TIMEOUT_MS, HEARTBEAT_MS = 6000, 1000  # tansu joins take ~session_timeout/2
_TCK = os.sysconf("SC_CLK_TCK")


# --- the machine and its CPU ---------------------------------------------------------------

def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    with contextlib.suppress(Exception):
        kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(kb / 2**20, 1)
    with contextlib.suppress(Exception):  # the code measured: commit, and whether it was edited
        git = ["git", "-C", str(ROOT)]
        info["commit"] = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()
        info["dirty"] = bool(subprocess.run([*git, "status", "--porcelain", "--", "worker",
                                             "model", "bench"],
                                            capture_output=True, text=True).stdout.strip())
    info["loadavg_start"] = os.getloadavg()
    info["commit"] = revision()
    with contextlib.suppress(Exception):
        import confluent_kafka
        import kafka
        info["clients"] = {"kafka-python": kafka.__version__,
                           "confluent-kafka": confluent_kafka.version()[0],
                           "librdkafka": confluent_kafka.libversion()[0]}
    return info


def revision() -> str:
    """The commit measured (``+dirty`` when the tree has changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Cpu:
    """CPU seconds (user + system, all threads) of named processes and the whole machine."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {"bench_process": os.getpid()}

    def snapshot(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / _TCK
        with contextlib.suppress(OSError, ValueError):  # every process, ours or not
            v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
            out["whole_machine"] = (sum(v) - v[3] - v[4]) / _TCK
        return out

    @staticmethod
    def usage(before: dict, after: dict, seconds: float, n: int) -> dict:
        """Per process: share of one core used, and CPU microseconds per message."""
        return {k: {"cores": round((after[k] - before[k]) / seconds, 2),
                    "cpu_us_per_msg": round((after[k] - before[k]) / max(n, 1) * 1e6, 1)}
                for k in before if k in after}


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


# --- services, names, input ----------------------------------------------------------------

class Bench:
    """tansu and a private redis-server (no persistence; the shared Redis is never touched),
    fresh topics/group/prefix per measurement, and a log with elapsed times."""

    def __init__(self, partitions: int) -> None:
        from devtools.services import RedisServer, Tansu
        self.partitions = partitions
        self.kafka, self.redis = Tansu(), RedisServer(appendonly=False)
        self.cpu = Cpu()
        self.t0 = time.monotonic()

    def __enter__(self) -> "Bench":
        self.kafka.start()
        self.redis.start()
        self.cpu.pids.update(tansu=self.kafka.proc.pid, redis=self.redis.proc.pid)
        return self

    def __exit__(self, *exc) -> None:
        self.redis.close()
        self.kafka.close()

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def fresh(self, tag: str) -> dict[str, str]:
        from devtools.services import unique_names
        names = unique_names(f"{tag}-{os.urandom(3).hex()}")
        self.kafka.create_topics([names["in"], names["out"], names["dlq"]], partitions=self.partitions)
        return names

    def backlog(self, names: dict, pairs: list[tuple[bytes, bytes]]) -> float:
        """Produce ``pairs`` to the input topic before anyone consumes; returns msg/s."""
        rate = produce_all(self.kafka.bootstrap, names["in"], pairs)
        self.log(f"  pre-produced {len(pairs)} messages to {names['in']} at {rate:.0f} msg/s")
        return rate


def stream(sessions: int, tokens: int, messages: int, seed: int, prefix: str,
           encode=None) -> list[tuple[bytes, bytes]]:
    """``messages`` records: ``sessions`` sessions of K-token chunks, interleaved."""
    from devtools.streams import even_sessions, pairs
    per = -(-messages // sessions)
    return pairs(even_sessions(sessions, tokens, per, seed, prefix), seed, encode=encode)[:messages]


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


def consumer_for(bootstrap: str, topic: str, group: str, fetch_max_wait_ms: int = 20, **kw):
    from kafka import KafkaConsumer
    c = KafkaConsumer(bootstrap_servers=[bootstrap], group_id=group, enable_auto_commit=False,
                      auto_offset_reset="earliest", session_timeout_ms=SESSION_TIMEOUT_MS,
                      heartbeat_interval_ms=HEARTBEAT_MS, fetch_max_wait_ms=fetch_max_wait_ms, **kw)
    c.subscribe([topic])
    return c


def producer_for(bootstrap: str, linger_ms: int = 2, **kw):
    from kafka import KafkaProducer
    return KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=linger_ms,
                         enable_idempotence=False, **kw)


def commit_batch(consumer, polled) -> None:
    from kafka.structs import OffsetAndMetadata
    consumer.commit({tp: OffsetAndMetadata(recs[-1].offset + 1, "", -1)
                     for tp, recs in polled.items() if recs})


CLIENTS = ("kafka-python", "confluent")


class RdPassThrough:
    """The confluent-kafka (librdkafka) pass-through, with the worker's confluent consumer and
    producer settings (``worker.rdkafka_io``) unless told otherwise: poll up to ``batch``
    records (the first waits, the rest are what is already fetched), send each one unchanged,
    wait for every acknowledgement, commit. ``step`` does one batch and returns its size."""

    def __init__(self, bootstrap: str, topic: str, out: str, group: str,
                 worker_producer: bool = True, **producer) -> None:
        import confluent_kafka as ck

        from worker.config import KafkaSettings
        from worker.rdkafka_io import consumer_config, producer_config
        k = KafkaSettings(bootstrap_servers=bootstrap, input_topic=topic, group_id=group,
                          session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_MS)
        self.ck, self.out = ck, out
        self.consumer = ck.Consumer(consumer_config(k))
        self.consumer.subscribe([topic])
        conf = producer_config(k, 30.0) if worker_producer else {
            "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": False}
        self.producer = ck.Producer({**conf, **producer})

    def join(self, timeout_s: float = 60.0) -> None:
        """Poll until the group has assigned this member its partitions (a fresh topic: no
        record can come yet)."""
        deadline = time.monotonic() + timeout_s
        while not self.consumer.assignment():
            if time.monotonic() > deadline:
                raise RuntimeError("pass-through: no assignment")
            if self.consumer.poll(0.1) is not None:
                raise RuntimeError("pass-through: a record before the join: not a fresh topic")

    def step(self, batch: int, wait_s: float = 0.2) -> int:
        first = self.consumer.poll(wait_s)
        if first is None:
            return 0
        msgs = [first, *self.consumer.consume(batch - 1, 0)] if batch > 1 else [first]
        produce, last = self.producer.produce, {}
        n = 0
        for m in msgs:
            if m.error() is None:
                produce(self.out, m.value(), m.key())
                last[(m.topic(), m.partition())] = m.offset()
                n += 1
        if self.producer.flush(30):
            raise RuntimeError("pass-through: sends not acknowledged in 30 s")
        if last:
            self.consumer.commit(offsets=[self.ck.TopicPartition(t, p, o + 1)
                                          for (t, p), o in last.items()], asynchronous=False)
        return n

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(5)


def worker_settings(bench: Bench, model_dir: Path, names: dict, batch: int, max_wait_ms: int,
                    threads: int, **extra):
    from worker.config import Settings
    s = {"kafka": {"bootstrap_servers": bench.kafka.bootstrap, "input_topic": names["in"],
                   "output_topic": names["out"], "dlq_topic": names["dlq"],
                   "group_id": names["group"], "session_timeout_ms": SESSION_TIMEOUT_MS,
                   "heartbeat_interval_ms": HEARTBEAT_MS},
         "redis": {"url": bench.redis.url, "prefix": names["prefix"]},
         "model": {"dir": str(model_dir), "threads": threads},
         "batch": {"max_records": batch, "max_wait_ms": max_wait_ms},
         "metrics": {"host": "127.0.0.1", "port": 0},
         "log_level": "WARNING", "idle_exit_s": 15.0}
    for k, v in extra.items():
        s[k] = {**s.get(k, {}), **v} if isinstance(v, dict) else v
    return Settings(**s)


class FirstPoll:
    """A Source wrapper (the port, not the worker's insides): calls ``at_first`` when the first
    poll returns records, so a measurement starts after the group join."""

    def __init__(self, source, at_first) -> None:
        self.inner, self.at_first, self.seen = source, at_first, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def poll(self, max_records: int, max_wait_ms: int):
        records = self.inner.poll(max_records, max_wait_ms)
        if records and not self.seen:
            self.seen = True
            self.at_first()
        return records


# --- the worker's own stage histograms -----------------------------------------------------

STAGES = {  # name in results -> histogram
    "poll": "gru_poll_seconds", "decode": "gru_decode_seconds",
    "redis_load": "gru_state_load_seconds", "engine": "gru_engine_seconds",
    "model_step": "gru_step_seconds", "redis_write": "gru_state_store_seconds",
    "encode": "gru_encode_seconds", "produce": "gru_produce_seconds",
    "commit": "gru_commit_seconds", "batch": "gru_batch_seconds",
}


def histogram_state(registry, name: str) -> tuple[float, float, list[tuple[float, float]]]:
    """(sum, count, [(upper bound, cumulative count)]) of a histogram in ``registry``."""
    total = registry.get_sample_value(f"{name}_sum") or 0.0
    count = registry.get_sample_value(f"{name}_count") or 0.0
    buckets = []
    for metric in registry.collect():
        if metric.name == name:
            for s in metric.samples:
                if s.name.endswith("_bucket"):
                    buckets.append((float(s.labels["le"]), s.value))
    return total, count, sorted(buckets)


def stage_report(before: dict, after: dict) -> dict:
    """Per stage, between two ``stages_snapshot`` results: total seconds, calls, mean ms and
    the p99 (ms) interpolated in the histogram's buckets, Prometheus' way."""
    out = {}
    for stage, (s1, c1, b1) in after.items():
        s0, c0, b0 = before.get(stage, (0.0, 0.0, []))
        calls = c1 - c0
        if calls <= 0:
            continue
        b0d = dict(b0)
        cum = [(le, c - b0d.get(le, 0.0)) for le, c in b1]
        out[stage] = {"seconds": round(s1 - s0, 4), "calls": int(calls),
                      "mean_ms": round((s1 - s0) / calls * 1000, 3),
                      "p99_ms": round(_quantile(cum, 0.99) * 1000, 3)}
    return out


def histogram_from_text(parsed: dict[str, float], name: str,
                        labels: dict[str, str] | None = None) -> tuple[float, float, list]:
    """``histogram_state`` from /metrics text parsed by ``devtools.launcher.parse_metrics``."""
    extra = "".join(f'{k}="{v}",' for k, v in sorted((labels or {}).items()))
    suffix = f"{{{extra[:-1]}}}" if extra else ""
    total = parsed.get(f"{name}_sum{suffix}", 0.0)
    count = parsed.get(f"{name}_count{suffix}", 0.0)
    head = f"{name}_bucket{{"
    buckets = []
    for key, value in parsed.items():
        if key.startswith(head):
            fields = dict(kv.split("=", 1) for kv in key[len(head):-1].split(","))
            le = fields.pop("le").strip('"')
            if {k: v.strip('"') for k, v in fields.items()} == (labels or {}):
                buckets.append((float(le), value))
    return total, count, sorted(buckets)


def stages_from_text(parsed: dict[str, float]) -> dict:
    """``stages_snapshot`` of a worker process, from its /metrics."""
    out = {stage: histogram_from_text(parsed, name) for stage, name in STAGES.items()}
    out["worker_e2e"] = histogram_from_text(parsed, "gru_e2e_latency_seconds")
    for g in "012":
        out[f"gc_gen{g}"] = histogram_from_text(parsed, "gru_gc_pause_seconds", {"generation": g})
    return out


def stages_snapshot(registry) -> dict:
    return {stage: histogram_state(registry, name) for stage, name in STAGES.items()}


def _quantile(cum: list[tuple[float, float]], q: float) -> float:
    total = cum[-1][1] if cum else 0
    if not total:
        return float("nan")
    rank, prev_le, prev_c = q * total, 0.0, 0.0
    for le, c in cum:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1)
        prev_le, prev_c = le, c
    return prev_le


# --- model and results ---------------------------------------------------------------------

def resolve_model(arg: str | None) -> Path:
    """The artifact to benchmark: ``arg``, else artifacts/bbc-gru (trained if missing)."""
    if arg:
        return Path(arg)
    out = ROOT / "artifacts/bbc-gru"
    if not (out / "config.json").exists():
        print(f"no model at {out}: training the default BBC model (a few minutes) ...", flush=True)
        subprocess.run([sys.executable, "-m", "model", "train", "--dataset", "bbc-news",
                        "--out", str(out)], cwd=ROOT, check=True)
    return out


def shaped_model(out: Path | None = None) -> Path:
    """An artifact of the default recipe's shape (``model.train.TrainConfig``: embedding,
    GRU and mean units, the BBC vocabulary and labels) with random weights, written in
    seconds: for benchmarks of cost, which does not depend on the weights."""
    import tempfile

    import torch

    from model.artifact import save
    from model.data import load_bbc
    from model.gru import GRUClassifier, ModelConfig
    from model.tokenizer import Vocab, tokenize
    from model.train import TrainConfig

    out = Path(out or tempfile.mkdtemp(prefix="shaped-gru-"))
    if (out / "config.json").exists():
        return out
    t = TrainConfig()
    docs = load_bbc()
    vocab = Vocab.build((tokenize(d.text) for d in docs), min_freq=t.min_freq,
                        max_size=t.max_vocab)
    labels = sorted({d.label for d in docs})
    torch.manual_seed(0)
    model = GRUClassifier(ModelConfig(len(vocab), len(labels), t.embed_dim, t.hidden_size,
                                      t.num_layers, t.dropout, t.head_hidden,
                                      mean_dim=t.mean_dim))
    save(out, model, vocab, labels, training={"note": "random weights, for cost benchmarks"})
    return out


def write_result(kind: str, res: dict, out: str | None = None) -> Path:
    """bench/results/<kind>-<date>.json, or -<time> appended when that file exists."""
    date = dt.date.today().isoformat()
    path = Path(out) if out else RESULTS / f"{kind}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not out:
        path = path.with_name(f"{path.stem}-{time.strftime('%H%M%S')}.json")
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "worker"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    yield
