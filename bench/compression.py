"""Which compression for what the worker produces: bytes on the wire and CPU per prediction.

Builds Kafka record batches (kafka-python's own builder, as the producer does) of real
prediction JSON, with each codec, and times building and reading them back. A batch holds the
predictions one worker batch sends to one partition: 16, 64 and 256 records.

    python -m bench.compression [--repeat 200]

Writes bench/results/compression-<date>.json (``bench.common.write_result``) and prints a
line per batch size and codec.
"""

from __future__ import annotations

import random
import sys
import time

from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords

from bench import common
from worker.messages import Prediction, PredictionEncoder
from worker.ports import Record

CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def predictions(n: int, rng: random.Random) -> list[bytes]:
    enc = PredictionEncoder(LABELS, "06e982b3f7aa79e0")
    out = []
    for i in range(n):
        raw = [rng.random() for _ in LABELS]
        total = sum(raw)
        sid = f"call-{rng.randrange(10**6):06d}"
        rec = Record("tokens", rng.randrange(6), rng.randrange(10**7), sid.encode(), b"", None)
        out.append(enc.encode(Prediction(sid, rng.randrange(200), tuple(x / total for x in raw),
                                         rng.randrange(4000), rng.random() < 0.05, rec)))
    return out


def build(values: list[bytes], codec: int) -> bytes:
    b = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=False,
                                  producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                  batch_size=1 << 22)
    for i, v in enumerate(values):
        b.append(i, timestamp=1_700_000_000_000 + i, key=v[16:28], value=v, headers=[])
    return bytes(b.build())


def read(buf: bytes) -> int:
    n = 0
    batch = MemoryRecords(buf).next_batch()
    for _ in batch:
        n += 1
    return n


def measure(values: list[bytes], codec: int, repeat: int) -> dict:
    t0 = time.process_time()
    for _ in range(repeat):
        buf = build(values, codec)
    t1 = time.process_time()
    for _ in range(repeat):
        assert read(buf) == len(values)
    t2 = time.process_time()
    per = repeat * len(values)
    return {"bytes_per_record": len(buf) / len(values), "build_us_per_record": (t1 - t0) / per * 1e6,
            "read_us_per_record": (t2 - t1) / per * 1e6}


def main(argv=None) -> int:
    ap = common.parser("compression", __doc__, model=None)
    ap.add_argument("--repeat", type=int, default=200,
                    help="batches built and read per codec at 16 records (fewer at more)")
    args = ap.parse_args(argv)
    rng = random.Random(0)
    rows = []
    for n in (16, 64, 256):
        values = predictions(n, rng)
        raw = sum(len(v) for v in values) / n
        for name, codec in CODECS.items():
            m = measure(values, codec, max(5, args.repeat * 16 // n))
            rows.append({"records": n, "codec": name, "json_bytes_per_record": round(raw, 1),
                         **{k: round(v, 2) for k, v in m.items()}})
            print(f"{n:4d} records  {name:6s}  {m['bytes_per_record']:7.1f} B/record  "
                  f"build {m['build_us_per_record']:6.2f} us  read {m['read_us_per_record']:6.2f} us")
    common.write_result("compression", {"params": {"repeat": args.repeat}, "rows": rows},
                        args.out, with_clients=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
