"""GPU step benchmark: the batched streaming step on a CUDA device, and the engine on GPU vs CPU.

Reports, as JSON lines while it runs:
  A. step time and tokens/s for 1 .. 65,536 sessions x K tokens, eager vs CUDA graph,
     float32 vs float16, with and without the pinned host<->device state transfer;
  B. the worker engine's time per batch (plan -> step -> encode states) on GPU vs CPU;
  C. tokens/s at hidden 128 .. 1024 and 1 .. 2 layers on GPU and CPU.
Each section stops early when the time budget (--budget-s) runs out, printing what it has.

    python -m bench.gpu_step [--budget-s 240]
    python -m bench.gpu_step --dry-run --batches 8 --engine-batches 8 --size-batch 8  # on a CPU

Writes bench/results/gpu_step-<date>.json (``bench.common.write_result``; on a GPU host with
a copy of the tree and no git, its commit is recorded as unknown).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from bench import common
from model.gru import GRUClassifier, ModelConfig
from worker.compute import Stepper

T0 = time.monotonic()
ROWS: list[dict] = []
GPU = "cuda"  # --dry-run swaps in the CPU to check the script itself on a machine without one


def emit(**row) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def make_model(hidden=128, layers=1, vocab=20_000, embed=128, seed=0) -> GRUClassifier:
    torch.manual_seed(seed)
    return GRUClassifier(ModelConfig(vocab, 5, embed, hidden, layers)).eval()


def timed(fn, iters: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def out_of_time(budget: float) -> bool:
    return time.monotonic() - T0 > budget


def section_step(args, sync) -> None:
    K = args.tokens
    pin = (lambda t: t.pin_memory()) if GPU == "cuda" else (lambda t: t)
    for dtype in ("float32", "float16") if GPU == "cuda" else ("float32",):
        for mode in ("graph", "eager"):
            stepper = Stepper(make_model(), GPU, dtype, buckets=mode == "graph",
                              cuda_graphs=mode == "graph")
            for B in args.batches:
                if out_of_time(args.budget_s * 0.55):
                    return
                ids = torch.randint(2, 20_000, (B, K), device=GPU)
                lengths = torch.full((B,), K, device=GPU)
                h_host = pin(torch.randn(B, 1, 128))
                h_back = pin(torch.empty(B, 1, 128))
                p_back = pin(torch.empty(B, 5))
                h_dev = h_host.to(GPU).transpose(0, 1).contiguous()

                def step_only():
                    stepper.step(h_dev, ids, lengths)

                def with_transfer():
                    h = h_host.to(GPU, non_blocking=True).transpose(0, 1)
                    h_new, probs = stepper.step(h, ids, lengths)
                    h_back.copy_(h_new.transpose(0, 1), non_blocking=True)
                    p_back.copy_(probs, non_blocking=True)

                iters = 200 if B <= 8192 else 50
                t_step = timed(step_only, iters, sync)
                t_full = timed(with_transfer, iters, sync)
                emit(section="step", dtype=dtype, mode=mode, batch=B, tokens=K,
                     step_us=round(t_step * 1e6, 1), with_transfer_us=round(t_full * 1e6, 1),
                     tokens_per_s=round(B * K / t_full))


def section_engine(args, sync) -> None:
    from worker.engine import Engine
    from worker.messages import TokenMessage
    from worker.ports import Record
    rng = np.random.default_rng(0)
    for hidden, layers, device in ((128, 1, GPU), (128, 1, "cpu"), (512, 2, GPU), (512, 2, "cpu")):
        engine = Engine(make_model(hidden, layers), device=device)
        for B in args.engine_batches:
            if out_of_time(args.budget_s * 0.8):
                return
            sids = [f"s{i}" for i in range(B)]
            loaded: dict = {s: None for s in sids}
            seq = [0]

            def batch():
                msgs = [TokenMessage(s, seq[0], rng.integers(2, 20_000, args.tokens).tolist(), False,
                                     Record("t", 0, seq[0], None, None, 0)) for s in sids]
                t = time.perf_counter()
                res = engine.apply(msgs, loaded)
                dt = time.perf_counter() - t
                for u in res.updates:
                    loaded[u.session_id] = u.value
                seq[0] += 1
                return dt

            batch()
            times = [batch() for _ in range(5 if device == GPU or B <= 1024 else 2)]
            emit(section="engine", device=device, hidden=hidden, layers=layers, batch=B,
                 tokens=args.tokens,
                 ms_per_batch=round(1e3 * float(np.median(times)), 2),
                 messages_per_s=round(B / float(np.median(times))))


def section_sizes(args, sync) -> None:
    K, B = args.tokens, args.size_batch
    for hidden in (128, 256, 512, 1024):
        for layers in (1, 2):
            for device in (GPU, "cpu"):
                if out_of_time(args.budget_s):
                    return
                stepper = Stepper(make_model(hidden, layers), device)
                ids = torch.randint(2, 20_000, (B, K), device=device)
                lengths = torch.full((B,), K, device=device)
                h = torch.randn(layers, B, hidden, device=device)
                t = timed(lambda: stepper.step(h, ids, lengths), 20 if device == GPU else 2, sync)
                emit(section="size", device=device, hidden=hidden, layers=layers, batch=B,
                     tokens=K, ms=round(t * 1e3, 2), tokens_per_s=round(B * K / t))


def main(argv=None) -> int:
    ap = common.parser("gpu_step", __doc__, model=None)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+",
                    default=[1, 8, 64, 512, 4096, 8192, 65536])
    ap.add_argument("--engine-batches", type=int, nargs="+", default=[512, 8192])
    ap.add_argument("--size-batch", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--dry-run", action="store_true", help="run on the CPU to check the script")
    args = ap.parse_args(argv)
    global GPU
    if args.dry_run:
        GPU = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--dry-run checks the script on the CPU)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    sync = torch.cuda.synchronize if GPU == "cuda" else (lambda: None)
    emit(section="info", gpu=torch.cuda.get_device_name() if GPU == "cuda" else
         "none (dry run)", torch=torch.__version__, cpu_threads=torch.get_num_threads())
    for section in (section_step, section_engine, section_sizes):
        try:
            section(args, sync)
        except Exception as e:  # report and go on: one device run is all we get
            emit(section=section.__name__, error=repr(e))
    emit(section="done", seconds=round(time.monotonic() - T0, 1))
    params = {k: v for k, v in vars(args).items() if k != "out"}
    common.write_result("gpu_step", {"params": params, "rows": ROWS}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
