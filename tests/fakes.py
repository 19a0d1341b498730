"""In-memory stand-ins for Kafka that satisfy the worker's Source and Sink protocols."""

from __future__ import annotations

import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Sequence

from worker.errors import DependencyError
from worker.ports import Record


class FakeLog:
    """Topics of partitions of records, with per-group committed offsets."""

    def __init__(self, partitions: int = 3) -> None:
        self.partitions = partitions
        self.records: dict[tuple[str, int], list[Record]] = defaultdict(list)
        self.committed: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)
        self.clock_ms = int(time.time() * 1000)  # record timestamps: now, 1 ms apart

    def append(self, topic: str, key: bytes | None, value: bytes | None,
               partition: int | None = None, headers: tuple = ()) -> Record:
        if partition is None:
            # crc32, not hash(): the same partitions on every run, whatever PYTHONHASHSEED
            partition = (zlib.crc32(key) if key is not None else len(self.records)) % self.partitions
        log = self.records[(topic, partition)]
        self.clock_ms += 1
        rec = Record(topic, partition, len(log), key, value, self.clock_ms, tuple(headers))
        log.append(rec)
        return rec

    def values(self, topic: str) -> list[bytes]:
        recs = [r for (t, _), rs in self.records.items() if t == topic for r in rs]
        return [r.value for r in sorted(recs, key=lambda r: r.timestamp_ms)]


class FakeSource:
    def __init__(self, log: FakeLog, topic: str, group: str = "g",
                 partitions: Sequence[int] | None = None) -> None:
        self.log, self.topic, self.group = log, topic, group
        self.partitions = list(range(log.partitions) if partitions is None else partitions)
        self.positions: dict[tuple[str, int], int] = {}
        self.assigned = False
        self.rejoins = 0
        self.closed = False
        self._answers: list = []  # asynchronous commits not yet answered
        self.fail_async = 0  # the next N asynchronous commits fail

    def bind(self, on_assigned, on_revoked) -> None:
        self.on_assigned, self.on_revoked = on_assigned, on_revoked

    def _assign(self) -> None:
        tps = [(self.topic, p) for p in self.partitions]
        committed = self.log.committed[self.group]
        self.positions = {tp: committed.get(tp, 0) for tp in tps}
        self.assigned = True
        self.on_assigned(tps)

    def poll(self, max_records: int, max_wait_ms: int) -> list[Record]:
        self._answer()
        if not self.assigned:
            self._assign()
        out: list[Record] = []
        for tp, pos in self.positions.items():
            recs = self.log.records[tp][pos:pos + max_records - len(out)]
            out += recs
            self.positions[tp] = pos + len(recs)
        return out

    def committed(self, partitions):
        return {tp: self.log.committed[self.group].get(tp) for tp in partitions}

    def offsets_for_time(self, partitions, timestamp_ms):
        out = {}
        for tp in partitions:
            out[tp] = next((r.offset for r in self.log.records[tp]
                            if r.timestamp_ms >= timestamp_ms), None)
        return out

    def seek(self, partition, offset) -> None:
        self.positions[partition] = offset

    def reset_offsets(self, partitions):
        return {tp: 0 for tp in partitions}

    def commit(self, offsets) -> bool:
        self._answer()
        return self._apply(offsets)

    def _apply(self, offsets) -> bool:
        committed = self.log.committed[self.group]
        for tp, off in offsets.items():
            assert off >= committed.get(tp, 0), f"commit of {tp} went backwards"
            committed[tp] = off
        return True

    def commit_async(self, offsets, done) -> None:
        """Answered at the next poll, as kafka-python answers (``fail_async``: that many
        answers are failures, the commit not applied)."""
        self._answers.append((dict(offsets), done))

    def _answer(self) -> None:
        answers, self._answers = self._answers, []
        for offsets, done in answers:
            if self.fail_async > 0:
                self.fail_async -= 1
                done(offsets, False)
            else:
                done(offsets, self._apply(offsets))

    def read_tail(self, topic, partition, count):
        recs = self.log.records[(topic, partition)]
        return list(recs[max(0, len(recs) - count):]) if count else []

    def lag(self, fresh=False):
        return {tp: len(self.log.records[tp]) - pos for tp, pos in self.positions.items()}

    def rejoin(self) -> None:
        self.rejoins += 1
        self.on_revoked(list(self.positions))
        self.assigned = False

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeSending:
    messages: list
    done_at: list = field(default_factory=list)


class FakeSink:
    """Appends to the log. ``refuse(message)`` returning a reason refuses that message for
    good, as Kafka does a message over its size limit."""

    def __init__(self, log: FakeLog, fail_times: int = 0, crash: bool = False,
                 refuse=None) -> None:
        self.log = log
        self.fail_times = fail_times
        self.crash = crash
        self.refuse = refuse
        self.refused: list = []

    def send(self, messages):
        if self.crash:
            raise SystemExit("simulated crash before produce")
        return FakeSending(list(messages))

    def wait(self, sending):
        if self.fail_times:
            self.fail_times -= 1
            raise DependencyError("kafka", "broker unavailable (simulated)",
                                  pending=list(sending.messages))
        rejected = []
        for m in sending.messages:
            why = self.refuse(m) if self.refuse else None
            if why:
                rejected.append((m, why))
                self.refused.append(m)
                continue
            self.log.append(m.topic, m.key, m.value, m.partition)
        sending.done_at.append(time.time())
        return rejected

    def close(self) -> None:
        pass


# --- what Redis can do to the state store -------------------------------------------------

def snapshot(store) -> tuple[dict, dict]:
    """A point-in-time copy of a MemoryStateStore (an RDB snapshot, a lagging replica)."""
    with store._lock:
        return dict(store._data), {tp: dict(m) for tp, m in store._marks.items()}


def restore(store, snap: tuple[dict, dict]) -> None:
    """Roll the store back to a snapshot: every later write is gone, marks included."""
    with store._lock:
        store._data, store._marks = dict(snap[0]), {tp: dict(m) for tp, m in snap[1].items()}


def wipe(store) -> None:
    """Redis restarted empty: every state and every mark is gone."""
    restore(store, ({}, {}))
