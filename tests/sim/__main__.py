"""The simulator's command line.

    python -m tests.sim --seeds 500 [--start 0] [--jobs 2]   # a batch; exit 1 if one fails
    python -m tests.sim --seed 1234 --verbose                # one run, with what happened
    python -m tests.sim --seed 1234 --shrink                 # and its minimal schedule
    python -m tests.sim --replay failure.json --verbose      # a saved (shrunk) scenario

A failing seed is printed with its violations; ``--shrink`` (on by default for the first
failure of a batch, off with ``--no-shrink``) shrinks it and writes the minimal scenario as
JSON, which ``--replay`` runs again exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .scenario import Scenario, generate


@dataclass
class Outcome:
    seed: int
    violations: list[str]
    kinds: list[str]
    inconclusive: str | None
    seconds: float


def _setup() -> None:
    import torch
    torch.set_num_threads(1)


def run_scenario(sc: Scenario, verbose: bool = False) -> tuple[Outcome, list[str]]:
    from .oracle import check, lag_too_large
    from .run import simulate
    t0 = time.perf_counter()
    trace = simulate(sc, verbose)
    found = check(trace)
    out = Outcome(sc.seed, [str(v) for v in found], [v.kind for v in found],
                  lag_too_large(trace) if found else None, time.perf_counter() - t0)
    return out, trace.events


def run_seed(seed: int) -> Outcome:
    _setup()
    return run_scenario(generate(seed))[0]


def _report(out: Outcome, limit: int = 6) -> str:
    head = (f"seed {out.seed}: " + ("INCONCLUSIVE" if out.inconclusive else "FAIL")
            + f" ({len(out.violations)} violations: {', '.join(sorted(set(out.kinds)))})")
    lines = [head] + [f"    {v[:600]}" for v in out.violations[:limit]]
    if out.inconclusive:
        lines.append(f"    (not counted: {out.inconclusive})")
    return "\n".join(lines)


def _shrink_and_save(sc: Scenario, budget_s: float, save_dir: Path) -> Path:
    from .shrink import shrink
    print(f"shrinking seed {sc.seed} (up to {budget_s:.0f}s)...", flush=True)
    small = shrink(sc, budget_s=budget_s, progress=lambda line: print(line, flush=True))
    path = save_dir / f"sim-failure-{sc.seed}.json"
    path.write_text(small.to_json() + "\n")
    out, _ = run_scenario(small)
    print(f"minimal schedule of seed {sc.seed}:\n{small.describe()}")
    print(_report(out))
    print(f"replay: python -m tests.sim --replay {path} --verbose")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--seeds", type=int, help="run this many seeds, from --start")
    what.add_argument("--seed", type=int, help="run one seed")
    what.add_argument("--replay", type=Path, help="run a scenario saved as JSON")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--verbose", action="store_true", help="print what happened in the run")
    p.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=None,
                   help="shrink a failure to a minimal schedule (a batch: its first failure)")
    p.add_argument("--budget", type=float, default=180.0, help="seconds the shrinking may take")
    p.add_argument("--save-dir", type=Path, default=Path(tempfile.gettempdir()),
                   help="where a shrunk scenario is written (default: the temp directory)")
    args = p.parse_args(argv)
    _setup()

    if args.seed is not None or args.replay is not None:
        sc = generate(args.seed) if args.replay is None else \
            Scenario.from_json(args.replay.read_text())
        out, events = run_scenario(sc, args.verbose)
        if args.verbose:
            print(sc.describe())
            print("\n".join(events))
        print(_report(out, limit=50) if out.violations else
              f"seed {sc.seed}: ok ({out.seconds * 1000:.0f} ms)")
        if out.violations and not out.inconclusive and args.shrink:
            _shrink_and_save(sc, args.budget, args.save_dir)
        return 1 if out.violations and not out.inconclusive else 0

    n = args.seeds if args.seeds is not None else 100
    seeds = range(args.start, args.start + n)
    t0 = time.perf_counter()
    failed: list[Outcome] = []
    inconclusive = 0
    with ProcessPoolExecutor(args.jobs, initializer=_setup) as pool:
        for out in pool.map(run_seed, seeds, chunksize=8):
            if not out.violations:
                continue
            if out.inconclusive:
                inconclusive += 1
            else:
                failed.append(out)
            print(_report(out), flush=True)
    took = time.perf_counter() - t0
    print(f"{n} seeds ({args.start}..{args.start + n - 1}) in {took:.1f}s with {args.jobs} "
          f"jobs: {len(failed)} failed, {inconclusive} inconclusive"
          + (f"; failing seeds: {' '.join(str(o.seed) for o in failed[:50])}"
             + (" ..." if len(failed) > 50 else "") if failed else ""))
    if failed and args.shrink is not False:
        _shrink_and_save(generate(failed[0].seed), args.budget, args.save_dir)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # set iteration orders, for exact replays
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "tests.sim", *sys.argv[1:]])
    sys.exit(main())
