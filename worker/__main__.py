"""Command line: ``python -m worker run | topics create | produce | tail | tenant-key``.

``run`` builds the Settings once (env ``GRU_*`` plus flags), wires the model, the state
store, Kafka and metrics together, and runs the loop until SIGTERM/SIGINT or a bound.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import types
import typing
from pathlib import Path

from prometheus_client import CollectorRegistry

from .config import Settings, settings_info

log = logging.getLogger("worker")


def _flag_type(annotation) -> dict:
    """argparse options for a setting's type: Literal -> choices, Optional[X] -> X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        choices = list(typing.get_args(annotation))
        upper = all(isinstance(c, str) and c.isupper() for c in choices)
        return {"choices": choices, **({"type": str.upper} if upper else {})}
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _flag_type(args[0])
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation if annotation in (int, float, Path) else str}


def add_setting_flags(p: argparse.ArgumentParser, common_only: bool = False) -> None:
    """The flags the Settings model declares (worker/config.py), help text included."""
    for info in settings_info():
        if info.flag and (info.common or not common_only):
            desc = info.field.description
            kind = _flag_type(info.field.annotation)
            if "choices" not in kind and "action" not in kind:
                kind["metavar"] = info.path[-1].upper()
            p.add_argument(info.flag, dest=info.dest, default=None,
                           help=f"{desc + ' ' if desc else ''}({info.env})", **kind)


def settings_from_args(args: argparse.Namespace, **extra) -> Settings:
    """Flags override env vars, which override defaults."""
    over: dict = {}
    for info in settings_info():
        value = getattr(args, info.dest, None)
        if value is None:
            continue
        node = over
        for part in info.path[:-1]:
            node = node.setdefault(part, {})
        node[info.path[-1]] = value
    for section, values in extra.items():
        over.setdefault(section, {}).update(values)
    return Settings(**over)


def cmd_run(args: argparse.Namespace) -> int:
    from model.artifact import ArtifactError

    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.processes > 1:
        from .supervisor import supervise
        return supervise(args.argv, args.processes, settings.metrics.port)
    # Handlers first: a SIGTERM while the model loads (seconds, under load) is a clean stop
    # too, not Python's default exit by signal.
    stopping: list = []

    def on_signal(signum, _frame) -> None:
        log.info("received %s: finishing the batch in hand", signal.Signals(signum).name)
        stopping.append(signum)
        if app is not None:
            app.worker.stop()

    app = None
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from .app import build_worker
    try:
        app = build_worker(settings, CollectorRegistry())
    except ArtifactError as e:  # missing, not a directory, or not a valid model artifact
        print(f"error: cannot load the model {e}", file=sys.stderr)
        return 2
    if stopping:
        app.worker.stop()
    try:
        app.worker.run()
    finally:
        app.close()
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from .kafka_io import create_topics
    settings = settings_from_args(args, **({"kafka": {"partitions": args.partitions}}
                                           if args.partitions else {}))
    created = create_topics(settings.kafka, args.partitions)
    k = settings.kafka
    for name in (k.input_topic, k.output_topic, k.dlq_topic, k.checkpoint_topic):
        print(f"{name}: {'created' if name in created else 'exists'}")
    return 0


def cmd_tenant_key(args: argparse.Namespace) -> int:
    """Print a tenant's signing key (hex), derived from GRU_LIMITS__TENANT_SECRET."""
    from .tenants import TENANT_PATTERN, tenant_key
    secret = Settings().limits.tenant_secret
    if secret is None:
        print("error: GRU_LIMITS__TENANT_SECRET is not set", file=sys.stderr)
        return 2
    if not TENANT_PATTERN.fullmatch(args.tenant):
        print(f"error: {args.tenant!r} is not a tenant name ({TENANT_PATTERN.pattern})",
              file=sys.stderr)
        return 2
    print(tenant_key(secret.get_secret_value().encode(), args.tenant).hex())
    return 0


def main(argv: list[str] | None = None) -> int:
    from .client import add_produce, add_tail
    ap = argparse.ArgumentParser(prog="python -m worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="consume tokens, advance session states, emit predictions")
    add_setting_flags(run)
    run.add_argument("--processes", type=int, default=1,
                     help="run N worker processes in the group (metrics on port, port+1, ...)")
    run.set_defaults(func=cmd_run)

    topics = sub.add_parser("topics", help="create the input, output and dead-letter topics")
    topics.add_argument("action", choices=["create"])
    add_setting_flags(topics, common_only=True)
    topics.add_argument("--partitions", type=int, default=None,
                        help="partitions per topic (default GRU_KAFKA__PARTITIONS, 6)")
    topics.set_defaults(func=cmd_topics)

    key = sub.add_parser("tenant-key", help="print a tenant's signing key, derived from "
                         "GRU_LIMITS__TENANT_SECRET (give it to that tenant's producers only)")
    key.add_argument("tenant")
    key.set_defaults(func=cmd_tenant_key)

    common = lambda p: add_setting_flags(p, common_only=True)  # noqa: E731
    add_produce(sub, common, settings_from_args)
    add_tail(sub, common, settings_from_args)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
