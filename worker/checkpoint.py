"""The commit protocol: which input offsets are done, and when Kafka is told.

A batch's offsets become *acknowledged* once every output of the batch is acknowledged by
Kafka (``worker.delivery``); they are then committed, coalesced over batches:

1. **Acknowledge.** ``acknowledged`` notes each partition's next offset as pending. A
   partition being rebuilt never moves the group back (``worker.recovery`` filters them).
2. **Coalesce.** Pending offsets wait until a commit is due: at most every
   ``kafka.commit_interval_ms`` inside the loop (``Commit.DUE``), at once when input pauses
   (``Commit.NOW``), and at once, waiting for the answer, with every offset not yet
   confirmed, before a claim and at shutdown (``Commit.ALL``).
3. **Send.** A commit carries the pending offsets of the partitions still held, and those of
   earlier commits not yet confirmed: a failed commit is so carried into the next one.
   Inside the loop it is sent without waiting when ``kafka.async_commits`` is on.
4. **Confirm.** The coordinator's answer confirms the offsets; a failed answer leaves them
   unconfirmed (their records are redelivered if no later commit lands, and deduplicated).

A partition revoked from this worker forgets its pending and unconfirmed offsets: the next
owner resumes from the last commit that landed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from enum import Enum

from .clock import Clock
from .config import KafkaSettings
from .metrics import Metrics
from .ports import Source, TopicPartition

log = logging.getLogger("worker.loop")


class Commit(Enum):
    DUE = "due"  # inside the loop: only once the commit interval has passed
    NOW = "now"  # input paused: commit what is pending
    ALL = "all"  # before a claim, at shutdown: everything not confirmed, and wait


class Checkpointer:
    def __init__(self, settings: KafkaSettings, source: Source, metrics: Metrics,
                 clock: Clock) -> None:
        self.source, self.metrics, self.clock = source, metrics, clock
        self.interval_s = settings.commit_interval_ms / 1000
        self.sync = not settings.async_commits
        self.pending: dict[TopicPartition, int] = {}  # acknowledged, not yet committed
        self.unconfirmed: dict[TopicPartition, int] = {}  # sent, not yet confirmed
        self.failed = False  # an asynchronous commit failed: send again when due
        self.last_commit = clock.monotonic()

    def acknowledged(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.pending.update(offsets)

    def forget(self, partitions) -> None:
        for tp in partitions:
            self.pending.pop(tp, None)
            self.unconfirmed.pop(tp, None)

    def commit(self, when: Commit, held: Callable[[TopicPartition], bool]) -> None:
        """Commit what ``when`` calls for, of the partitions ``held`` says are still ours."""
        due = self.clock.monotonic() - self.last_commit >= self.interval_s
        wait = self.sync or when is Commit.ALL
        resend = bool(self.unconfirmed) and (
            when is Commit.ALL or (not wait and self.failed and due))
        if not ((self.pending and (when is not Commit.DUE or due)) or resend):
            return
        offsets = {tp: o for tp, o in self.unconfirmed.items() if held(tp)}
        for tp, o in self.pending.items():
            if held(tp):
                offsets[tp] = max(o, offsets.get(tp, -1))
        self.pending.clear()
        self.last_commit = self.clock.monotonic()
        if not offsets:
            return
        self.unconfirmed.update(offsets)
        # Either call may first deliver older answers; a failure among them is covered by
        # this commit, which carries its offsets too: only this commit's own answer counts.
        with self.metrics.commit_seconds.time():
            if wait:
                ok = self.source.commit(offsets)
                self.failed = False
                self._confirmed(offsets, ok)
            else:
                self.source.commit_async(offsets, self._confirmed)
                self.failed = False

    def _confirmed(self, offsets: dict[TopicPartition, int], ok: bool) -> None:
        if not ok:
            self.failed = True
            log.warning("commit of %s failed (rebalance?): retried with the next commit; "
                        "if none lands, those records are redelivered and deduplicated", offsets)
            return
        for tp, o in offsets.items():
            if self.unconfirmed.get(tp, o + 1) <= o:
                del self.unconfirmed[tp]
