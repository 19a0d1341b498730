"""The failures the loop handles by policy rather than by crashing.

Adapters translate their client library's transient errors into ``DependencyError``; the
loop retries those with backoff and commits nothing that was not done.
"""

from __future__ import annotations


class DependencyError(Exception):
    """Redis or Kafka is unreachable or timed out; the call may be retried as it is."""

    def __init__(self, dependency: str, message: str, pending: list | None = None,
                 rejected: list | None = None) -> None:
        super().__init__(f"{dependency}: {message}")
        self.dependency = dependency
        self.pending = pending  # for deliveries: what is still unacknowledged
        self.rejected = rejected or []  # for deliveries: (message, reason) refused for good


class UndecodableInput(DependencyError):
    """A record batch of the input cannot be decoded (a compression codec the client lacks,
    a failed CRC). Its partition cannot advance past it; the other partitions go on."""

    def __init__(self, topic: str | None, partition: int | None, offset: int | None,
                 error: BaseException) -> None:
        where = f"{topic}[{partition}] at offset {offset}" if topic is not None else \
            "an unknown partition"
        super().__init__("kafka", f"cannot decode the record batch of {where}: {error!r}")
        self.topic, self.partition, self.offset, self.error = topic, partition, offset, error


class ShutdownRequested(Exception):
    """Raised out of a retry loop when the worker is asked to stop mid-outage."""


class Stalled(Exception):
    """The worker held partitions with input waiting and made no progress for
    ``retry.release_after_s`` while retrying a dependency: it leaves the group (exit code 3)
    so that a healthy member takes the partitions over."""

    exit_code = 3
