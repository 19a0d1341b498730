"""The seams of the worker: the record types and the ``Protocol``s the loop talks to.

The loop (``worker.loop``) and the adapters (``worker.kafka_io``, ``worker.state``) both import
from here and from nowhere else, so an adapter can be swapped without touching the loop, and
tests satisfy the same protocols with in-memory fakes (``tests/fakes.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed Kafka record, independent of the client library."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()  # Kafka record headers, in order (may repeat)


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    partition: int | None = None  # None: the key-hash partitioner chooses


class Source(Protocol):
    """A consumer-group member. ``on_assigned``/``on_revoked`` run inside ``poll`` and must
    stay short: they only note what changed; the loop does the work (fencing tokens, seeks)."""

    def bind(self, on_assigned: Callable[[list[TopicPartition]], None],
             on_revoked: Callable[[list[TopicPartition]], None]) -> None: ...
    def poll(self, max_records: int, max_wait_ms: int) -> list[Record]:
        """Records of partitions this member holds; raises DependencyError (or its subclass
        UndecodableInput for a record batch that cannot be decoded)."""
    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]: ...
    def offsets_for_time(self, partitions: Sequence[TopicPartition],
                         timestamp_ms: int) -> dict[TopicPartition, int | None]:
        """The first offset at or after ``timestamp_ms`` per partition (None: no such record)."""
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def reset_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """Where the reset policy starts each partition (when nothing was committed)."""
    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool: ...
    def commit_async(self, offsets: Mapping[TopicPartition, int],
                     done: Callable[[dict[TopicPartition, int], bool], None]) -> None:
        """Send a commit without waiting; ``done(offsets, ok)`` runs on the caller's thread
        during a later ``poll``, ``commit`` or ``commit_async`` (or at once)."""
    def read_tail(self, topic: str, partition: int, count: int) -> list[Record]:
        """The last ``count`` records of ``topic[partition]`` (fewer when the log holds
        fewer), read outside the group: no commit, and the group's positions are untouched."""
    def lag(self, fresh: bool = False) -> dict[TopicPartition, int]:
        """Per assigned partition: messages after our position (after the committed offset
        where we have none yet). ``fresh``: ask the broker for the end offsets (while the loop
        waits out an outage) instead of the watermarks of the last fetch."""
    def rejoin(self) -> None: ...
    def close(self) -> None: ...


class Sending(Protocol):
    """A sink's handle on messages it was given and has not confirmed yet."""

    messages: list[Outgoing]
    done_at: list[float]  # when the last message was answered (empty until then)


class Sink(Protocol):
    def send(self, messages: Sequence[Outgoing]) -> Sending:
        """Start sending, without waiting for acknowledgements."""
    def wait(self, sending: Sending) -> list[tuple[Outgoing, str]]:
        """Wait for every acknowledgement. Returns the messages the broker or the client
        rejected for good (too large, invalid), each with the reason; raises
        DependencyError(pending=...) for sends that may succeed when retried."""
    def close(self) -> None: ...


class WriteStatus(IntEnum):
    OK = 0
    STALE = 1  # the stored position is not the one loaded: a duplicate or a lost race
    FENCED = 2  # the partition's fencing token is no longer ours: a newer owner took it
    CORRUPT = 3  # the stored value is not a state value: nothing was written
    BEHIND = 4  # the partition's recorded offset went back: Redis lost writes; nothing written


@dataclass(frozen=True, slots=True)
class Claim:
    """What claiming a partition returns: the fencing token the writes must carry, and
    the next offset that the last write for this partition recorded (None: no record)."""

    token: str
    next_offset: int | None


@dataclass(frozen=True, slots=True)
class StateWrite:
    session_id: str
    partition: TopicPartition
    expected_pos: int | None  # the last_pos that was loaded; None if the key was absent
    new_pos: int
    value: bytes
    ttl_ms: int
    model: str | None = None  # the model namespace (None: the store's current model)
    replaces: bool = False  # the loaded value expired in event time: new_pos may go back


@dataclass(frozen=True, slots=True)
class PartitionMark:
    """Per partition of a write call: the fencing token; the next offset this writer last saw
    recorded (None: none yet), which the stored one must not be behind; and the next offset
    this batch has applied (recorded with the states, in the same atomic call, unless a write
    was refused)."""

    token: str
    next_offset: int
    expected: int | None = None


@dataclass(frozen=True, slots=True)
class StoreResult:
    statuses: list[WriteStatus]  # one per write, in order
    fenced: frozenset[TopicPartition] = frozenset()
    # Partitions whose recorded offset was behind ``expected``: Redis lost writes under a
    # running writer (a restore, a failover). Nothing of theirs was written. Value: the
    # recorded next offset (None: none at all).
    behind: dict[TopicPartition, int | None] = field(default_factory=dict)
    recorded: frozenset[TopicPartition] = frozenset()  # partitions whose offset was recorded


class StateStore(Protocol):
    def claim(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, Claim]:
        """Take a new, never reused fencing token per partition: any older owner is fenced."""
    def load(self, session_ids: Sequence[str], partitions: Sequence[TopicPartition],
             models: Sequence[str | None] = (None,)) -> list[bytes | None]:
        """Each session's value under each model namespace (None: the current model), in
        one round trip, model-major: ``len(models) * len(session_ids)`` values."""
    def store(self, marks: Mapping[TopicPartition, PartitionMark],
              writes: Sequence[StateWrite]) -> StoreResult: ...
    def count_sessions(self, models: Sequence[str | None]) -> dict[str | None, tuple[int, int]]:
        """Per model namespace: (live, ended) sessions stored. A scan: for the drain check
        of a previous model, not the hot path."""
    def ping(self) -> bool: ...
