"""Which dependency failures heal and which do not.

A refused connection or a timeout heals: retry it with backoff. A wrong password, a missing
permission, an unknown host or a certificate the client rejects does not: the worker should
stop with one line naming the dependency and its address (never a secret), so that an
orchestrator's crash loop makes the fault visible, and it must not hold partitions meanwhile.
``classify`` answers for redis-py, kafka-python and confluent-kafka errors, looking through the
chain of causes (the adapters wrap client errors in ``DependencyError ... from e``).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# getaddrinfo answers that will not change by retrying: the name does not exist. EAI_AGAIN
# ("temporary failure in name resolution": the DNS server did not answer) is transient.
_NO_SUCH_HOST = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}

# kafka-python error class names, matched by name so that the module imports no client.
_KAFKA_AUTH = {"SaslAuthenticationFailedError", "UnsupportedSaslMechanismError",
               "IllegalSaslStateError", "KafkaAuthenticationError", "AuthenticationFailedError",
               "AuthenticationMethodNotSupported"}
_KAFKA_CONFIG = {"KafkaConfigurationError", "IllegalArgumentError", "UnrecognizedBrokerVersion",
                 "IncompatibleBrokerVersion"}
# confluent-kafka (librdkafka) error names, from KafkaError.name().
_RDKAFKA_AUTH = {"_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED", "ILLEGAL_SASL_STATE",
                 "UNSUPPORTED_SASL_MECHANISM"}
_RDKAFKA_AUTHZ = {"TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED",
                  "CLUSTER_AUTHORIZATION_FAILED", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
                  "DELEGATION_TOKEN_AUTHORIZATION_FAILED"}
_RDKAFKA_HOST = {"_RESOLVE"}
_RDKAFKA_TLS = {"_SSL"}


@dataclass(frozen=True)
class Failure:
    """What a failure means for the worker: ``permanent`` ones end it, the others are
    retried. ``reason``: a few words for the log line."""

    permanent: bool
    reason: str


TRANSIENT = Failure(False, "unavailable")


def _chain(error: BaseException) -> Iterable[BaseException]:
    """The error and its causes (``raise ... from``) and contexts, each once."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _names(error: BaseException) -> set[str]:
    return {c.__name__ for c in type(error).__mro__}


def _one(error: BaseException, addresses: Iterable[str]) -> Failure | None:
    """The verdict on one error of the chain, or None when it says nothing by itself."""
    names = _names(error)
    module = type(error).__module__ or ""
    # DNS: a name that does not exist.
    if isinstance(error, socket.gaierror):
        return Failure(True, "unknown host") if error.errno in _NO_SUCH_HOST else \
            Failure(False, "name resolution failed (temporarily)")
    # TLS: a certificate that does not verify will not verify on the next try either.
    if isinstance(error, ssl.SSLCertVerificationError):
        detail = getattr(error, "verify_message", None)
        return Failure(True, "TLS certificate rejected" + (f" ({detail})" if detail else ""))
    if module.startswith("redis"):
        if names & {"AuthenticationError", "AuthenticationWrongNumberOfArgsError"}:
            return Failure(True, "authentication failed")
        if names & {"AuthorizationError", "NoPermissionError"}:
            return Failure(True, "not authorized (ACL)")
        if "ResponseError" in names and str(error).startswith(("WRONGPASS", "NOAUTH", "NOPERM")):
            return Failure(True, "authentication failed" if not str(error).startswith("NOPERM")
                           else "not authorized (ACL)")
        return None
    if module.startswith("kafka"):
        if names & _KAFKA_AUTH:
            return Failure(True, "authentication failed")
        if "AuthorizationError" in names:
            return Failure(True, f"not authorized ({type(error).__name__})")
        if names & _KAFKA_CONFIG:
            return Failure(True, f"refused the client's settings ({type(error).__name__})")
        if ("NoBrokersAvailable" in names or "DNS Resolution failure" in str(error)
                or "Unable to bootstrap" in str(error)):
            unknown = unresolvable_hosts(addresses)
            if unknown:
                return Failure(True, f"unknown host {', '.join(unknown)}")
        return None
    if module.startswith(("confluent_kafka", "cimpl")):
        kerr = error.args[0] if error.args else None
        name = kerr.name() if callable(getattr(kerr, "name", None)) else ""
        if name in _RDKAFKA_AUTH:
            return Failure(True, "authentication failed")
        if name in _RDKAFKA_AUTHZ:
            return Failure(True, f"not authorized ({name})")
        if name in _RDKAFKA_HOST:
            unknown = unresolvable_hosts(addresses)
            return Failure(True, f"unknown host {', '.join(unknown)}") if unknown else None
        if name in _RDKAFKA_TLS and "certificate" in str(kerr).lower():
            return Failure(True, "TLS certificate rejected")
        if callable(getattr(kerr, "fatal", None)) and kerr.fatal():
            return Failure(True, f"fatal client error ({name})")
        return None
    return None


def classify(error: BaseException, addresses: Iterable[str] = ()) -> Failure:
    """Permanent or transient, looking through ``error``'s causes. ``addresses``: the
    dependency's ``host:port`` list, resolved again when the client only says that it could
    not connect (kafka-python does not keep the DNS error)."""
    addresses = list(addresses)
    for e in _chain(error):
        verdict = _one(e, addresses)
        if verdict is not None:
            return verdict
    return TRANSIENT


def is_permanent(error: BaseException, addresses: Iterable[str] = ()) -> bool:
    return classify(error, addresses).permanent


def unresolvable_hosts(addresses: Iterable[str]) -> list[str]:
    """The hosts of ``host:port`` addresses that DNS says do not exist (not those whose
    lookup merely failed for now)."""
    out = []
    for address in addresses:
        host = split_host_port(address)[0]
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror as e:
            if e.errno in _NO_SUCH_HOST:
                out.append(host)
        except (UnicodeError, OSError):
            out.append(host)
    return out


def split_host_port(address: str) -> tuple[str, int | None]:
    """``host:port`` (``[v6]:port`` too) -> (host, port)."""
    address = address.strip()
    if "://" in address:
        address = address.split("://", 1)[1]
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = address.rpartition(":") if address.count(":") == 1 else (address, "", "")
    return host, int(port) if port.isdigit() else None


def redis_address(url: str) -> str:
    """Where a Redis URL points, without its credentials: ``host:port/db``."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 6379
    db = parts.path.lstrip("/") or "0"
    return f"{host}:{port}/{db}"


def redis_hosts(url: str) -> list[str]:
    """``host:port`` of a Redis URL, for ``classify``."""
    parts = urlsplit(url)
    return [f"{parts.hostname or 'localhost'}:{parts.port or 6379}"]


def kafka_hosts(bootstrap_servers: str) -> list[str]:
    return [a.strip() for a in bootstrap_servers.split(",") if a.strip()]


class PermanentFailure(Exception):
    """A dependency failed in a way that retrying will not heal. Its message is the one line
    to log before exiting: the dependency, its address and the reason, no secret."""

    def __init__(self, dependency: str, address: str, reason: str, setting: str = "",
                 error: BaseException | None = None) -> None:
        hint = f"; check {setting}" if setting else ""
        detail = f": {one_line(error)}" if error is not None else ""
        super().__init__(f"{dependency} at {address}: {reason}{detail}{hint}")
        self.dependency, self.address, self.reason = dependency, address, reason


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters (kafka-python's messages
    already start with their type)."""
    name, text = type(error).__name__, str(error)
    return " ".join((text if text.startswith(name) else f"{name}: {text}").split())[:300]
