"""Command line: ``python -m worker run | topics create | produce | tail | plan | tenant-key``.

``run`` builds the Settings once (env ``GRU_*`` plus flags), wires the model, the state
store, Kafka and metrics together, and runs the loop until SIGTERM/SIGINT or a bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import types
import typing

from prometheus_client import CollectorRegistry

from .config import ConfigError, Settings, load_settings, settings_info, unknown_env
from .logs import configure_logging, json_line

log = logging.getLogger("worker")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (``error: ...``) and exit code 2, as for
    every other setting that cannot be right. Subcommands inherit it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _flag_type(annotation) -> dict:
    """argparse options for a setting's type. Values reach the Settings model as text, so
    that a bad one is reported as any bad setting is (worker/config.py, ``explain``);
    Literal choices show in the help, Optional[X] is X, a bool is --x/--no-x."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        choices = list(typing.get_args(annotation))
        upper = all(isinstance(c, str) and c.isupper() for c in choices)
        return {"metavar": "{" + ",".join(map(str, choices)) + "}",
                "type": str.upper if upper else str}
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _flag_type(args[0])
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": str}


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def setting_help(info) -> str:
    """A flag's help: what the setting does, its default and its env var."""
    desc = (info.field.description or "").strip()
    default = info.field.get_default(call_default_factory=True)
    return f"{desc + ' ' if desc else ''}[default: {_shown(default)}; env {info.env}]" \
        .replace("%", "%%")


def add_setting_flags(p: argparse.ArgumentParser, common_only: bool = False) -> None:
    """The flags the Settings model declares (worker/config.py), help text included."""
    for info in settings_info():
        if info.flag and (info.common or not common_only):
            kind = _flag_type(info.field.annotation)
            if "metavar" not in kind and "action" not in kind:
                kind["metavar"] = info.path[-1].upper()
            p.add_argument(info.flag, dest=info.dest, default=None, help=setting_help(info),
                           **kind)


def settings_from_args(args: argparse.Namespace, **extra) -> Settings:
    """Flags override env vars, which override defaults. ``ConfigError`` names each setting
    that cannot be right (the flag when the value came from one)."""
    over: dict = {}
    flagged: set[tuple[str, ...]] = set()
    for info in settings_info():
        value = getattr(args, info.dest, None)
        if value is None:
            continue
        flagged.add(info.path)
        node = over
        for part in info.path[:-1]:
            node = node.setdefault(part, {})
        node[info.path[-1]] = value
    for section, values in extra.items():
        over.setdefault(section, {}).update(values)
    return load_settings(over, frozenset(flagged))


def _setup_logging(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, settings.library_log_level)
    for line in unknown_env(os.environ):
        log.warning(line)


def _json_requested(args: argparse.Namespace) -> bool:
    fmt = getattr(args, "log_format", None) or os.environ.get("GRU_LOG_FORMAT", "")
    return str(fmt).lower() == "json"


def fatal(lines: list[str], as_json: bool = False) -> int:
    """Print why the command cannot go on, one line per problem, and return exit code 2.
    With GRU_LOG_FORMAT=json each line is a JSON log record, as the log shipper expects."""
    for line in lines:
        print(json_line("CRITICAL", line) if as_json else f"error: {line}", file=sys.stderr,
              flush=True)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    from model.artifact import ArtifactError

    from .errors import Stalled
    from .failures import PermanentFailure

    settings = settings_from_args(args)
    _setup_logging(settings)
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
        return fatal([f"cannot load the model {e}"], settings.log_format == "json")
    if stopping:
        app.worker.stop()
    try:
        app.worker.run()
    except PermanentFailure as e:  # the group was left; the orchestrator sees the crash
        return fatal([str(e)], settings.log_format == "json")
    except Stalled as e:
        fatal([str(e)], settings.log_format == "json")
        return Stalled.exit_code
    finally:
        app.close()
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from .preflight import check_kafka
    settings = settings_from_args(args, **({"kafka": {"partitions": args.partitions}}
                                           if args.partitions else {}))
    _setup_logging(settings)
    created = check_kafka(settings, create=True)  # bounded: one line if Kafka does not answer
    k = settings.kafka
    for name in (k.input_topic, k.output_topic, k.dlq_topic, k.checkpoint_topic):
        print(f"{name}: {'created' if name in created else 'exists'}")
    return 0


def cmd_tenant_key(args: argparse.Namespace) -> int:
    """Print a tenant's signing key (hex), derived from GRU_LIMITS__TENANT_SECRET."""
    from .tenants import TENANT_PATTERN, tenant_key
    secret = Settings().limits.tenant_secret
    if secret is None:
        return fatal(["GRU_LIMITS__TENANT_SECRET is not set"])
    if not TENANT_PATTERN.fullmatch(args.tenant):
        return fatal([f"{args.tenant!r} is not a tenant name ({TENANT_PATTERN.pattern})"])
    print(tenant_key(secret.get_secret_value().encode(), args.tenant).hex())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .capacity import add_plan
    from .client import add_produce, add_tail
    ap = Parser(prog="python -m worker", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="consume tokens, advance session states, emit predictions",
                         description="Consume token messages, advance each session's state, "
                         "produce predictions. Every flag has an env var; flags win.")
    add_setting_flags(run)
    run.add_argument("--processes", type=int, default=1,
                     help="run N worker processes in the group (metrics on port, port+1, ...) "
                     "[default: 1]")
    run.set_defaults(func=cmd_run)

    topics = sub.add_parser("topics", help="create the input, output and dead-letter topics")
    topics.add_argument("action", choices=["create"], help="create the topics that do not exist")
    add_setting_flags(topics, common_only=True)
    topics.add_argument("--partitions", type=int, default=None,
                        help="partitions per topic [default: GRU_KAFKA__PARTITIONS, 6]")
    topics.set_defaults(func=cmd_topics)

    key = sub.add_parser("tenant-key", help="print a tenant's signing key, derived from "
                         "GRU_LIMITS__TENANT_SECRET (give it to that tenant's producers only)")
    key.add_argument("tenant")
    key.set_defaults(func=cmd_tenant_key)

    common = lambda p: add_setting_flags(p, common_only=True)  # noqa: E731
    add_produce(sub, common, settings_from_args)
    add_tail(sub, common, settings_from_args)
    add_plan(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except ConfigError as e:  # settings that cannot be right, or a start-up check that failed
        return fatal(e.lines, _json_requested(args))


if __name__ == "__main__":
    sys.exit(main())
