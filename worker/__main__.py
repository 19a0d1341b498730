"""Command line: ``python -m worker run | topics create | produce | tail | demo``.

``run`` builds the Settings once (env ``GRU_*`` plus flags), wires the model, the state
store, Kafka and metrics together, and runs the loop until SIGTERM/SIGINT or a bound.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from .config import Settings

log = logging.getLogger("worker")


def _settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags override env vars, which override defaults."""
    over: dict = {}

    def put(section: str | None, key: str, value) -> None:
        if value is None:
            return
        (over.setdefault(section, {}) if section else over)[key] = value

    put("kafka", "bootstrap_servers", getattr(args, "bootstrap", None))
    put("kafka", "group_id", getattr(args, "group", None))
    put("kafka", "input_topic", getattr(args, "input_topic", None))
    put("kafka", "output_topic", getattr(args, "output_topic", None))
    put("kafka", "session_timeout_ms", getattr(args, "session_timeout_ms", None))
    put("kafka", "heartbeat_interval_ms", getattr(args, "heartbeat_interval_ms", None))
    put("redis", "url", getattr(args, "redis_url", None))
    put("redis", "prefix", getattr(args, "redis_prefix", None))
    put("redis", "state_dtype", getattr(args, "state_dtype", None))
    put("model", "dir", getattr(args, "model_dir", None))
    put("model", "device", getattr(args, "device", None))
    put("model", "threads", getattr(args, "threads", None))
    put("model", "dtype", getattr(args, "dtype", None))
    put("batch", "max_records", getattr(args, "batch_size", None))
    put("batch", "max_wait_ms", getattr(args, "batch_wait_ms", None))
    put("metrics", "port", getattr(args, "metrics_port", None))
    put("metrics", "host", getattr(args, "metrics_host", None))
    put(None, "log_level", getattr(args, "log_level", None))
    put(None, "max_messages", getattr(args, "max_messages", None))
    put(None, "idle_exit_s", getattr(args, "idle_exit", None))
    if getattr(args, "kafka_partitions", None):
        put("kafka", "partitions", args.kafka_partitions)
    return Settings(**over)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (GRU_KAFKA__BOOTSTRAP_SERVERS)")
    p.add_argument("--input-topic")
    p.add_argument("--output-topic")
    p.add_argument("--log-level")


def _worker_flags(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--group", help="consumer group id")
    p.add_argument("--redis-url", help="redis://host:port/db, rediss:// for TLS, or 'memory'")
    p.add_argument("--redis-prefix")
    p.add_argument("--state-dtype", choices=["float32", "float16"])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int)
    p.add_argument("--dtype", choices=["float32", "float16"], help="compute dtype (float16: cuda only)")
    p.add_argument("--batch-size", type=int, help="most records per batch")
    p.add_argument("--batch-wait-ms", type=int, help="longest wait for a batch to fill")
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--metrics-host")
    p.add_argument("--session-timeout-ms", type=int)
    p.add_argument("--heartbeat-interval-ms", type=int)
    p.add_argument("--max-messages", type=int, help="stop after N input messages")
    p.add_argument("--idle-exit", type=float, help="stop after S seconds without input")
    p.add_argument("--processes", type=int, default=1,
                   help="run N worker processes in the group (metrics on port, port+1, ...)")


def cmd_run(args: argparse.Namespace) -> int:
    from model.artifact import ArtifactError

    settings = _settings_from_args(args)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.processes > 1:
        from .supervisor import supervise
        return supervise(args.argv, args.processes, settings.metrics.port)
    from .app import build_worker
    try:
        app = build_worker(settings, CollectorRegistry())
    except ArtifactError as e:  # missing, not a directory, or not a valid model artifact
        print(f"error: cannot load the model (--model-dir / GRU_MODEL__DIR): {e}", file=sys.stderr)
        return 2

    def on_signal(signum, _frame) -> None:
        log.info("received %s: finishing the batch in hand", signal.Signals(signum).name)
        app.worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        app.worker.run()
    finally:
        app.close()
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from .kafka_io import create_topics
    settings = _settings_from_args(args)
    created = create_topics(settings.kafka, args.partitions)
    k = settings.kafka
    for name in (k.input_topic, k.output_topic, k.dlq_topic):
        print(f"{name}: {'created' if name in created else 'exists'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .client import add_produce, add_tail
    from .demo import add_demo
    ap = argparse.ArgumentParser(prog="python -m worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="consume tokens, advance session states, emit predictions")
    _worker_flags(run)
    run.set_defaults(func=cmd_run)

    topics = sub.add_parser("topics", help="create the input, output and dead-letter topics")
    topics.add_argument("action", choices=["create"])
    _common(topics)
    topics.add_argument("--partitions", type=int, default=None,
                        help="partitions per topic (default GRU_KAFKA__PARTITIONS, 6)")
    topics.set_defaults(func=cmd_topics)

    add_produce(sub, _common, _settings_from_args)
    add_tail(sub, _common, _settings_from_args)
    add_demo(sub)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
