"""A seeded fault schedule: what goes wrong, when, and at which effect boundary.

A fault fires at simulated time ``at`` or later: a *boundary* fault at the first matching
boundary a worker passes (``where``: a port call and ``before``/``after`` it, e.g.
``store.store:after`` is "the states were written, nothing produced yet"), a *timed* fault
at once, a *control* fault (workers start and stop) between two turns. Removing one fault
leaves the others meaningful, which is what shrinking a failing schedule needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .workload import Config

# Every effect boundary of the order of effects (worker/loop.py), and a sleep (a backoff).
BOUNDARIES = tuple(f"{op}:{phase}" for op in (
    "source.poll", "store.claim", "source.committed", "source.reset_offsets",
    "source.offsets_for_time", "source.read_tail", "source.seek", "store.load", "store.store",
    "sink.send", "sink.wait", "source.commit", "source.commit_async", "source.rejoin",
    "clock.sleep") for phase in ("before", "after"))

BOUNDARY_KINDS = ("crash", "pause", "reply_lost", "sink_fail")
TIMED_KINDS = ("redis_loss", "redis_rollback", "redis_outage", "kafka_outage", "retention",
               "corrupt")
CONTROL_KINDS = ("join", "leave", "upgrade")


@dataclass(frozen=True)
class Fault:
    """``kind`` with its arguments:

    * crash: the worker that reaches ``where`` dies (everything in memory lost; ``flag``: the
      producer's buffer still gets out); a new worker takes its slot ``arg`` s later. With
      ``arg2`` = n > 1, the next n - 1 workers that reach ``where`` die there too (a crash
      loop: the same step kills every worker that gets to it).
    * pause: the worker that reaches ``where`` stops for the session timeout plus ``arg`` s
      (a zombie: the group evicts it; it resumes with what it had in hand).
    * reply_lost: the next ``where`` (store.claim or store.store) runs, its reply is lost.
    * sink_fail: the next ``sink.wait`` delivers only the leading share ``arg``.
    * redis_loss: Redis restarts empty. redis_rollback: back to its snapshot ``arg`` s old.
    * redis_outage, kafka_outage: every call fails for ``arg`` s.
    * retention: each input partition drops the committed records older than ``arg`` s.
    * corrupt: the next ``int(arg)`` records of input partition ``slot`` form an undecodable
      batch; an operator resets the group past it ``arg2`` s after a worker first reports it.
    * join / leave: a worker joins the group / worker ``slot`` leaves it (a clean stop).
    * upgrade: once the input is drained, the workers stop, every state is rewritten in the
      old GRS2 format (what the previous release wrote), and they start again.
    """

    kind: str
    at: float
    where: str = ""
    slot: int = -1  # a worker slot or input partition; -1: any
    arg: float = 0.0
    arg2: float = 0.0
    flag: bool = False


_WEIGHTS = {"crash": 3.0, "pause": 1.2, "reply_lost": 1.0, "sink_fail": 1.0, "redis_loss": 1.5,
            "redis_rollback": 1.0, "redis_outage": 0.8, "kafka_outage": 0.6, "retention": 0.6,
            "corrupt": 0.5, "join": 0.6, "leave": 0.6, "upgrade": 0.25}
ONCE = ("corrupt", "upgrade")


def generate(rng: random.Random, cfg: Config, horizon: float) -> list[Fault]:
    kinds, weights = list(_WEIGHTS), list(_WEIGHTS.values())
    out: list[Fault] = []
    for _ in range(rng.randint(1, 7)):
        kind = rng.choices(kinds, weights)[0]
        if kind in ONCE and any(f.kind == kind for f in out):
            continue
        at = round(rng.uniform(2.0, horizon), 3)
        if kind == "crash":
            out.append(Fault(kind, at, rng.choice(BOUNDARIES), arg=round(rng.uniform(0.5, 6), 2),
                             arg2=rng.choice([1, 1, 2, 3]), flag=rng.random() < 0.5))
        elif kind == "pause":
            out.append(Fault(kind, at, rng.choice(BOUNDARIES), arg=round(rng.uniform(1, 10), 2)))
        elif kind == "reply_lost":
            out.append(Fault(kind, at, rng.choice(["store.store:before", "store.claim:before"])))
        elif kind == "sink_fail":
            out.append(Fault(kind, at, "sink.wait:before", arg=rng.choice([0.0, 0.5])))
        elif kind == "redis_rollback":
            out.append(Fault(kind, at, arg=round(rng.uniform(3, 60), 1)))
        elif kind in ("redis_outage", "kafka_outage"):
            top = 8.0 if kind == "redis_outage" else 4.0  # Kafka: less than the session timeout
            out.append(Fault(kind, at, arg=round(rng.uniform(0.2, top), 2)))
        elif kind == "retention":
            out.append(Fault(kind, at, arg=round(rng.uniform(20, 150), 1)))
        elif kind == "corrupt":
            out.append(Fault(kind, at, slot=rng.randrange(cfg.partitions),
                             arg=rng.randint(1, 3), arg2=round(rng.uniform(3, 15), 1)))
        elif kind == "leave":
            out.append(Fault(kind, at, slot=rng.randrange(3)))
        else:
            out.append(Fault(kind, at))
    return sorted(out, key=lambda f: f.at)
