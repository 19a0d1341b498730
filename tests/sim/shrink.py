"""Shrink a failing scenario to a minimal one that still fails the same way.

Greedy, one item at a time (delta debugging's simplest form): drop each fault, then each
workload session, then each remaining record, then simplify the settings, keeping every
change after which the run still shows the violation kind the original failed with first.
Repeats until nothing more can go or the time budget is spent.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from .oracle import check
from .run import simulate
from .scenario import Scenario
from .trace import Violation


def violations(sc: Scenario) -> list[Violation]:
    return check(simulate(sc))


def shrink(sc: Scenario, kind: str | None = None, budget_s: float = 120.0,
           progress: Callable[[str], None] = lambda line: None) -> Scenario:
    """The smallest scenario found in ``budget_s`` that still has a violation of ``kind``
    (default: the kind of ``sc``'s first violation)."""
    if kind is None:
        found = violations(sc)
        if not found:
            return sc
        kind = found[0].kind
    deadline = time.monotonic() + budget_s

    def fails(candidate: Scenario) -> bool:
        return time.monotonic() < deadline and any(v.kind == kind
                                                   for v in violations(candidate))

    best = sc
    while time.monotonic() < deadline:
        before = best
        best = _reduce(best, fails, lambda s: list(s.faults),
                       lambda s, items: dataclasses.replace(s, faults=tuple(items)))
        best = _reduce(best, fails, lambda s: list(dict.fromkeys(x.session for x in s.sends)),
                       lambda s, names: dataclasses.replace(s, sends=tuple(
                           x for x in s.sends if x.session in set(names))))
        best = _reduce(best, fails, lambda s: list(s.sends),
                       lambda s, items: dataclasses.replace(s, sends=tuple(items)))
        for candidate in _simpler(best):
            if fails(candidate):
                best = candidate
        if best == before:
            break
        progress(f"  down to {len(best.faults)} faults and {len(best.sends)} records"
                 + (", simpler settings" if best.config != before.config else ""))
    return best


def _reduce(sc: Scenario, fails: Callable[[Scenario], bool],
            items: Callable[[Scenario], list], rebuild: Callable[[Scenario, list], Scenario]
            ) -> Scenario:
    """Drop the items one at a time, keeping each drop after which it still fails."""
    i = 0
    while i < len(items(sc)):
        have = items(sc)
        candidate = rebuild(sc, have[:i] + have[i + 1:])
        if fails(candidate):
            sc = candidate
        else:
            i += 1
    return sc


def _simpler(sc: Scenario):
    c = sc.config
    options = [("rollout_at", None), ("workers", 1), ("partitions", 1),
               ("commit_interval_ms", 0), ("async_commits", False), ("emit", "every"),
               ("min_confidence", 0.0), ("max_records", 64)]
    for name, value in options:
        if getattr(c, name) != value:
            yield dataclasses.replace(sc, config=dataclasses.replace(c, **{name: value}))
