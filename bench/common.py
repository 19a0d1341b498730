"""What the benchmarks share: the local services with fresh names per measurement,
pre-produced backlogs, one pass-through (the floor) per Kafka client, CPU accounting from
/proc, the worker's own stage histograms, and ``write_result``, which files every result with
the machine, the date and the commit measured.

Run each bench as a module from the repository root: ``python -m bench.<name> --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SESSION_TIMEOUT_MS, HEARTBEAT_MS = 6000, 1000  # tansu joins take ~session_timeout/2
_TCK = os.sysconf("SC_CLK_TCK")
_T0, _LOAD_AT_START = time.monotonic(), os.getloadavg()  # when this bench process began


def log(msg: str) -> None:
    """One progress line, with the seconds since the bench started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


# --- the command line ---------------------------------------------------------------------

DEFAULT_MODEL = "artifacts/bbc-gru"  # resolve_model's default, trained when missing


def parser(kind: str, doc: str | None, model: str | None = DEFAULT_MODEL
           ) -> argparse.ArgumentParser:
    """The argument parser of ``python -m bench.<kind>``: its module docstring as the
    description, and ``add_standard_options``."""
    ap = argparse.ArgumentParser(prog=f"python -m bench.{kind}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_standard_options(ap, kind, model)
    return ap


def add_standard_options(ap: argparse.ArgumentParser, kind: str,
                         model: str | None = DEFAULT_MODEL) -> None:
    """``--out`` (``write_result``'s), and, unless ``model`` is None, ``--model`` (None when
    not given; ``model`` says what the bench takes then)."""
    if model is not None:
        ap.add_argument("--model", default=None, metavar="DIR",
                        help=f"the model artifact (default: {model})")
    ap.add_argument("--out", default=None, metavar="FILE",
                    help=f"the result file (default: bench/results/{kind}-<date>.json)")


# --- what a result records besides its figures ---------------------------------------------

def machine() -> dict:
    """The machine measured, by its specification: CPU model, cores, memory, OS, Python,
    torch, and the GPU when torch is loaded and sees one."""
    info: dict = {"cpu": _cpu_model(), "cpus": os.cpu_count()}
    with contextlib.suppress(OSError, AttributeError):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(kb / 2**20, 1)
    info.update(os=platform.platform(), host=platform.node(),
                python=platform.python_version(), torch=_version("torch"))
    torch = sys.modules.get("torch")  # only when the bench loaded it: importing takes seconds
    with contextlib.suppress(Exception):
        if torch is not None and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    """lscpu's model name (it names Arm cores too), else /proc/cpuinfo's, else the arch."""
    texts = []
    with contextlib.suppress(OSError):
        texts.append(subprocess.run(["lscpu"], capture_output=True, text=True,
                                    check=False).stdout)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        texts.append(f.read())
    for text in texts:
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def commit(tree: str | os.PathLike = ROOT) -> dict:
    """The code measured: HEAD of ``tree``, and whether its worker/, model/, devtools/ or
    bench/ (results aside) differ from it. Without git, or outside a checkout (a copy of the
    tree on a GPU host), the sha is None and ``unknown`` says why."""
    git = ["git", "-C", str(tree)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False)
        if head.returncode:
            return {"sha": None, "dirty": None,
                    "unknown": (head.stderr.strip().splitlines() or ["git failed"])[0]}
        changed = subprocess.run([*git, "status", "--porcelain", "--", "worker", "model",
                                  "devtools", "bench", ":(exclude)bench/results"],
                                 capture_output=True, text=True, check=False).stdout.splitlines()
    except OSError as e:
        return {"sha": None, "dirty": None, "unknown": f"git: {e.strerror}"}
    out: dict = {"sha": head.stdout.strip(), "dirty": bool(changed)}
    if changed:
        out["changed"] = changed[:20]
    return out


def clients() -> dict:
    """The Kafka and Redis client libraries' versions (None where one is not installed)."""
    out = {name: _version(name) for name in ("kafka-python", "confluent-kafka", "redis")}
    with contextlib.suppress(ImportError):
        import confluent_kafka
        out["librdkafka"] = confluent_kafka.libversion()[0]
    return out


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _command(kind: str) -> str:
    """How this result was made: ``python -m bench.<kind> ARGS`` when run so, else argv."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == f"bench.{kind}":
        return shlex.join(["python", "-m", spec.name, *sys.argv[1:]])
    return shlex.join(sys.argv)


def write_result(kind: str, res: dict, out: str | os.PathLike | None = None, *,
                 with_clients: bool = False) -> Path:
    """Write ``res`` as JSON to ``out``, by default bench/results/<kind>-<date>.json (with the
    time appended when that file exists), after a header: the kind (the bench's module name),
    the date, the command, the commit, the machine, the load average at the start and now,
    and (``with_clients``, for benches through Kafka or Redis) the client libraries."""
    now = dt.datetime.now().astimezone()
    record: dict = {"kind": kind, "date": now.isoformat(timespec="seconds"),
                    "command": _command(kind), "commit": commit(), "machine": machine(),
                    "loadavg": {"start": _LOAD_AT_START, "end": os.getloadavg()}}
    if with_clients:
        record["clients"] = clients()
    clash = sorted(record.keys() & res.keys())
    if clash:  # a bench's bug, found after its run: keep its figures all the same
        print(f"warning: {kind}'s fields {clash} are header fields: kept under 'clashing'",
              file=sys.stderr)
        record["clashing"] = {k: res[k] for k in clash}
    record.update((k, v) for k, v in res.items() if k not in clash)
    path = Path(out) if out else RESULTS / f"{kind}-{now.date().isoformat()}.json"
    if path.exists() and not out:
        path = path.with_name(f"{path.stem}-{now.strftime('%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


# --- CPU -----------------------------------------------------------------------------------

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


# --- services, names, input ----------------------------------------------------------------

class Bench:
    """tansu and a private redis-server (no persistence; the shared Redis is never touched),
    and fresh topics, group and Redis prefix per measurement."""

    def __init__(self, partitions: int) -> None:
        from devtools.services import RedisServer, Tansu
        self.partitions = partitions
        self.kafka, self.redis = Tansu(), RedisServer(appendonly=False)
        self.cpu = Cpu()

    def __enter__(self) -> "Bench":
        self.kafka.start()
        self.redis.start()
        self.cpu.pids.update(tansu=self.kafka.proc.pid, redis=self.redis.proc.pid)
        return self

    def __exit__(self, *exc) -> None:
        self.redis.close()
        self.kafka.close()

    def fresh(self, tag: str) -> dict[str, str]:
        from devtools.services import unique_names
        names = unique_names(f"{tag}-{os.urandom(3).hex()}")
        self.kafka.create_topics([names["in"], names["out"], names["dlq"]], partitions=self.partitions)
        return names

    def backlog(self, names: dict, pairs: list[tuple[bytes, bytes]]) -> float:
        """Produce ``pairs`` to the input topic before anyone consumes; returns msg/s."""
        rate = produce_all(self.kafka.bootstrap, names["in"], pairs)
        log(f"  pre-produced {len(pairs)} messages to {names['in']} at {rate:.0f} msg/s")
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


# --- the floor: a pass-through per Kafka client --------------------------------------------

class PassThrough(Protocol):
    """Per poll batch: consume, send each record unchanged, wait for every acknowledgement,
    commit. What it costs is the broker and the client's two hops alone: the least any worker
    with that client can show on that broker."""

    consumer: Any
    producer: Any
    producer_settings: dict  # what the producer was given beyond the connection

    def join(self, timeout_s: float = 60.0) -> None:
        """Poll until the group has assigned this member its partitions (on a fresh topic, so
        that the join is not part of a measurement)."""

    def step(self, batch: int, wait_s: float = 0.2) -> int:
        """One batch of up to ``batch`` records (waiting up to ``wait_s`` for the first);
        returns how many it forwarded."""

    def close(self) -> None: ...


CLIENT_LINGER_MS = 2  # the client alone: a short linger, as a hand-written forwarder would


def _kafka_settings(bootstrap: str, topic: str, group: str):
    from worker.config import KafkaSettings
    return KafkaSettings(bootstrap_servers=bootstrap, input_topic=topic, group_id=group,
                         session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_MS)


class KafkaPythonPassThrough:
    """The kafka-python pass-through. The consumer has the worker's settings
    (``worker.kafka_io.KafkaSource``'s group and fetch settings); the producer acks=all,
    without idempotence, and either the client's defaults with a 2 ms linger or
    (``worker_producer``) the worker's linger, batch bytes and compression."""

    def __init__(self, bootstrap: str, topic: str, out: str, group: str,
                 worker_producer: bool = True) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        from worker.kafka_io import compression, fetch_bounds
        k = _kafka_settings(bootstrap, topic, group)
        self.out = out
        self.consumer = KafkaConsumer(
            group_id=group, enable_auto_commit=False, auto_offset_reset=k.auto_offset_reset,
            session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms, **fetch_bounds(k), **k.client_options())
        self.consumer.subscribe([topic])
        tuning = {"linger_ms": k.linger_ms, "batch_size": k.producer_batch_bytes,
                  "compression_type": compression(k)} if worker_producer else {
                  "linger_ms": CLIENT_LINGER_MS}
        self.producer_settings = {"acks": "all", "enable_idempotence": False, **tuning}
        self.producer = KafkaProducer(**self.producer_settings, **k.client_options())

    def join(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.consumer.assignment():
            if time.monotonic() > deadline:
                raise RuntimeError("pass-through: no assignment")
            if self.consumer.poll(timeout_ms=100):
                raise RuntimeError("pass-through: a record before the join: not a fresh topic")

    def step(self, batch: int, wait_s: float = 0.2) -> int:
        polled = self.consumer.poll(timeout_ms=int(wait_s * 1000), max_records=batch)
        if not polled:
            return 0
        send, out = self.producer.send, self.out
        sent = [send(out, key=r.key, value=r.value) for recs in polled.values() for r in recs]
        self.producer.flush(30)
        for f in sent:
            f.get(0)  # raises if that send failed
        self.commit(polled)
        return len(sent)

    def commit(self, polled: dict) -> None:
        """Commit past the last record of each partition in ``polled`` (``poll``'s answer)."""
        from kafka.structs import OffsetAndMetadata
        self.consumer.commit({tp: OffsetAndMetadata(recs[-1].offset + 1, "", -1)
                              for tp, recs in polled.items() if recs})

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.producer.close()


class ConfluentPassThrough:
    """The confluent-kafka (librdkafka) pass-through. The consumer has the worker's settings
    (``worker.rdkafka_io.consumer_config``); the producer acks=all, without idempotence, and
    either the client's defaults with a 2 ms linger or (``worker_producer``) the worker's
    (``worker.rdkafka_io.producer_config``)."""

    def __init__(self, bootstrap: str, topic: str, out: str, group: str,
                 worker_producer: bool = True) -> None:
        import confluent_kafka as ck

        from worker.rdkafka_io import client_config, consumer_config, producer_config
        k = _kafka_settings(bootstrap, topic, group)
        self.ck, self.out = ck, out
        self.consumer = ck.Consumer(consumer_config(k))
        self.consumer.subscribe([topic])
        connection = client_config(k)
        conf = producer_config(k, 30.0) if worker_producer else {
            **connection, "acks": "all", "enable.idempotence": False,
            "linger.ms": CLIENT_LINGER_MS}
        self.producer_settings = {key: v for key, v in conf.items() if key not in connection}
        self.producer = ck.Producer(conf)

    def join(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.consumer.assignment():
            if time.monotonic() > deadline:
                raise RuntimeError("pass-through: no assignment")
            if self.consumer.poll(0.1) is not None:
                raise RuntimeError("pass-through: a record before the join: not a fresh topic")

    def step(self, batch: int, wait_s: float = 0.2) -> int:
        first = self.consumer.poll(wait_s)  # the first waits; the rest are what is fetched
        if first is None:
            return 0
        msgs = [first, *self.consumer.consume(batch - 1, 0)] if batch > 1 else [first]
        produce, out, last = self.producer.produce, self.out, {}
        n = 0
        for m in msgs:
            if m.error() is None:
                produce(out, m.value(), m.key())
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


PASS_THROUGHS: dict[str, type[PassThrough]] = {"kafka-python": KafkaPythonPassThrough,
                                               "confluent": ConfluentPassThrough}
CLIENTS = tuple(PASS_THROUGHS)  # the worker's GRU_KAFKA__CLIENT values


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


# --- the model -----------------------------------------------------------------------------

def resolve_model(arg: str | None) -> Path:
    """The artifact to benchmark: ``arg``, else ``DEFAULT_MODEL`` (trained if missing)."""
    if arg:
        return Path(arg)
    out = ROOT / DEFAULT_MODEL
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


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "worker"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    yield
