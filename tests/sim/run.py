"""One simulated run: the real ``Worker``s on the fakes, single-threaded, under a scheduler.

Each worker takes turns (``Worker.run_once``) in simulated-time order. Every call it makes to a
port (source, sink, store, and its clock's sleep) passes an *effect boundary* before and
after the call, where the scheduler produces the records that are due, applies the faults
that are due, and fires the fault meant for that boundary: a crash unwinds the worker there
(``Crash``, which no worker code catches) and a pause makes it a zombie: while it stands at
that boundary the others run (nested turns) until the group has evicted it; then it goes on
with what it had in hand. Workers start, stop and restart between turns.

The run ends once every record is sent, every fault is due and the input is drained (every
partition committed up to its end) before and after a last restart of every worker, or when
that takes too long: a stalled partition.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from worker.errors import DependencyError, ShutdownRequested, UndecodableInput

from .clock import wall_ms
from .faults import BOUNDARY_KINDS, CONTROL_KINDS, TIMED_KINDS, Fault
from .models import SimModel, model_pair
from .scenario import Scenario
from .trace import Skip, Trace, Violation
from .wiring import INPUT, WorkerParts, build_worker, build_world
from .workload import END_TTL_S, SESSION_TIMEOUT_S, TTL_S

OP_COST_S = 0.0005  # simulated time one port call takes
BUSY_WAIT_S = 0.001  # between two turns of a worker that had work
IDLE_WAIT_S = 0.2  # an empty poll waits this long for records (KafkaSource.idle_poll_ms)
IDLE_JUMP_S = 2.0  # when every worker is idle, time jumps to the next event, at most this far
DRAIN_BOUND_S = 300.0  # after the horizon, the input must be drained within this
MAX_SLOTS = 3
WALL_LIMIT_S = 60.0  # a run that takes longer in real time is reported, not waited for


class Crash(BaseException):
    """Unwinds a worker the simulation killed. A BaseException: the worker catches
    DependencyError (and the app Exception), never this."""

    def __init__(self, runner: Runner) -> None:
        super().__init__(runner.name)
        self.runner = runner


class Runaway(Exception):
    """The run took more real time than ``WALL_LIMIT_S``: reported as a violation."""


@dataclass(eq=False)
class Runner:
    slot: int
    name: str
    parts: WorkerParts | None = None
    ready_at: float = 0.0
    dead: bool = False
    busy: bool = False  # its last turn did more than an empty poll
    turns: int = 0


class Hooked:
    """A port as the worker sees it: each call (but the ``passthrough`` ones) passes the
    boundaries ``port.method:before`` and ``port.method:after``; ``note`` (with --verbose)
    is told each call and its result."""

    def __init__(self, inner: object, port: str, boundary: Callable[[str], None],
                 undecodable: Callable[[UndecodableInput], None],
                 passthrough: frozenset[str],
                 note: Callable[[str, tuple, object], None] | None = None) -> None:
        self._inner, self._port, self._boundary = inner, port, boundary
        self._undecodable, self._pass, self._note = undecodable, passthrough, note
        self._cache: dict[str, object] = {}

    def __getattr__(self, name: str):
        got = self._cache.get(name)
        if got is not None:
            return got
        attr = getattr(self._inner, name)
        if name in self._pass or name.startswith("_") or not callable(attr):
            return attr
        where, boundary, undecodable = f"{self._port}.{name}", self._boundary, self._undecodable
        note = self._note

        def call(*args, **kwargs):
            boundary(where + ":before")
            try:
                out = attr(*args, **kwargs)
            except UndecodableInput as e:
                undecodable(e)
                raise
            except DependencyError as e:
                if note is not None:
                    note(where, args, e)
                raise
            if note is not None:
                note(where, args, out)
            boundary(where + ":after")
            return out
        self._cache[name] = call
        return call


PASSTHROUGH = {"source": frozenset({"bind", "lag", "close"}),
               "sink": frozenset({"close"}),
               "store": frozenset({"ping", "count_sessions"}),
               "clock": frozenset({"time", "monotonic"})}
EFFECTS = ("store.claim", "store.store", "sink.send", "source.commit", "source.seek",
           "source.rejoin")


class Simulation:
    """The scheduler of one run (module docstring); ``run`` returns what the oracle reads."""

    def __init__(self, scenario: Scenario, verbose: bool = False) -> None:
        self.sc, self.cfg = scenario, scenario.config
        self.verbose = verbose
        self.world = build_world(self.cfg)
        self.clock, self.broker, self.group = self.world.clock, self.world.broker, self.world.group
        self.redis = self.world.redis
        self.old, self.new = model_pair(self.cfg.model_seed)
        self.current: SimModel = self.old
        self.previous: SimModel | None = None
        self.sends = sorted(scenario.sends, key=lambda s: s.at)
        self.sent = 0
        self.pending: list[Fault] = sorted(scenario.faults, key=lambda f: f.at)
        self.runners: dict[int, Runner] = {}
        self.restarts: dict[int, float] = {}  # slot -> when a new worker takes it
        self.stack: list[Runner] = []  # workers in the middle of a turn (a zombie's pause)
        self.operator_delay: dict[int, float] = {}  # partition -> the operator's reaction time
        self.operator_at: dict[int, float] = {}  # partition -> when the operator acts
        self.operated: set[tuple[int, int]] = set()  # (partition, bad batch start) handled
        self.rollout_pending = self.cfg.rollout_at is not None
        self.counter = 0
        self.trace = Trace(scenario, self.broker, self.group, self.redis)
        self.wall_start = time.monotonic()

    # --- events -----------------------------------------------------------------------------

    def note(self, text: str) -> None:
        if self.verbose:
            self.trace.events.append(f"t={self.clock.now:9.4f} {text}")

    def violation(self, kind: str, detail: str) -> None:
        self.trace.violations.append(Violation(kind, detail))
        self.note(f"VIOLATION {kind}: {detail}")

    def external(self) -> None:
        """What happens whatever the workers do: records sent, timed faults, evictions."""
        now = self.clock.now
        while True:
            send = self.sends[self.sent] if self.sent < len(self.sends) else None
            fault = next((f for f in self.pending if f.kind in TIMED_KINDS), None)
            t_send = send.at if send is not None else float("inf")
            t_fault = fault.at if fault is not None else float("inf")
            if min(t_send, t_fault) > now:
                break
            if t_send <= t_fault:
                assert send is not None
                self.sent += 1
                self.trace.sent.append((send, self.broker.append(
                    INPUT, None if send.key is None else send.key.encode(),
                    None if send.value is None else send.value.encode(), at=send.at)))
            else:
                assert fault is not None
                self.pending.remove(fault)
                self.timed_fault(fault)
        self.group.evict_silent(now)
        self.redis.maybe_snapshot()

    def timed_fault(self, f: Fault) -> None:
        now = self.clock.now
        self.note(f"fault {f}")
        if f.kind == "redis_loss":
            self.redis.wipe()
        elif f.kind == "redis_rollback":
            self.note(f"rolled back to the snapshot of t={self.redis.rollback(f.arg)}")
        elif f.kind == "redis_outage":
            self.redis.down_until = now + f.arg
        elif f.kind == "kafka_outage":
            self.broker.down_until = now + f.arg
        elif f.kind == "retention":
            cutoff = now - f.arg
            for p, part in enumerate(self.broker.topic(INPUT)):
                done = self.group.committed_offset((INPUT, p)) or 0
                first = next((r.offset for r in part.records[part.log_start:done]
                              if (r.timestamp_ms or 0) >= wall_ms(cutoff)), done)
                self.broker.retain((INPUT, p), first)
        elif f.kind == "corrupt" and f.slot < self.cfg.partitions:  # (a shrunk scenario)
            self.broker.corrupt((INPUT, f.slot), int(f.arg))
            self.operator_delay[f.slot] = f.arg2

    def next_event(self, nested: bool) -> float:
        """When something next happens that no worker's turn causes (only what can happen
        while a zombie stands still, when ``nested``). Events already due but waiting (an
        upgrade waiting for the input to drain) do not count."""
        times = [self.sends[self.sent].at] if self.sent < len(self.sends) else []
        times += [f.at for f in self.pending if f.kind in TIMED_KINDS]
        evict = self.group.next_eviction()
        if evict is not None:
            times.append(evict)
        if not nested:
            times += [f.at for f in self.pending if f.kind in CONTROL_KINDS]
            times += list(self.restarts.values()) + list(self.operator_at.values())
            if self.rollout_pending:
                times.append(self.cfg.rollout_at or 0.0)
        return min((t for t in times if t > self.clock.now), default=float("inf"))

    # --- effect boundaries ------------------------------------------------------------------

    def boundary(self, r: Runner, where: str) -> None:
        if where.endswith(":before"):
            self.clock.now += OP_COST_S
        self.external()
        if r.dead:
            raise Crash(r)
        if where.split(":")[0] in EFFECTS:
            r.busy = True
        while True:  # scanned afresh each time: a zombie's pause runs the others' faults
            now = self.clock.now
            f = next((f for f in self.pending if f.at <= now and f.kind in BOUNDARY_KINDS
                      and f.where == where and (f.kind != "pause" or self.stack == [r])), None)
            if f is None:
                return
            if f.kind == "crash" and f.arg2 > 1:  # a crash loop: the next worker there too
                self.pending[self.pending.index(f)] = dataclasses.replace(f, at=now,
                                                                          arg2=f.arg2 - 1)
            else:
                self.pending.remove(f)
            self.note(f"{r.name} at {where}: {f}")
            if f.kind == "crash":
                self.kill(r, f.flag, f.arg)
                raise Crash(r)
            if f.kind == "pause":  # one zombie at a time
                self.pause(r, SESSION_TIMEOUT_S + f.arg)
                if r.dead:
                    raise Crash(r)
            elif f.kind == "reply_lost":
                self.redis.lose_reply.add(f.where.split(":")[0].split(".")[1])
            elif f.kind == "sink_fail":
                assert r.parts is not None
                r.parts.sink.fail_share = f.arg

    def undecodable(self, e: UndecodableInput) -> None:
        p = e.partition
        if p is None or p in self.operator_at:
            return
        part = self.broker.topic(INPUT)[p]
        bad = part.bad_batch(e.offset if e.offset is not None else -1)
        if bad is None or (p, bad[0]) in self.operated:
            return
        self.operator_at[p] = self.clock.now + self.operator_delay.get(p, 5.0)
        self.note(f"undecodable batch {bad} of partition {p} reported; the operator acts at "
                  f"t={self.operator_at[p]:.3f}")

    # --- workers ----------------------------------------------------------------------------

    def start(self, slot: int) -> Runner:
        self.counter += 1
        r = Runner(slot, f"w{self.counter}", ready_at=self.clock.now)

        def wrap(port: str, inner: object) -> object:
            return Hooked(inner, port, lambda where: self.boundary(r, where), self.undecodable,
                          PASSTHROUGH[port],
                          (lambda where, args, out: self.note(
                              f"{r.name} {where}{describe_call(where, args, out)}"))
                          if self.verbose else None)
        r.parts = build_worker(self.world, self.cfg, self.current, self.previous, r.name, wrap)
        self.runners[slot] = r
        self.restarts.pop(slot, None)
        self.note(f"start {r.name} in slot {slot} (model {self.current.model_id}"
                  f"{', previous ' + self.previous.model_id if self.previous else ''})")
        return r

    def kill(self, r: Runner, flush: bool, restart_after: float | None) -> None:
        assert r.parts is not None
        r.dead = True
        r.parts.member.silent_since = self.clock.now
        if flush:
            r.parts.sink.flush_unsent()
        if self.runners.get(r.slot) is r:
            del self.runners[r.slot]
            if restart_after is not None:
                self.restarts[r.slot] = self.clock.now + restart_after
        self.note(f"crash {r.name}" + (" (its producer's buffer gets out)" if flush else ""))

    def stop(self, r: Runner) -> None:
        """A clean stop (SIGTERM): finish the batch in hand, commit, leave the group."""
        assert r.parts is not None
        self.stack.append(r)
        try:
            r.parts.worker.stop()
            r.parts.worker.settle()
        except (ShutdownRequested, Crash):
            pass
        except Exception as e:  # noqa: BLE001 - a bug in the worker, reported
            self.violation("worker-raised", f"{r.name} while stopping: {e!r}\n"
                           f"{traceback.format_exc(limit=6)}")
        finally:
            self.stack.pop()
        if not r.dead:
            r.dead = True
            r.parts.member.close()
        self.runners.pop(r.slot, None)
        self.note(f"stop {r.name}")

    def stop_all(self) -> list[int]:
        slots = sorted(set(self.runners) | set(self.restarts))
        for r in list(self.runners.values()):
            if self.runners.get(r.slot) is r:  # a zombie's pause in one stop may kill another
                self.stop(r)
        self.restarts.clear()
        return slots

    def pause(self, r: Runner, seconds: float) -> None:
        """``r`` stands still (heartbeats too) while the others run."""
        assert r.parts is not None
        member = r.parts.member
        member.silent_since = self.clock.now
        until = self.clock.now + seconds
        while self.clock.now < until:
            self.tick(nested=True, deadline=until)
        member.silent_since = None
        self.note(f"{r.name} resumes")

    def turn(self, r: Runner) -> None:
        assert r.parts is not None
        r.busy = False
        r.turns += 1
        self.stack.append(r)
        self.trace.turns += 1
        try:
            r.parts.worker.run_once()
        except Crash as c:
            if c.runner is not r:
                raise
        except Runaway:
            raise
        except Exception as e:  # noqa: BLE001 - a bug in the worker, reported
            self.violation("worker-raised", f"{r.name}: {e!r}\n{traceback.format_exc(limit=8)}")
            self.kill(r, False, 1.0)
        finally:
            self.stack.pop()
        if not r.dead:
            r.ready_at = self.clock.now + (BUSY_WAIT_S if r.busy else IDLE_WAIT_S)

    # --- the scheduler ----------------------------------------------------------------------

    def tick(self, nested: bool = False, deadline: float = float("inf")) -> None:
        if time.monotonic() - self.wall_start > WALL_LIMIT_S:
            raise Runaway(f"more than {WALL_LIMIT_S}s of real time")
        self.external()
        if not nested:
            self.control()
        runnable = [r for r in self.runners.values() if r not in self.stack]
        t_event = self.next_event(nested)
        if not runnable:
            self.clock.advance_to(min(t_event, deadline, self.clock.now + IDLE_JUMP_S))
            return
        r = min(runnable, key=lambda r: (r.ready_at, r.slot))
        wake = r.ready_at
        settled = not self.group.rebalancing and all(
            x.parts is not None and x.parts.member.generation == self.group.generation
            for x in runnable)
        if settled and not any(x.busy for x in runnable):
            wake = max(wake, min(t_event, self.clock.now + IDLE_JUMP_S))
        if wake > min(t_event, deadline):
            self.clock.advance_to(min(t_event, deadline))
            return
        self.clock.advance_to(wake)
        self.external()
        self.turn(r)

    def drained(self) -> bool:
        """Every partition committed up to its end, and every worker settled: assigned, its
        last turn idle, nothing left to read (a rebuild rewinds a partition below its end)."""
        if self.group.rebalancing or self.restarts or not self.runners:
            return False
        parts = self.broker.topic(INPUT)
        for r in self.runners.values():
            assert r.parts is not None
            m = r.parts.member
            if r.busy or not r.turns or m.generation != self.group.generation \
                    or any(m.positions.get(tp, 0) < parts[tp[1]].end for tp in m.assigned):
                return False
        return all((self.group.committed_offset((INPUT, p)) or 0) >= part.end
                   for p, part in enumerate(parts))

    def control(self) -> None:
        """Workers start and stop, between turns."""
        now = self.clock.now
        for slot, t in sorted(self.restarts.items()):
            if t <= now:
                self.start(slot)
        for f in [f for f in self.pending if f.kind in CONTROL_KINDS and f.at <= now]:
            if f.kind == "upgrade" and not self.drained():
                continue  # once the input is drained
            self.pending.remove(f)
            self.note(f"fault {f}")
            if f.kind == "join":
                free = [s for s in range(MAX_SLOTS) if s not in self.runners
                        and s not in self.restarts]
                if free:
                    self.start(free[0])
            elif f.kind == "leave":
                if f.slot in self.runners and len(self.runners) + len(self.restarts) > 1:
                    self.stop(self.runners[f.slot])
            elif f.kind == "upgrade":
                slots = self.stop_all()
                self.note(f"{self.redis.downgrade(TTL_S, END_TTL_S)} states rewritten as GRS2")
                self.trace.upgraded_at = self.clock.now
                for slot in slots:
                    self.start(slot)
        for p, t in sorted(self.operator_at.items()):
            if t <= now:
                self.operate(p)
        if self.rollout_pending and now >= (self.cfg.rollout_at or 0.0) and self.drained():
            self.rollout_pending = False
            slots = self.stop_all()
            self.trace.rollout_offsets = {p: part.end
                                          for p, part in enumerate(self.broker.topic(INPUT))}
            self.current, self.previous = self.new, self.old
            self.note(f"rollout: input offsets {self.trace.rollout_offsets} were the old model's")
            for slot in slots:
                self.start(slot)

    def operate(self, p: int) -> None:
        """docs/reliability.md, "Undecodable input": stop the workers, reset the group past
        the batch, start them again. Only once the group is stuck right at the batch."""
        tp = (INPUT, p)
        part = self.broker.part(tp)
        done = self.group.committed_offset(tp) or 0
        bad = part.bad_batch(done)
        if bad is None or bad[0] != done:
            self.operator_at[p] = self.clock.now + 5.0  # not stuck at it (yet): look again
            return
        del self.operator_at[p]
        self.operated.add((p, bad[0]))
        slots = self.stop_all()
        while self.group.members:  # a crashed worker is still a member until evicted
            t = self.group.next_eviction()
            self.clock.advance_to(t if t is not None else self.clock.now + 1.0)
            self.external()
        self.broker.admin_reset(self.group, tp, bad[1])
        self.trace.skips.append(Skip(p, bad[0], bad[1], self.clock.now))
        self.note(f"operator: group reset on partition {p} from {done} to {bad[1]}")
        for slot in slots:
            self.start(slot)

    def run(self) -> Trace:
        logger = logging.getLogger("worker")
        logger.setLevel(logging.INFO if self.verbose else logging.CRITICAL)
        handler = _ToEvents(self)
        logger.addHandler(handler)
        logger.propagate = False
        for slot in range(self.cfg.workers):
            self.start(slot)
        horizon = self.sc.horizon
        restarted = False
        try:
            while True:
                now = self.clock.now
                quiet = not self.rollout_pending and not self.operator_at and not any(
                    f.kind in CONTROL_KINDS for f in self.pending)
                if now > horizon and quiet and self.drained():
                    if restarted:
                        break
                    # A last restart: every partition is claimed again, so what Redis lost
                    # since the last write is found and rebuilt before the states are checked.
                    restarted = True
                    for slot in self.stop_all():
                        self.start(slot)
                if now > horizon + DRAIN_BOUND_S:
                    self.report_stall()
                    break
                self.tick()
        except Runaway as e:
            self.violation("runaway", str(e))
        finally:
            logger.removeHandler(handler)
        self.trace.end = self.clock.now
        return self.trace

    def report_stall(self) -> None:
        parts = []
        for p, part in enumerate(self.broker.topic(INPUT)):
            tp = (INPUT, p)
            done = self.group.committed_offset(tp) or 0
            at = [f"{r.name} at {r.parts.member.positions.get(tp)}" for r in self.runners.values()
                  if r.parts is not None and tp in r.parts.member.assigned]
            if done < part.end or any(r.parts is not None and tp in r.parts.member.assigned
                                      and r.parts.member.positions.get(tp, 0) < part.end
                                      for r in self.runners.values()):
                skips = [s for s in self.trace.skips if s.partition == p]
                parts.append(f"partition {p}: committed {done} of {part.end}, read by "
                             f"{', '.join(at) or 'nobody'}"
                             + (f", undecodable batches {part.bad}" if part.bad else "")
                             + (f", operator skips {skips}" if skips else ""))
        pending = [f.kind for f in self.pending if f.kind in CONTROL_KINDS]
        self.violation("stall", f"input not drained {DRAIN_BOUND_S:.0f}s after the last event: "
                       + "; ".join(parts or ["every partition done, the group not settled"])
                       + ("; rollout pending" if self.rollout_pending else "")
                       + (f"; pending {pending}" if pending else ""))


def describe_call(where: str, args: tuple, out: object) -> str:
    """One port call, for --verbose: what went in and what came back."""
    if isinstance(out, DependencyError):
        return f" failed: {out}"
    if where == "source.poll":
        recs = list(out)  # type: ignore[call-overload]
        return " -> " + (", ".join(f"{r.topic}[{r.partition}]@{r.offset}" for r in recs)
                         if recs else "nothing")
    if where == "store.store":
        marks, writes = args
        res = out
        statuses = [st.name for st in res.statuses]  # type: ignore[attr-defined]
        return (" " + ", ".join(f"{w.session_id}@{w.expected_pos}->{w.new_pos}={st}"
                                for w, st in zip(writes, statuses))
                + " marks " + ", ".join(f"{tp[1]}:{m.next_offset}" for tp, m in marks.items()))
    if where == "store.claim":
        return " -> " + ", ".join(f"{tp[1]}: next_offset {c.next_offset}"
                                  for tp, c in out.items())  # type: ignore[attr-defined]
    if where in ("sink.send", "sink.wait"):
        msgs = args[0] if where == "sink.send" else args[0].messages
        return f" {len(msgs)}: " + ", ".join(_short(m) for m in msgs)
    if where in ("source.commit", "source.commit_async", "source.seek", "source.committed"):
        return f" {args[0] if where != 'source.seek' else args} -> {out}"
    return ""


def _short(m: object) -> str:
    value = getattr(m, "value", b"")
    try:
        body = json.loads(value)
    except ValueError:
        return f"{getattr(m, 'topic', '?')}:?"
    if "reason" in body:
        return f"dead letter of {body.get('partition')}@{body.get('offset')}"
    return f"{body.get('session_id')} seq {body.get('seq')}"


class _ToEvents(logging.Handler):
    """The worker's log lines, into the run's events (with --verbose), by who logged them."""

    def __init__(self, sim: Simulation) -> None:
        super().__init__(logging.INFO)
        self.sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        who = self.sim.stack[-1].name if self.sim.stack else "-"
        self.sim.note(f"{who} log: {record.getMessage()}")


def simulate(scenario: Scenario, verbose: bool = False) -> Trace:
    return Simulation(scenario, verbose).run()
