"""The engine's own host cost: ``Engine.apply`` minus the model step, per message, on the CPU.

For S sessions x 1 message of K tokens per batch, every session with a stored state (steady
state: each batch's new values are the next batch's loaded ones), it times ``apply`` and
subtracts the step time the engine reports (``BatchResult.step_seconds``). What is left is
the engine's planning, state decoding and encoding, digests and prediction columns.

``--compare DIR`` also runs the same measurement in another checkout (e.g. a worktree of an
earlier commit) in a child process, alternating rounds, so both figures come from one run.

    python -m bench.engine [--sessions 512 8192] [--compare ../wt-before]

Writes bench/results/engine-<date>.json (``bench.common.write_result``) and prints a line
per round and tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(sessions: int, tokens: int, repeats: int, model_dir: str, threads: int) -> dict:
    import numpy as np
    import torch

    import model as model_pkg
    from worker.engine import Engine
    from worker.messages import TokenMessage
    from worker.ports import Record

    torch.set_num_threads(threads)
    clf = model_pkg.load(model_dir)
    engine = Engine(clf.model)
    rng = np.random.default_rng(0)
    vocab = len(clf.vocab)

    def batch(seq: int) -> list:
        ids = rng.integers(2, vocab, (sessions, tokens)).tolist()
        return [TokenMessage(f"s{i}", seq, ids[i], False,
                             Record("tokens", i % 4, seq * sessions + i, f"s{i}".encode(), b"", 0))
                for i in range(sessions)]

    loaded = {u.session_id: u.value for u in engine.apply(batch(0), {}).updates}
    host, step = [], []
    for r in range(1, repeats + 1):
        msgs = batch(r)
        t0 = time.perf_counter()
        res = engine.apply(msgs, loaded)
        total = time.perf_counter() - t0
        host.append((total - res.step_seconds) / sessions * 1e6)
        step.append(res.step_seconds / sessions * 1e6)
        loaded = {u.session_id: u.value for u in res.updates}
        assert len(res.updates) == sessions
    return {"sessions": sessions, "tokens": tokens, "repeats": repeats,
            "host_us_per_msg_median": round(statistics.median(host), 2),
            "host_us_per_msg_min": round(min(host), 2),
            "step_us_per_msg_median": round(statistics.median(step), 2)}


def measure_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sessions", type=int, nargs="+", default=[512, 8192])
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)


def child(argv: list[str]) -> int:
    """One tree's measurement, as JSON on stdout. It imports nothing from bench/: run by this
    file's path with another tree first on the path, that tree's bench/ may differ."""
    ap = argparse.ArgumentParser()
    measure_options(ap)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model", required=True)
    args = ap.parse_args(argv)
    print(json.dumps([measure(s, args.tokens, args.repeats, args.model, args.threads)
                      for s in args.sessions]))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return child(argv)
    from bench import common
    ap = common.parser("engine", __doc__)
    measure_options(ap)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds with --compare")
    ap.add_argument("--compare", default=None, metavar="DIR",
                    help="another checkout to measure in the same run")
    args = ap.parse_args(argv)
    model_dir = str(common.resolve_model(args.model).resolve())
    trees = {"this": str(common.ROOT)} | ({"compare": str(Path(args.compare).resolve())}
                                          if args.compare else {})
    res: dict = {"model": model_dir, "threads": args.threads, "rounds": []}
    if args.compare:  # the commit header is this tree's
        res["compare"] = {"dir": trees["compare"], "commit": common.commit(trees["compare"])}
    for rnd in range(args.rounds if args.compare else 1):
        for name, tree in trees.items():
            # This file, run by its path (not as bench.engine, which would be the other
            # tree's), imports worker/ and model/ from the tree it measures.
            out = subprocess.run([sys.executable, __file__, "--child", "--model", model_dir,
                                  "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                                  "--threads", str(args.threads),
                                  "--sessions", *map(str, args.sessions)],
                                 cwd=tree, env={**os.environ, "PYTHONPATH": tree},
                                 capture_output=True, text=True, check=True)
            rows = json.loads(out.stdout.strip().splitlines()[-1])
            for r in rows:
                r.update(tree=name, round=rnd + 1)
                res["rounds"].append(r)
                print(f"round {rnd + 1} {name:<8} {r['sessions']:>6} sessions: host "
                      f"{r['host_us_per_msg_median']:6.2f} us/msg (min {r['host_us_per_msg_min']:.2f}), "
                      f"step {r['step_us_per_msg_median']:6.2f} us/msg", flush=True)
    common.write_result("engine", res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
