"""An in-memory Kafka for the simulator: topics of partitions, retention, consumer groups with
an eager rebalance protocol, commits with metadata, an admin offset reset, undecodable batches.

``Member`` is a consumer-group member that satisfies the worker's ``Source`` port the way
kafka-python does: rebalance callbacks run inside ``poll`` (revoke everything, then assign
the new set; a partition kept across a rebalance keeps its position); a member that stopped
heartbeating (crashed, or paused past the session timeout) is evicted, and a commit from a
member outside the group's current generation fails (CommitFailedError: ``commit`` returns
False). ``BrokerSink`` is the producer side. Nothing here is random: the simulation decides.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from worker.errors import DependencyError, UndecodableInput
from worker.ports import Outgoing, Record, TopicPartition

from .clock import SimClock, wall_ms

Metadata = str | Mapping[TopicPartition, str] | None


@dataclass
class Partition:
    records: list[Record] = field(default_factory=list)
    log_start: int = 0  # retention deleted everything below
    bad: list[tuple[int, int]] = field(default_factory=list)  # undecodable batches [start, end)
    corrupt_next: int = 0  # the next N appended records form one undecodable batch
    first_fetch: dict[int, float] = field(default_factory=dict)  # offset -> when first fetched
    # (time, log_start) after each retention step, for "was it deleted at time t"
    retention: list[tuple[float, int]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return len(self.records)

    def bad_batch(self, offset: int) -> tuple[int, int] | None:
        return next(((a, b) for a, b in self.bad if a <= offset < b), None)

    def next_bad(self, offset: int) -> int:
        """The start of the first undecodable batch at or after ``offset`` (else the end)."""
        return min([a for a, _ in self.bad if a >= offset] + [self.end])

    def log_start_at(self, t: float) -> int:
        start = 0
        for when, s in self.retention:
            if when <= t:
                start = s
        return start


@dataclass
class Committed:
    offset: int
    metadata: str
    by: str  # the member id, or "admin"
    at: float


class Group:
    """A consumer group on one topic, with the eager protocol: a membership change starts a
    rebalance; every member revokes everything at its next poll; once all members have
    rejoined (the silent ones evicted after the session timeout), the new assignment is
    handed out, each member taking its share at its next poll."""

    def __init__(self, broker: Broker, group_id: str, topic: str, assignor: str,
                 session_timeout_s: float) -> None:
        self.broker, self.group_id, self.topic = broker, group_id, topic
        self.assignor, self.session_timeout_s = assignor, session_timeout_s
        self.members: dict[str, Member] = {}
        self.generation = 0
        self.rebalancing = False
        self.waiting: set[str] = set()  # members that have not rejoined this rebalance
        self.assignment: dict[str, list[TopicPartition]] = {}
        self.committed: dict[TopicPartition, Committed] = {}
        self.history: list[tuple[float, TopicPartition, int, str, str]] = []  # every commit

    # --- membership ------------------------------------------------------------------------

    def join(self, m: Member) -> None:
        self.members[m.member_id] = m
        self._rebalance()

    def leave(self, m: Member) -> None:
        if self.members.pop(m.member_id, None) is not None:
            self._rebalance()

    def evict_silent(self, now: float) -> None:
        for m in sorted(self.members.values(), key=lambda m: m.member_id):
            if m.silent_since is not None and now >= m.silent_since + self.session_timeout_s:
                m.lost = True
                self.members.pop(m.member_id)
                self._rebalance()

    def next_eviction(self) -> float | None:
        times = [m.silent_since + self.session_timeout_s for m in self.members.values()
                 if m.silent_since is not None]
        return min(times) if times else None

    def rejoined(self, m: Member) -> None:
        self.waiting.discard(m.member_id)
        self._complete()

    def stable_for(self, m: Member) -> bool:
        return not self.rebalancing and m.generation == self.generation

    def _rebalance(self) -> None:
        self.generation += 1
        self.rebalancing = True
        self.waiting = set(self.members)
        self.assignment = {}
        self._complete()

    def _complete(self) -> None:
        if not self.rebalancing or self.waiting:
            return
        self.rebalancing = False
        ids = sorted(self.members)
        tps = [(self.topic, p) for p in range(len(self.broker.topic(self.topic)))]
        self.assignment = {i: [] for i in ids}
        if not ids:
            return
        if self.assignor == "range":
            per, extra = divmod(len(tps), len(ids))
            at = 0
            for k, i in enumerate(ids):
                n = per + (1 if k < extra else 0)
                self.assignment[i] = tps[at:at + n]
                at += n
        else:  # round robin
            for k, tp in enumerate(tps):
                self.assignment[ids[k % len(ids)]].append(tp)

    # --- offsets ---------------------------------------------------------------------------

    def commit(self, offsets: Mapping[TopicPartition, int], metadata: Metadata, by: str,
               now: float) -> None:
        for tp, off in offsets.items():
            meta = metadata.get(tp, "") if isinstance(metadata, Mapping) else (metadata or "")
            self.committed[tp] = Committed(off, meta, by, now)
            self.history.append((now, tp, off, meta, by))

    def committed_offset(self, tp: TopicPartition) -> int | None:
        c = self.committed.get(tp)
        return None if c is None else c.offset


class Broker:
    """Topics auto-created with ``partitions`` partitions each (the worker's output, dead
    letter and any checkpoint topic alike); a topic's records keep every appended record
    (the oracle reads them), fetches and ``read_tail`` respect the log start."""

    def __init__(self, clock: SimClock, partitions: int) -> None:
        self.clock = clock
        self.partitions = partitions
        self.topics: dict[str, list[Partition]] = {}
        self.groups: dict[str, Group] = {}
        self.down_until = -1.0  # a Kafka outage: every client call fails until then
        self._round_robin = 0

    def topic(self, name: str) -> list[Partition]:
        parts = self.topics.get(name)
        if parts is None:
            parts = self.topics[name] = [Partition() for _ in range(self.partitions)]
        return parts

    def part(self, tp: TopicPartition) -> Partition:
        return self.topic(tp[0])[tp[1]]

    def group(self, group_id: str, topic: str, assignor: str, session_timeout_s: float) -> Group:
        g = self.groups.get(group_id)
        if g is None:
            g = self.groups[group_id] = Group(self, group_id, topic, assignor, session_timeout_s)
        return g

    def check_up(self, what: str) -> None:
        if self.clock.now < self.down_until:
            raise DependencyError("kafka", f"{what} failed: broker unavailable (simulated)")

    # --- the log ----------------------------------------------------------------------------

    def partition_for(self, topic: str, key: bytes | None) -> int:
        n = len(self.topic(topic))
        if key is None:
            self._round_robin += 1
            return self._round_robin % n
        return zlib.crc32(key) % n  # crc32, not hash(): the same on every run

    def append(self, topic: str, key: bytes | None, value: bytes | None,
               partition: int | None = None, at: float | None = None) -> Record:
        p = self.partition_for(topic, key) if partition is None else partition
        part = self.topic(topic)[p]
        ts = wall_ms(self.clock.now if at is None else at)
        if part.records:  # a producer's timestamps may lag; the log's never go back
            ts = max(ts, part.records[-1].timestamp_ms or ts)
        rec = Record(topic, p, part.end, key, value, ts)
        part.records.append(rec)
        if part.corrupt_next > 0:
            part.corrupt_next -= 1
            if part.bad and part.bad[-1][1] == rec.offset:
                part.bad[-1] = (part.bad[-1][0], rec.offset + 1)
            else:
                part.bad.append((rec.offset, rec.offset + 1))
        return rec

    def corrupt(self, tp: TopicPartition, count: int) -> None:
        """The next ``count`` records appended to ``tp`` form a batch no client can decode."""
        self.part(tp).corrupt_next = count

    def retain(self, tp: TopicPartition, first: int) -> None:
        """Retention deleted every record of ``tp`` below ``first``."""
        part = self.part(tp)
        first = min(first, part.end)
        if first > part.log_start:
            part.log_start = first
            part.retention.append((self.clock.now, first))

    def offsets_for_time(self, tp: TopicPartition, timestamp_ms: int) -> int | None:
        part = self.part(tp)
        return next((r.offset for r in part.records[part.log_start:]
                     if (r.timestamp_ms or 0) >= timestamp_ms), None)

    def read_tail(self, topic: str, partition: int, count: int) -> list[Record]:
        part = self.topic(topic)[partition]
        start = max(part.log_start, part.end - count)
        bad = [b for b in part.bad if b[1] > start]
        if bad and count:
            raise UndecodableInput(topic, partition, bad[0][0],
                                   ValueError("CorruptRecordError (simulated)"))
        return list(part.records[start:]) if count else []

    def admin_reset(self, group: Group, tp: TopicPartition, offset: int) -> None:
        """``kafka-consumer-groups --reset-offsets --to-offset``: an admin tool's commit, with
        empty metadata. Kafka refuses it while the group has members."""
        if group.members:
            raise RuntimeError(f"group {group.group_id} has members {sorted(group.members)}: "
                               f"an offset reset needs an empty group")
        group.commit({tp: offset}, "", "admin", self.clock.now)


class Member:
    """One consumer-group member: the worker's ``Source``."""

    def __init__(self, broker: Broker, group: Group, member_id: str) -> None:
        self.broker, self.group, self.member_id = broker, group, member_id
        self.joined = False
        self.lost = False  # evicted while it thought itself a member
        self.closed = False
        self.generation = -1  # the generation of ``assigned``
        self.assigned: list[TopicPartition] = []
        self.positions: dict[TopicPartition, int] = {}
        self.silent_since: float | None = None  # heartbeats stopped (crashed or paused)
        self._answers: list[tuple[dict[TopicPartition, int], bool,
                                  Callable[[dict[TopicPartition, int], bool], None]]] = []
        self._turn = 0  # rotates the partition a fetch starts with
        self._on_assigned: Callable[[list[TopicPartition]], None] = lambda tps: None
        self._on_revoked: Callable[[list[TopicPartition]], None] = lambda tps: None
        self.polls_empty = 0

    @property
    def now(self) -> float:
        return self.broker.clock.now

    def bind(self, on_assigned: Callable[[list[TopicPartition]], None],
             on_revoked: Callable[[list[TopicPartition]], None]) -> None:
        self._on_assigned, self._on_revoked = on_assigned, on_revoked

    # --- the group protocol, inside poll ---------------------------------------------------

    def _sync_group(self) -> bool:
        """Join, revoke, or take the new assignment, as kafka-python does inside a poll.
        True when the member holds a settled assignment and may fetch."""
        g = self.group
        if self.lost:  # on_partitions_lost, which defaults to on_partitions_revoked
            self.lost, self.joined = False, False
            held, self.assigned, self.positions = self.assigned, [], {}
            self._on_revoked(list(held))
        if not self.joined:
            self.joined = True
            g.join(self)
        if g.rebalancing:
            if self.member_id in g.waiting:  # eager: revoke everything before rejoining
                self._on_revoked(list(self.assigned))
                g.rejoined(self)
            if g.rebalancing:
                return False
        if self.generation != g.generation:
            new = list(g.assignment.get(self.member_id, []))
            self.positions = {tp: o for tp, o in self.positions.items() if tp in new}
            for tp in new:
                if tp not in self.positions:
                    c = g.committed_offset(tp)
                    self.positions[tp] = self.broker.part(tp).log_start if c is None else c
            self.assigned, self.generation = new, g.generation
            self._on_assigned(list(new))
        return True

    def poll(self, max_records: int, max_wait_ms: int) -> list[Record]:
        self.broker.check_up("poll")
        self._answer()
        if self.closed:
            raise RuntimeError("poll on a closed consumer")
        if not self._sync_group():
            self.polls_empty += 1
            return []
        out = self._fetch(max_records)
        if not out:
            self.polls_empty += 1
        return out

    def _fetch(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        error: tuple[TopicPartition, int] | None = None
        n = len(self.assigned)
        self._turn += 1
        for k in range(n):
            tp = self.assigned[(self._turn + k) % n]
            part = self.broker.part(tp)
            pos = self.positions[tp]
            if pos < part.log_start:  # OffsetOutOfRange: auto_offset_reset=earliest
                pos = self.positions[tp] = part.log_start
            if part.bad_batch(pos) is not None:
                error = error or (tp, pos)
                part.corrupt_next = 0  # a batch is written whole: once read it is sealed
                continue
            stop = min(part.next_bad(pos), pos + max_records - len(out))
            recs = part.records[pos:stop]
            for r in recs:
                part.first_fetch.setdefault(r.offset, self.now)
            self.positions[tp] = pos + len(recs)
            out += recs
            if len(out) >= max_records:
                break
        if not out and error is not None:  # the batch is handed over first, as kafka-python does
            (topic, p), offset = error
            raise UndecodableInput(topic, p, offset, ValueError("CorruptRecordError (simulated)"))
        return out

    # --- offsets ---------------------------------------------------------------------------

    def committed(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int | None]:
        self.broker.check_up("reading committed offsets")
        return {tp: self.group.committed_offset(tp) for tp in partitions}

    def committed_metadata(self, partitions: Sequence[TopicPartition]
                           ) -> dict[TopicPartition, tuple[int, str] | None]:
        """Each partition's committed offset and its metadata string (None: none)."""
        self.broker.check_up("reading committed offsets")
        out: dict[TopicPartition, tuple[int, str] | None] = {}
        for tp in partitions:
            c = self.group.committed.get(tp)
            out[tp] = None if c is None else (c.offset, c.metadata)
        return out

    def offsets_for_time(self, partitions: Sequence[TopicPartition],
                         timestamp_ms: int) -> dict[TopicPartition, int | None]:
        self.broker.check_up("offsets_for_times")
        return {tp: self.broker.offsets_for_time(tp, timestamp_ms) for tp in partitions}

    def seek(self, partition: TopicPartition, offset: int) -> None:
        # kafka-python asserts the partition is assigned ("Unassigned partition")
        assert partition in self.assigned, f"seek on unassigned partition {partition}"
        self.positions[partition] = offset

    def reset_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        self.broker.check_up("listing offsets")
        return {tp: self.broker.part(tp).log_start for tp in partitions}  # earliest

    def _may_commit(self) -> bool:
        return self.joined and not self.lost and not self.closed \
            and self.member_id in self.group.members and self.group.stable_for(self)

    def commit(self, offsets: Mapping[TopicPartition, int], metadata: Metadata = None) -> bool:
        self._answer()
        if self.now < self.broker.down_until or not self._may_commit():
            return False
        self.group.commit(offsets, metadata, self.member_id, self.now)
        return True

    def commit_async(self, offsets: Mapping[TopicPartition, int],
                     done: Callable[[dict[TopicPartition, int], bool], None],
                     metadata: Metadata = None) -> None:
        """Applied (or refused) when sent; the answer runs at the next poll or commit."""
        sent = dict(offsets)
        ok = self.now >= self.broker.down_until and self._may_commit()
        if ok:
            self.group.commit(sent, metadata, self.member_id, self.now)
        self._answers.append((sent, ok, done))

    def _answer(self) -> None:
        answers, self._answers = self._answers, []
        for offsets, ok, done in answers:
            done(offsets, ok)

    # --- the rest of the Source port -------------------------------------------------------

    def read_tail(self, topic: str, partition: int, count: int) -> list[Record]:
        self.broker.check_up("reading a tail")
        return self.broker.read_tail(topic, partition, count)

    def lag(self, fresh: bool = False) -> dict[TopicPartition, int]:
        return {tp: max(0, self.broker.part(tp).end - self.positions.get(tp, 0))
                for tp in self.assigned}

    def rejoin(self) -> None:
        """Leave the group and join again at the next poll (kafka-python: unsubscribe, call
        the listener's revoke, subscribe)."""
        held, self.assigned, self.positions = self.assigned, [], {}
        self.group.leave(self)
        self.joined, self.lost, self.generation = False, False, -1
        self._on_revoked(list(held))

    def close(self) -> None:
        self.group.leave(self)
        self.joined, self.closed = False, True


@dataclass
class Sending:
    messages: list[Outgoing]
    done_at: list[float] = field(default_factory=list)


class BrokerSink:
    """The producer: ``send`` hands messages over, ``wait`` delivers them (acks=all).
    ``fail_next`` makes the next ``wait`` deliver only a leading share and report the rest
    as pending (DependencyError); ``flush_unsent`` delivers what was sent and not waited for
    (what a crashed producer's buffer may still get out)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.unsent: list[Sending] = []
        self.fail_share: float | None = None

    def send(self, messages: Sequence[Outgoing]) -> Sending:
        s = Sending(list(messages))
        self.unsent.append(s)
        return s

    def _deliver(self, messages: Sequence[Outgoing]) -> None:
        for m in messages:
            self.broker.append(m.topic, m.key, m.value, m.partition)

    def wait(self, sending: Sending) -> list[tuple[Outgoing, str]]:
        if sending in self.unsent:
            self.unsent.remove(sending)
        if self.broker.clock.now < self.broker.down_until:
            raise DependencyError("kafka", "sends not acknowledged (simulated outage)",
                                  pending=list(sending.messages))
        if self.fail_share is not None:
            n = int(len(sending.messages) * self.fail_share)
            self.fail_share = None
            self._deliver(sending.messages[:n])
            if n < len(sending.messages):
                raise DependencyError("kafka", f"{len(sending.messages) - n} sends not "
                                      f"acknowledged (simulated)",
                                      pending=list(sending.messages[n:]))
        else:
            self._deliver(sending.messages)
        sending.done_at.append(self.broker.clock.time())
        return []

    def flush_unsent(self) -> None:
        for s in self.unsent:
            self._deliver(s.messages)
        self.unsent = []

    def close(self) -> None:
        pass
