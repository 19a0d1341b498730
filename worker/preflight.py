"""Start-up checks: refuse what cannot work before the worker joins its group, one line each.

``app.build_worker`` runs them in this order, each before anything that depends on it:

1. the metrics port: bound first (``port_error`` names a port in use), before the model loads;
2. (the model loads: ``model.artifact`` names a bad model directory;)
3. ``check_redis``: a PING. A wrong password, a missing ACL permission, an unknown host or a
   rejected certificate end start-up at once; a refused connection or a timeout is retried
   until ``startup_timeout_s``;
4. ``check_kafka``: a bootstrap within ``startup_timeout_s`` (kafka-python's own is 30 s, then
   a traceback), then the input, output and dead-letter topics must exist, or are created
   when ``kafka.create_topics`` is set.

Each failure is a ``StartupError``: ``__main__`` prints its lines and exits with code 2.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Iterator

from .config import ConfigError, KafkaSettings, MetricsSettings, Settings
from .failures import (
    classify,
    kafka_hosts,
    one_line,
    redis_address,
    redis_hosts,
    unresolvable_hosts,
)

log = logging.getLogger(__name__)

PORT_SETTING = "GRU_METRICS__PORT / --metrics-port"
HOST_SETTING = "GRU_METRICS__HOST / --metrics-host"


class StartupError(ConfigError):
    """The worker cannot start with these settings here: one line per problem."""

    def __init__(self, line: str | list[str]) -> None:
        super().__init__([line] if isinstance(line, str) else line)


# --- 1. the metrics port --------------------------------------------------------------------

def port_error(m: MetricsSettings, error: OSError) -> StartupError:
    """The line for a metrics server that could not bind (``HealthServer`` binds at
    construction, so ``build_worker`` builds it before the model)."""
    if isinstance(error, socket.gaierror):
        return StartupError(f"metrics host {m.host!r} is not a known address ({HOST_SETTING}): "
                            f"{error.strerror}")
    if error.errno == errno.EADDRINUSE:
        return StartupError(f"metrics port {m.port} on {m.host} is in use ({PORT_SETTING}); "
                            f"pick another, or 0 for any free port")
    if error.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"metrics host {m.host} is not an address of this machine "
                            f"({HOST_SETTING})")
    if error.errno == errno.EACCES:
        return StartupError(f"metrics port {m.port} on {m.host} needs privileges this process "
                            f"does not have ({PORT_SETTING})")
    return StartupError(f"cannot serve metrics on {m.host}:{m.port} ({PORT_SETTING}): "
                        f"{one_line(error)}")


# --- 3. Redis -------------------------------------------------------------------------------

def check_redis(settings: Settings, connect: Callable[[], object],
                sleep: Callable[[float], None] = time.sleep) -> None:
    """PING the store through a client from ``connect`` (a Redis Cluster client connects as
    it is built, so building is inside the check)."""
    url = settings.redis.url
    where = f"redis at {redis_address(url)}"
    deadline = time.monotonic() + settings.startup_timeout_s
    delay = 0.2
    while True:
        client = None
        try:
            client = connect()
            client.ping()  # type: ignore[attr-defined]
            return
        except Exception as e:  # noqa: BLE001 - classified below; nothing else may escape
            verdict = classify(e, redis_hosts(url))
            if verdict.permanent:
                check = "GRU_REDIS__URL (--redis-url)"
                if "authentic" in verdict.reason or "authoriz" in verdict.reason:
                    check = "GRU_REDIS__USERNAME and GRU_REDIS__PASSWORD (or the URL's)"
                elif "TLS" in verdict.reason:
                    check = "GRU_REDIS__SSL_CA_CERTS, GRU_REDIS__SSL_CERTFILE"
                raise StartupError(f"{where}: {verdict.reason} ({one_line(e)}); check {check}") \
                    from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartupError(
                    f"{where} did not answer within {settings.startup_timeout_s:g}s "
                    f"(GRU_STARTUP_TIMEOUT_S): {one_line(e)}; check GRU_REDIS__URL "
                    f"(--redis-url) and that Redis is up") from None
            if delay == 0.2:  # once: the final line says it all
                log.warning("%s: %s; trying again for up to %.0fs", where, one_line(e), left)
            sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()


# --- 4. Kafka -------------------------------------------------------------------------------

class _Captured(logging.Handler):
    """Keeps the records (and the exceptions in their arguments) that kafka-python logs
    while a check runs: its bootstrap logs the reason of each failed attempt and raises only
    a timeout at the end."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.errors += [a for a in args if isinstance(a, BaseException)]


@contextlib.contextmanager
def _quiet_kafka_logs() -> Iterator[_Captured]:
    """kafka-python's logs during the check go to the capture, not to stderr: the check says
    what failed in one line."""
    logger = logging.getLogger("kafka")
    handler = _Captured()
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)  # the reasons of failed attempts are warnings
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, _ = saved
        logger.setLevel(saved[1])


def kafka_error(bootstrap_servers: str, error: BaseException, timeout_s: float,
                also: list[BaseException] = ()) -> StartupError:
    """The line for a Kafka client that could not start or answer: a permanent failure
    found in ``error`` or in ``also`` (what kafka-python logged meanwhile) names the setting
    to fix; anything else says no broker answered in time."""
    hosts = kafka_hosts(bootstrap_servers)
    where = f"kafka at {bootstrap_servers}"
    for err in [*also, error]:
        verdict = classify(err, hosts)
        if verdict.permanent:
            check = "GRU_KAFKA__BOOTSTRAP_SERVERS (--bootstrap)"
            if "authentic" in verdict.reason:
                check = ("GRU_KAFKA__SASL_MECHANISM, GRU_KAFKA__SASL_PLAIN_USERNAME and "
                         "GRU_KAFKA__SASL_PLAIN_PASSWORD")
            elif "authoriz" in verdict.reason:
                check = "the ACLs of GRU_KAFKA__SASL_PLAIN_USERNAME"
            return StartupError(f"{where}: {verdict.reason} ({one_line(err)}); check {check}")
    last = also[-1] if also else error
    return StartupError(f"{where}: no broker answered within {timeout_s:g}s "
                        f"(GRU_STARTUP_TIMEOUT_S) ({one_line(last)}); check "
                        f"GRU_KAFKA__BOOTSTRAP_SERVERS (--bootstrap) and that Kafka is up")


def _admin(k: KafkaSettings, timeout_s: float):
    from kafka import KafkaAdminClient
    ms = max(1, int(timeout_s * 1000))
    return KafkaAdminClient(**k.client_options(), bootstrap_timeout_ms=ms,
                            request_timeout_ms=min(k.request_timeout_ms, ms))


def check_kafka(settings: Settings, create: bool | None = None) -> list[str]:
    """Bootstrap within ``startup_timeout_s`` and find the three topics; create the missing
    ones when ``create`` (default: ``kafka.create_topics``) is set. Returns the topics
    created."""
    from kafka import errors as kerr

    k, timeout_s = settings.kafka, settings.startup_timeout_s
    hosts = kafka_hosts(k.bootstrap_servers)
    unknown = unresolvable_hosts(hosts)
    if len(unknown) == len(hosts):  # no name resolves: waiting will not help
        raise StartupError(f"kafka at {k.bootstrap_servers}: unknown host {', '.join(unknown)}; "
                           f"check GRU_KAFKA__BOOTSTRAP_SERVERS (--bootstrap)")
    admin = None
    with _quiet_kafka_logs() as captured:
        try:
            admin = _admin(k, timeout_s)
            existing = set(admin.list_topics())
        except Exception as e:  # noqa: BLE001 - classified below
            if admin is not None:
                with contextlib.suppress(Exception):
                    admin.close()
            raise kafka_error(k.bootstrap_servers, e, timeout_s, captured.errors) from None
        try:
            topics = [("input", k.input_topic, "GRU_KAFKA__INPUT_TOPIC / --input-topic"),
                      ("output", k.output_topic, "GRU_KAFKA__OUTPUT_TOPIC / --output-topic"),
                      ("dead-letter", k.dlq_topic, "GRU_KAFKA__DLQ_TOPIC")]
            if create:  # `topics create` makes the checkpoint topic too (the worker would)
                topics.append(("checkpoint", k.checkpoint_topic, "GRU_KAFKA__CHECKPOINT_TOPIC"))
            missing = [t for t in topics if t[1] not in existing]
            if not missing:
                return []
            if not (k.create_topics if create is None else create):
                named = ", ".join(f"{role} {name!r} ({setting})" for role, name, setting in missing)
                raise StartupError(
                    f"kafka at {k.bootstrap_servers} has no topic {named}: create "
                    f"{'it' if len(missing) == 1 else 'them'} (python -m worker topics create), "
                    f"or set GRU_KAFKA__CREATE_TOPICS=true")
            return _create(k)
        except kerr.KafkaError as e:
            raise kafka_error(k.bootstrap_servers, e, timeout_s) from None
        finally:
            with contextlib.suppress(Exception):
                admin.close()


def _create(k: KafkaSettings) -> list[str]:
    """Create the missing topics as ``topics create`` does (partitions, replication factor)."""
    from .kafka_io import create_topics
    created = create_topics(k)
    if created:
        log.info("created topics %s (%d partitions, replication factor %d)",
                 ", ".join(created), k.partitions, k.replication_factor)
    return created
