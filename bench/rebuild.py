"""How fast a worker rebuilds its sessions' states from the log after Redis lost everything.

One invocation starts a tansu broker and a private redis-server (no persistence; the shared
Redis is never touched), produces S sessions x M messages of K token ids, and then:

  1. a worker applies them all and commits (the normal rate, measured in the same run);
  2. Redis loses everything (FLUSHALL: a restart without persistence, a lost volume);
  3. a new worker joins the same group, finds committed offsets but no record in Redis,
     and replays the partitions from the start of the state TTL (tansu answers
     offsets_for_times with the earliest offset, so: from the start) with outputs suppressed.

It reports the replay rate (messages/s, one process), the time until every partition's
rebuild finished, and checks that the rebuilt states equal the ones lost (tokens_seen equal,
h within 1e-5).

    python -m bench.rebuild [--sessions 100000] [--messages 2] [--model DIR]

Writes bench/results/rebuild-<date>.json (``bench.common.write_result``) and prints the
figures. ``python -m bench.capacity`` runs the same measurement (``measure``) at a smaller
scale.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
from prometheus_client import CollectorRegistry

from bench import common
from model import load as load_model
from worker.app import build_worker
from worker.codec import decode_state


def run(s) -> dict:
    """Run a worker until idle; time its first and last batch, and its rebuild."""
    app = build_worker(s, CollectorRegistry())
    w, reg = app.worker, app.registry
    marks: dict = {}
    stop = threading.Event()

    def watch() -> None:
        try:
            while not stop.is_set():
                now = time.perf_counter()
                n = w.summary.messages
                if n and "first" not in marks:
                    marks["first"] = now
                if n:
                    marks["last"], marks["last_n"] = now, n
                if w.recovery.rebuilds:
                    marks.setdefault("rebuild_start", now)
                elif "rebuild_start" in marks and "rebuild_end" not in marks:
                    marks["rebuild_end"] = now
                time.sleep(0.02)
        except Exception as e:  # raised in run(), not lost with this thread
            marks["watch_error"] = e

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        w.run()
    finally:
        stop.set()
        t.join()
        app.close()
    if "watch_error" in marks:
        raise RuntimeError("watching the worker failed") from marks["watch_error"]
    marks["rebuilt"] = reg.get_sample_value("gru_rebuild_messages_total") or 0
    marks["messages"] = w.summary.messages
    return marks


def states(client, prefix: str) -> dict[bytes, bytes]:
    keys = [k for k in client.scan_iter(f"{prefix}:*", count=10_000) if b":s:" in k]
    out = {}
    for i in range(0, len(keys), 5000):
        chunk = keys[i:i + 5000]
        out.update(zip(chunk, client.mget(chunk)))
    return out


def measure(sessions: int, messages: int, tokens: int = 4, partitions: int = 4,
            batch: int = 512, model: str | None = None) -> dict:
    """Apply ``sessions`` x ``messages`` messages of ``tokens`` token ids, lose Redis, rebuild;
    the figures, and whether the rebuilt states equal the lost ones."""
    model_dir = common.resolve_model(model)
    clf = load_model(model_dir)
    cfg = clf.model.config
    with common.quiet_logs(), common.Bench(partitions) as bench:
        names = bench.fresh("rb")
        pairs = common.stream(sessions, tokens, sessions * messages, 0, "r", encode=clf.encode)
        n = len(pairs)
        bench.backlog(names, pairs)
        s = common.worker_settings(bench, model_dir, names, batch, 0, 1, idle_exit_s=4.0)
        first = run(s)
        normal_s = first["last"] - first["first"]
        client = bench.redis.client()
        before = states(client, names["prefix"])
        used = client.info("memory")["used_memory"]
        common.log(f"pass 1: {first['messages']} messages in {normal_s:.1f}s "
                   f"({first['messages'] / normal_s:.0f} msg/s), {len(before)} sessions")
        client.flushall()
        second = run(s)
        rebuild_s = second["rebuild_end"] - second["rebuild_start"]
        after = states(client, names["prefix"])
        client.close()
    worst, mismatched = 0.0, 0
    for key, raw in before.items():
        a = decode_state(raw, cfg.num_layers, cfg.state_size, cfg.num_labels)
        got = after.get(key)
        if got is None:
            mismatched += 1
            continue
        b = decode_state(got, cfg.num_layers, cfg.state_size, cfg.num_labels)
        mismatched += a.tokens_seen != b.tokens_seen or a.last_pos != b.last_pos
        worst = max(worst, float(np.abs(a.h - b.h).max()) if a.h.size else 0.0)
    normal_rate = first["messages"] / normal_s
    return {
        "model_id": clf.model_id, "hidden": cfg.hidden_size,
        "sessions": sessions, "messages_per_session": messages,
        "tokens_per_message": tokens, "partitions": partitions, "batch": batch,
        "messages": n, "redis_used_memory_mb": round(used / 2**20, 1),
        "normal_msg_per_s": round(normal_rate),
        "rebuild_messages": int(second["rebuilt"]), "rebuild_s": round(rebuild_s, 1),
        "rebuild_msg_per_s": round(second["rebuilt"] / rebuild_s),
        "rebuild_over_normal": round(second["rebuilt"] / rebuild_s / normal_rate, 2),
        "sessions_rebuilt": len(after), "sessions_mismatched": mismatched, "max_h_diff": worst,
    }


def main(argv=None) -> int:
    ap = common.parser("rebuild", __doc__)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--messages", type=int, default=2, help="messages per session")
    ap.add_argument("--tokens", type=int, default=4, help="token ids per message")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args(argv)
    result = measure(args.sessions, args.messages, args.tokens, args.partitions, args.batch,
                     args.model)
    print(json.dumps(result, indent=2))
    common.write_result("rebuild", result, args.out, with_clients=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
