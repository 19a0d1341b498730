"""The two failures the loop handles by policy rather than by crashing.

Adapters translate their client library's transient errors into ``DependencyError``; the
loop retries those with backoff and commits nothing that was not done.
"""

from __future__ import annotations


class DependencyError(Exception):
    """Redis or Kafka is unreachable or timed out; the call may be retried as it is."""

    def __init__(self, dependency: str, message: str, pending: list | None = None) -> None:
        super().__init__(f"{dependency}: {message}")
        self.dependency = dependency
        self.pending = pending  # for deliveries: what is still unacknowledged


class ShutdownRequested(Exception):
    """Raised out of a retry loop when the worker is asked to stop mid-outage."""
