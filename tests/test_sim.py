"""Tier 4: the deterministic fault simulator (tests/sim) in CI.

A batch of seeds runs the real worker against the in-memory broker and Redis under seeded
faults and checks the invariants against the offline oracle; a failing seed is printed with
its violations and replays exactly (``python -m tests.sim --seed S --shrink``). The corpus
(tests/sim/corpus) holds the minimal schedules the simulator found, one per bug, named after
it: each replays exactly and must keep every invariant once its bug is fixed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sim.scenario import Scenario, generate

pytestmark = pytest.mark.sim

ROOT = Path(__file__).resolve().parents[1]
SEEDS = int(os.environ.get("GRU_SIM_SEEDS", "500"))
CORPUS = sorted((ROOT / "tests" / "sim" / "corpus").glob("*.json"))
# Minimal schedules of bugs found and not fixed yet: each must still break an invariant (a
# fix makes its test pass, and fail as strict xfail: the schedule then moves to the corpus).
OPEN = sorted((ROOT / "tests" / "sim" / "open").glob("*.json"))
BUDGET_S = 120.0  # what CI allows the batch (2 cores)


def _signature(sc: Scenario) -> tuple:
    """What a run leaves: every record of every topic, the commits, where time ended."""
    from tests.sim.run import simulate
    trace = simulate(sc)
    records = tuple((topic, r.partition, r.offset, r.key, r.value, r.timestamp_ms)
                    for topic, parts in sorted(trace.broker.topics.items())
                    for part in parts for r in part.records)
    commits = tuple(sorted((tp, c.offset, c.metadata) for tp, c in trace.group.committed.items()))
    return records, commits, trace.end, trace.turns


def test_a_seed_replays_exactly_and_so_does_its_saved_scenario():
    sc = generate(7)
    assert _signature(sc) == _signature(sc)
    assert _signature(Scenario.from_json(sc.to_json())) == _signature(sc)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_each_minimal_schedule_found_keeps_every_invariant(path: Path):
    from tests.sim.oracle import check
    from tests.sim.run import simulate
    sc = Scenario.from_json(path.read_text())
    found = check(simulate(sc))
    assert not found, (f"{path.name}: python -m tests.sim --replay {path} --verbose\n"
                       + sc.describe() + "\n" + "\n".join(str(v) for v in found))


@pytest.mark.parametrize("path", OPEN, ids=lambda p: p.stem)
@pytest.mark.xfail(strict=True, reason="an open bug: see the schedule's name and CHANGELOG.md")
def test_each_open_schedule_still_breaks_an_invariant(path: Path):
    from tests.sim.oracle import check
    from tests.sim.run import simulate
    found = check(simulate(Scenario.from_json(path.read_text())))
    assert not found, "\n".join(str(v) for v in found)


@pytest.mark.heavy
def test_a_batch_of_seeds_keeps_every_invariant():
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "tests.sim", "--seeds", str(SEEDS), "--jobs", "2", "--no-shrink"],
        cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True,
        timeout=BUDGET_S * 3, check=False)
    took = time.monotonic() - t0
    tail = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, f"the simulator found violations ({took:.0f}s):\n{tail}"
    assert took <= BUDGET_S, f"{SEEDS} seeds took {took:.0f}s, over {BUDGET_S:.0f}s:\n{tail}"
