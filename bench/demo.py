"""The demo's latency, both Kafka clients, in alternating rounds.

Runs ``python -m devtools.demo`` (the README's main job: tansu, Redis, the worker as its own
process, held-out BBC articles streamed at a fixed rate) once per client per round, the
clients alternating so that a slow spell of a shared machine falls on both, and reads each
run's summary: latency from produce to the prediction's arrival (p50, p99) and its split at
the worker's send.

    python -m bench.demo [--rounds 3] [--sessions 40] [--max-seconds 60]

Writes bench/results/demo-<date>.json (``bench.common.write_result``): every run's figures,
and per client the range of its p50s and p99s.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from bench import common

SUMMARY = re.compile(r"latency p50 ([\d.]+) ms, p99 ([\d.]+) ms")
SPLIT = re.compile(r"produce to its send p50 ([-\d.]+) ms, p99 ([-\d.]+) ms; "
                   r"its send to received p50 ([-\d.]+) ms, p99 ([-\d.]+) ms")
ACCURACY = re.compile(r"final accuracy ([\d.]+)")


def parse(output: str) -> dict:
    """The figures of one demo run, from its summary lines."""
    summary, split, acc = SUMMARY.search(output), SPLIT.search(output), ACCURACY.search(output)
    if not (summary and split and acc):
        raise ValueError(f"no summary in the demo's output:\n{output[-2000:]}")
    p50, p99 = map(float, summary.groups())
    to_send50, to_send99, after50, after99 = map(float, split.groups())
    return {"p50_ms": p50, "p99_ms": p99, "to_send_p50_ms": to_send50,
            "to_send_p99_ms": to_send99, "send_to_received_p50_ms": after50,
            "send_to_received_p99_ms": after99, "accuracy": float(acc.group(1))}


def run_once(client: str, model_dir: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "devtools.demo", "--model-dir", model_dir,
           "--sessions", str(args.sessions), "--max-seconds", str(args.max_seconds),
           "--kafka-client", client]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_seconds + 600)
    if done.returncode != 0:
        raise RuntimeError(f"{client} demo exited {done.returncode}:\n{done.stdout[-2000:]}"
                           f"{done.stderr[-2000:]}")
    return parse(done.stdout)


def main(argv=None) -> int:
    ap = common.parser("demo", __doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=40)
    ap.add_argument("--max-seconds", type=int, default=60)
    args = ap.parse_args(argv)
    model_dir = str(common.resolve_model(args.model))
    runs = []
    for r in range(args.rounds):
        order = common.CLIENTS if r % 2 == 0 else common.CLIENTS[::-1]
        for client in order:
            fig = run_once(client, model_dir, args)
            runs.append({"round": r + 1, "client": client, **fig})
            print(f"round {r + 1} {client:12s} p50 {fig['p50_ms']:6.1f} ms  "
                  f"p99 {fig['p99_ms']:6.1f} ms  accuracy {fig['accuracy']:.3f}", flush=True)
    ranges = {}
    for client in common.CLIENTS:
        mine = [x for x in runs if x["client"] == client]
        ranges[client] = {k: [min(x[k] for x in mine), max(x[k] for x in mine)]
                          for k in ("p50_ms", "p99_ms")}
        print(f"{client:12s} p50 {ranges[client]['p50_ms']} ms, p99 {ranges[client]['p99_ms']} ms")
    common.write_result("demo", {"params": {**vars(args), "model": model_dir}, "runs": runs,
                                 "ranges": ranges},
                        args.out, with_clients=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
