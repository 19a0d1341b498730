"""Sizing formulas: a traffic profile and the constants measured by ``bench.capacity`` in, a
deployment (Kafka partitions, worker processes, Redis shards and memory, bytes on the wire)
out. Pure: no services, no I/O except ``Measured.load``. docs/capacity.md states every formula
in words and names every assumption (``Policy``); tests/test_sizing.py checks them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from worker.codec import HEADER, OUTBOX_ENTRY

RESULTS = Path(__file__).resolve().parent / "results"
HEADER_BYTES, OUTBOX_FIXED_BYTES = HEADER.size, OUTBOX_ENTRY.size  # (+ f32 x labels per entry)
TOMBSTONE_OUTBOX = 1  # an ended session keeps its header and the final prediction


# --- what a state costs in Redis -----------------------------------------------------------

def jemalloc_class(n: int) -> int:
    """The jemalloc size class an allocation of ``n`` bytes takes (Redis' default allocator):
    multiples of 8 then 16 up to 128, then four classes per power of two."""
    if n <= 8:
        return 8
    if n <= 128:
        return -(-n // 16) * 16
    spacing = 1 << ((n - 1).bit_length() - 3)
    return -(-n // spacing) * spacing


def sds_bytes(length: int) -> int:
    """Allocated bytes of a Redis string (sds) of ``length``: header, bytes, terminator."""
    header = 3 if length < 256 else 5 if length < 65536 else 9
    return jemalloc_class(length + header + 1)


def state_value_bytes(layers: int, hidden: int, labels: int, dtype: str = "float32",
                      outbox: float = 1, ended: bool = False) -> float:
    """A state value (worker.codec): header, h, the tokens at which each label was first
    predicted (a live state only: u32 x labels), and ``outbox`` entries of
    ``OUTBOX_ENTRY`` + 4 x labels."""
    width = 2 if dtype == "float16" else 4
    live = 0 if ended else layers * hidden * width + 4 * labels
    return HEADER_BYTES + live + outbox * (OUTBOX_FIXED_BYTES + 4 * labels)


def state_key_bytes(session_id_len: int, cluster: bool, prefix: str = "gru",
                    namespace: str = "gru-worker", topic: str = "tokens",
                    partitions: int = 64) -> int:
    """Length of ``worker.state.Keys.session`` (model ids are 16 hex digits)."""
    tag = len(f"{{{topic}|{partitions - 1}}}:") if cluster else 0
    return len(prefix) + 1 + tag + 16 + 1 + len(namespace) + 3 + session_id_len


def allocated_bytes(value_bytes: float, key_bytes: int) -> int:
    """Value and key as Redis allocates them (the constant part is ``Measured``'s overhead)."""
    return sds_bytes(round(value_bytes)) + sds_bytes(key_bytes)


# --- the measured constants ----------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    """What ``python -m bench.capacity`` measured on one machine, reduced to constants."""

    source: str
    machine: str
    hidden: int
    layers: int
    embed: int
    labels: int
    redis_key_overhead: float  # bytes per state beyond its allocated value and key
    cluster_key_overhead: float  # the same on a cluster-enabled node
    redis_shard_fixed: float  # bytes a Redis takes once it holds states, whatever their count
    rss_ratio: float  # used_memory_rss / used_memory at the largest size
    worker_cpu_us_per_msg: float  # CPU of one process (all threads), 1M live sessions
    worker_cores_per_process: float  # what one saturated process uses (GIL-bound: ~1 core)
    worker_tokens: int  # tokens per message of those runs
    step_share: float  # the model step's share of a process' time in those runs
    worker_msgs_per_s_wall: float  # the rate seen on the (shared, contended) box
    redis_cpu_us_per_msg: float
    redis_net_in_per_msg: float  # worker -> Redis
    redis_net_out_per_msg: float  # Redis -> worker
    measured_value_bytes: float  # the state value size of those runs
    kafka_in_bytes_per_msg: float  # key + JSON value of an input at ``worker_tokens`` tokens
    kafka_in_bytes_per_token: float
    kafka_out_bytes_per_msg: float  # key + JSON value of a prediction, before compression
    rebuild_msgs_per_s: float  # replayed messages per second, one process
    gpu_tokens_per_s: float | None = None  # H100 step alone (bench/results/gpu_step-*)
    gpu_engine_ms_512: tuple[float, float] | None = None  # engine per 512 batch, GPU vs CPU
    notes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Measured":
        """From a capacity result file (default: the newest under bench/results)."""
        if path is None:
            found = sorted(RESULTS.glob("capacity-*.json"),  # by the date measured, not mtime
                           key=lambda p: json.loads(p.read_text()).get("date", ""))
            if not found:
                raise FileNotFoundError("no bench/results/capacity-*.json: run "
                                        "python -m bench.capacity measure")
            path = found[-1]
        res = json.loads(Path(path).read_text())
        return cls.from_result(res, str(path), _gpu_figures(RESULTS), _process_cores(RESULTS))

    @classmethod
    def from_result(cls, res: dict, source: str = "", gpu: dict | None = None,
                    processes: dict | None = None) -> "Measured":
        m = res["model"]
        mem = res["memory"]
        layouts = mem["layouts"]
        over, ratio, fixed = [], [], []
        for row in layouts:
            p, small = row["points"][-1], row["points"][0]
            # bytes per session = c + F / n: F from the smallest and the largest size
            fixed.append((small["bytes_per_session"] - p["bytes_per_session"])
                         / (1 / small["sessions"] - 1 / p["sessions"]))
            over.append(p["bytes_per_session"] - allocated_bytes(row["value_bytes"],
                                                                 row["key_bytes"]))
            ratio.append(p["used_memory_rss"] / p["used_memory"])
        crow = mem["cluster"][0]
        cvalue = state_value_bytes(m["layers"], m["hidden"], m["labels"], crow["dtype"],
                                   crow["outbox"])
        cover = crow["points"][-1]["bytes_per_session"] - allocated_bytes(cvalue,
                                                                          crow["key_bytes"])
        wide = [r for r in res["worker"] if r["case"] == "1M-distinct"]
        share = _median([r["stages"]["model_step"]["seconds"] / r["seconds"] for r in wide])
        g = gpu or {}
        return cls(
            source=source, machine=f"{res['machine'].get('cpu', '?')}, "
                                   f"{res['machine'].get('cpus')} vCPU, {res.get('date', '')}",
            hidden=m["hidden"], layers=m["layers"], embed=m["embed"], labels=m["labels"],
            redis_key_overhead=round(_mean(over), 1), cluster_key_overhead=round(cover, 1),
            redis_shard_fixed=round(_median(fixed)), rss_ratio=round(max(ratio), 3),
            worker_cpu_us_per_msg=round(_median([r["cpu"]["bench_process"]["cpu_us_per_msg"]
                                                 for r in wide]), 1),
            worker_cores_per_process=(processes or {}).get("cores", 0.95),
            worker_tokens=res["params"]["tokens"], step_share=round(share, 3),
            worker_msgs_per_s_wall=round(_median([r["msgs_per_s"] for r in wide])),
            redis_cpu_us_per_msg=round(_median([r["cpu"]["redis"]["cpu_us_per_msg"]
                                                for r in wide]), 2),
            redis_net_in_per_msg=_median([r["redis_net_in_per_msg"] for r in wide]),
            redis_net_out_per_msg=_median([r["redis_net_out_per_msg"] for r in wide]),
            measured_value_bytes=state_value_bytes(m["layers"], m["hidden"], m["labels"]),
            kafka_in_bytes_per_msg=_median([r["input_bytes_per_msg"] for r in wide]),
            kafka_in_bytes_per_token=res.get("input_bytes_per_token", 8.0),
            kafka_out_bytes_per_msg=_median([r["output_bytes_per_msg"] for r in wide]),
            rebuild_msgs_per_s=float(res["rebuild"]["rebuild_msg_per_s"]),
            gpu_tokens_per_s=g.get("tokens_per_s"), gpu_engine_ms_512=g.get("engine_512"),
            notes={"gpu_source": g.get("source"),
                   "cores_per_process_source": (processes or {}).get("source")})


GPU_RESULT = "gpu_step-2026-11-26-h100-fused.json"  # the H100 re-run after the fused step


def _gpu_figures(results: Path) -> dict:
    """The H100 step (fp32, CUDA graph, 8192 sessions x 4 tokens, with pinned transfers) and
    the engine per 512-message batch on GPU and CPU (docs/benchmarks.md)."""
    path = results / GPU_RESULT
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())
    out: dict = {"source": path.name}
    for r in rows:
        if (r.get("section"), r.get("dtype"), r.get("mode"), r.get("batch")) == \
                ("step", "float32", "graph", 8192):
            out["tokens_per_s"] = float(r["tokens_per_s"])
    eng = {r["device"]: r["ms_per_batch"] for r in rows
           if r.get("section") == "engine" and r.get("batch") == 512}
    if {"cuda", "cpu"} <= set(eng):
        out["engine_512"] = (eng["cuda"], eng["cpu"])
    return out


def _process_cores(results: Path) -> dict:
    """Cores one saturated worker process used: the single-process runs of bench/processes.py
    (a quiet 2-core box, 2026-11-26), median."""
    cores, names = [], []
    for path in sorted(results.glob("processes-*.json")):
        for r in json.loads(path.read_text()).get("runs", []):
            if r.get("processes") == 1 and "worker0" in r.get("cpu", {}):
                cores.append(r["cpu"]["worker0"]["cores"])
                names.append(path.name)
    return {"cores": _median(cores), "source": sorted(set(names))} if cores else {}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# --- the traffic and the assumptions -------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """The traffic to size for. ``sessions`` is the number of states resident in Redis: live
    sessions plus idle ones whose TTL has not run out."""

    msgs_per_s: float
    sessions: float
    tokens_per_message: float = 4
    ttl_s: float = 86_400
    hidden: int | None = None  # None: the measured model's
    layers: int | None = None
    embed: int | None = None
    dtype: str = "float32"
    outbox: float = 1
    session_id_len: int = 16
    ends_per_s: float = 0.0  # each ended session leaves a tombstone for end_ttl_s
    end_ttl_s: float = 3_600
    cluster: bool = True
    key_prefix: str = "gru"  # GRU_REDIS__PREFIX
    namespace: str = "gru-worker"  # GRU_STATE__NAMESPACE, the group id by default
    topic: str = "tokens"


def resident_sessions(concurrent: float, session_s: float, ttl_s: float,
                      send_end: bool) -> tuple[float, float]:
    """(states resident in Redis, sessions ended per second) for ``concurrent`` sessions that
    last ``session_s`` on average. A session that never sends ``end`` keeps its state for the
    TTL after its last message, so new sessions per second x (duration + TTL) are resident;
    one that ends is deleted at once and leaves a tombstone (``Profile.ends_per_s``)."""
    started_per_s = concurrent / session_s
    if send_end:
        return concurrent, started_per_s
    return started_per_s * (session_s + ttl_s), 0.0


@dataclass(frozen=True)
class Policy:
    """Assumptions, not measurements; docs/capacity.md gives the reason for each."""

    worker_utilisation: float = 0.6  # of a process' measured rate, in steady state
    redis_utilisation: float = 0.5  # of one core per Redis shard (its main thread)
    shard_data_gib: float = 25.0  # resident data per shard (a 32 GiB node)
    partitions_per_worker: int = 2  # room to add workers without adding partitions
    partitions_per_shard: int = 8  # a partition's states share one slot: spread needs many
    partition_mb_per_s: float = 5.0  # input per partition, a conservative Kafka figure
    gpu_utilisation: float = 0.5


@dataclass(frozen=True)
class Plan:
    partitions: int
    worker_processes: int
    worker_cores: float
    process_msgs_per_s: float  # one process at this profile's tokens and model size
    step_share: float  # the model step's share of a process' time
    redis_shards: int
    redis_shards_for_memory: int
    redis_shards_for_cpu: int
    value_bytes: float
    bytes_per_session: float  # used_memory per resident state
    redis_memory_gib: float  # used_memory of every state and tombstone
    redis_rss_gib: float  # what the processes hold (fragmentation)
    shard_memory_gib: float  # the fullest shard, partitions spread as evenly as slots allow
    kafka_in_bytes_per_msg: float
    kafka_out_bytes_per_msg: float
    redis_bytes_per_msg: float  # both directions
    rebuild_hours: float  # replay of one TTL of input by every planned process
    gpus: int | None  # H100s for the step alone, if moved off the CPU
    gpu_worker_processes: int | None  # the processes still needed for the rest, with GPUs
    gpu_pays: bool


def step_scale(p: Profile, m: Measured) -> float:
    """The model step per token of the profile's model over the measured one's: the GRU's
    multiply-adds per token, layers x H(E + H) (input and recurrent projections)."""
    h, e, l = p.hidden or m.hidden, p.embed or m.embed, p.layers or m.layers
    return (l * h * (e + h)) / (m.layers * m.hidden * (m.embed + m.hidden))


def process_cost_us(p: Profile, m: Measured) -> tuple[float, float]:
    """(CPU µs of one process per message, µs of it in the model step): the measured CPU per
    message, its step part rescaled to the profile's tokens and model size."""
    step_measured = m.worker_cpu_us_per_msg * m.step_share
    step = step_measured * step_scale(p, m) * p.tokens_per_message / m.worker_tokens
    return m.worker_cpu_us_per_msg - step_measured + step, step


def process_rate(p: Profile, m: Measured) -> float:
    """Messages per second of one process that has its own core."""
    return m.worker_cores_per_process * 1e6 / process_cost_us(p, m)[0]


def bytes_per_session(p: Profile, m: Measured, partitions: int = 64) -> tuple[float, float]:
    """(value bytes, used_memory bytes) of one resident state."""
    h, l = p.hidden or m.hidden, p.layers or m.layers
    value = state_value_bytes(l, h, m.labels, p.dtype, p.outbox)
    key = state_key_bytes(p.session_id_len, p.cluster, p.key_prefix, p.namespace, p.topic,
                          partitions)
    over = m.cluster_key_overhead if p.cluster else m.redis_key_overhead
    return value, allocated_bytes(value, key) + over


def redis_used_bytes(p: Profile, m: Measured, shards: int, partitions: int = 64) -> float:
    """used_memory of every state, tombstone and each shard's fixed part, all shards."""
    per = bytes_per_session(p, m, partitions)[1]
    return (p.sessions * per + p.ends_per_s * p.end_ttl_s * tombstone_bytes(p, m)
            + shards * m.redis_shard_fixed)


def tombstone_bytes(p: Profile, m: Measured) -> float:
    value = state_value_bytes(0, 0, m.labels, outbox=TOMBSTONE_OUTBOX, ended=True)
    key = state_key_bytes(p.session_id_len, p.cluster, p.key_prefix, p.namespace, p.topic)
    return allocated_bytes(value, key) + (m.cluster_key_overhead if p.cluster
                                          else m.redis_key_overhead)


def fullest_shard_share(partitions: int, shards: int) -> float:
    """Share of all states on the fullest shard when each partition's states sit in one slot
    and slots are placed by partition: ceil(P / S) partitions of P."""
    return math.ceil(partitions / shards) / partitions


def plan(p: Profile, m: Measured, policy: Policy = Policy()) -> Plan:
    cost, step = process_cost_us(p, m)
    rate = process_rate(p, m)
    workers = max(1, math.ceil(p.msgs_per_s / (rate * policy.worker_utilisation)))

    value, per_session = bytes_per_session(p, m)
    used = redis_used_bytes(p, m, 1)
    rss = used * m.rss_ratio
    gib = 2**30
    for_memory = max(1, math.ceil(rss / (policy.shard_data_gib * gib)))
    for_cpu = max(1, math.ceil(p.msgs_per_s * m.redis_cpu_us_per_msg / 1e6
                               / policy.redis_utilisation))
    shards = max(for_memory, for_cpu) if p.cluster else 1

    in_bytes = m.kafka_in_bytes_per_msg + (p.tokens_per_message - m.worker_tokens) \
        * m.kafka_in_bytes_per_token
    partitions = max(workers * policy.partitions_per_worker,
                     shards * policy.partitions_per_shard if p.cluster else 1,
                     math.ceil(p.msgs_per_s * in_bytes / (policy.partition_mb_per_s * 1e6)))
    partitions = -(-partitions // 4) * 4
    # Whole partitions go to a shard: add shards until the fullest one fits.
    while p.cluster and rss * fullest_shard_share(partitions, shards) > policy.shard_data_gib * gib:
        shards += 1
    if p.cluster:
        partitions = max(partitions, -(-shards * policy.partitions_per_shard // 4) * 4)

    used = redis_used_bytes(p, m, shards)
    rss = used * m.rss_ratio
    redis_bytes = (m.redis_net_in_per_msg + m.redis_net_out_per_msg
                   + 2 * (value - m.measured_value_bytes))
    replay = p.msgs_per_s * p.ttl_s
    rebuild_h = replay / (m.rebuild_msgs_per_s * workers) / 3600

    gpus, gpu_workers, pays = None, None, False
    if m.gpu_tokens_per_s:
        rest_rate = m.worker_cores_per_process * 1e6 / (cost - step)
        gpu_workers = max(1, math.ceil(p.msgs_per_s / (rest_rate * policy.worker_utilisation)))
        gpus = max(1, math.ceil(p.msgs_per_s * p.tokens_per_message * step_scale(p, m)
                                / (m.gpu_tokens_per_s * policy.gpu_utilisation)))
        pays = step / cost >= 0.5  # moving the step off the CPU at least halves the processes
    return Plan(
        partitions=partitions, worker_processes=workers,
        worker_cores=round(workers * m.worker_cores_per_process, 1),
        process_msgs_per_s=round(rate),
        step_share=round(step / cost, 3), redis_shards=shards,
        redis_shards_for_memory=for_memory, redis_shards_for_cpu=for_cpu,
        value_bytes=value, bytes_per_session=round(per_session, 1),
        redis_memory_gib=round(used / gib, 2), redis_rss_gib=round(rss / gib, 2),
        shard_memory_gib=round(rss * (fullest_shard_share(partitions, shards)
                                      if p.cluster else 1) / gib, 2),
        kafka_in_bytes_per_msg=round(in_bytes, 1),
        kafka_out_bytes_per_msg=m.kafka_out_bytes_per_msg,
        redis_bytes_per_msg=round(redis_bytes, 1), rebuild_hours=round(rebuild_h, 2),
        gpus=gpus, gpu_worker_processes=gpu_workers, gpu_pays=pays)


def render(pl: Plan, p: Profile, m: Measured) -> str:
    mbps = lambda b: f"{p.msgs_per_s * b / 1e6:.1f} MB/s"  # noqa: E731
    lines = [
        f"traffic: {p.msgs_per_s:,.0f} msg/s x {p.tokens_per_message:g} tokens, "
        f"{p.sessions:,.0f} resident sessions, TTL {p.ttl_s:,.0f} s, "
        f"H={p.hidden or m.hidden} L={p.layers or m.layers}, state {p.dtype}, "
        f"{'Redis Cluster' if p.cluster else 'one Redis'}",
        f"measured on: {m.machine} ({Path(m.source).name or 'given constants'})",
        "",
        f"Kafka partitions     {pl.partitions}",
        f"worker processes     {pl.worker_processes} on CPU ({pl.worker_cores} cores; one "
        f"process does ~{pl.process_msgs_per_s:,.0f} msg/s here, model step "
        f"{pl.step_share:.0%} of it)",
        f"Redis shards         {pl.redis_shards} (memory needs {pl.redis_shards_for_memory}, "
        f"CPU needs {pl.redis_shards_for_cpu}); add one replica each for availability",
        f"Redis memory         {pl.redis_memory_gib:,.2f} GiB used, {pl.redis_rss_gib:,.2f} GiB "
        f"resident ({pl.bytes_per_session:.0f} B per session, value {pl.value_bytes:.0f} B); "
        f"fullest shard {pl.shard_memory_gib:,.2f} GiB",
        f"network per message  Kafka in {pl.kafka_in_bytes_per_msg:.0f} B, Kafka out "
        f"{pl.kafka_out_bytes_per_msg:.0f} B (before lz4), Redis {pl.redis_bytes_per_msg:.0f} B "
        f"(both ways)",
        f"network in total     Kafka in {mbps(pl.kafka_in_bytes_per_msg)}, out "
        f"{mbps(pl.kafka_out_bytes_per_msg)}, Redis {mbps(pl.redis_bytes_per_msg)}",
        f"full rebuild         {pl.rebuild_hours:,.1f} h to replay one TTL of input with "
        f"{pl.worker_processes} processes (Kafka retention must cover the TTL)",
    ]
    if pl.gpus is not None:
        lines.append(
            f"GPU                  {'pays' if pl.gpu_pays else 'does not pay'}: the step is "
            f"{pl.step_share:.0%} of a process; with the step on {pl.gpus} H100, "
            f"{pl.gpu_worker_processes} processes instead of {pl.worker_processes} (from the "
            f"H100 step rate alone: not measured end to end)")
    return "\n".join(lines)
