"""Capacity planning: a traffic profile, a model's shape and measured constants in, a deployment
out (Kafka partitions, worker processes, Redis shards and memory, bytes on the wire), printed by
``python -m worker plan``. Pure formulas: no services, no torch; a model's shape comes from its
artifact's config.json. ``REFERENCE`` holds the constants ``python -m bench.capacity measure``
measured; docs/capacity.md states every formula in words and names every assumption (``Policy``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .codec import HEADER, OUTBOX_ENTRY

HEADER_BYTES, OUTBOX_FIXED_BYTES = HEADER.size, OUTBOX_ENTRY.size  # (+ f32 x labels per entry)
TOMBSTONE_OUTBOX = 1  # an ended session keeps its header and the final prediction
MAX_CONFIG_BYTES = 1 << 20  # as model.artifact reads config.json
LEAST = {"layers": 1, "hidden": 1, "labels": 1, "embed": 1, "mean_units": 0}  # ModelShape's


class PlanError(ValueError):
    """An input the plan cannot use: a missing or malformed artifact, flags that disagree."""


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


def state_value_bytes(layers: int, width: int, labels: int, dtype: str = "float32",
                      outbox: float = 1, ended: bool = False) -> float:
    """A state value (worker.codec): header, the state (``layers`` x ``width`` floats, see
    ``ModelShape.state_size``), the tokens at which each label was first predicted (a live
    state only: u32 x labels), and ``outbox`` entries of ``OUTBOX_ENTRY`` + 4 x labels."""
    size = 2 if dtype == "float16" else 4
    live = 0 if ended else layers * width * size + 4 * labels
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


# --- the model ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What a plan needs of a model: the state's size (layers x ``state_size`` floats, plus
    per-label fields) and the step's size (layers x H(E + H) multiply-adds per token)."""

    layers: int
    hidden: int  # GRU units
    labels: int
    embed: int
    mean_units: int = 0
    source: str = ""  # the config.json it was read from; "" if given by hand

    @property
    def state_size(self) -> int:
        """Floats per layer and session, as ``model.gru.ModelConfig.state_size``: h, then the
        mean units and their token count."""
        return self.hidden + (self.mean_units + 1 if self.mean_units else 0)

    def describe(self) -> str:
        mean = f" + {self.mean_units} mean units" if self.mean_units else ""
        return (f"L={self.layers}, H={self.hidden}{mean} (state {self.state_size} floats), "
                f"E={self.embed}, {self.labels} labels")

    @classmethod
    def from_artifact(cls, model_dir: str | Path) -> ModelShape:
        """Read DIR/config.json's architecture (model/artifact.py); nothing else is read and
        no model is built."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise PlanError(f"model dir {str(model_dir)!r} has no config.json")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise PlanError(f"{path}: over {MAX_CONFIG_BYTES:,} bytes, not a model config")
        try:
            config = json.loads(path.read_bytes())
            arch = config["architecture"]
            shape = cls(layers=arch["num_layers"], hidden=arch["hidden_size"],
                        labels=arch["num_labels"], embed=arch["embed_dim"],
                        mean_units=arch.get("mean_dim", 0), source=str(path))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"{path} is not a model config ({type(e).__name__}: {e})") from None
        for name, least in LEAST.items():
            v = getattr(shape, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise PlanError(f"{path}: the architecture's {name} is {v!r}, not an integer "
                                f">= {least}")
        return shape


# --- the measured constants ----------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    """What ``python -m bench.capacity measure`` measured on one machine, reduced to constants."""

    source: str
    machine: str
    hidden: int  # the measured model: no mean units, so its state was ``hidden`` wide
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

    @property
    def model(self) -> ModelShape:
        return ModelShape(self.layers, self.hidden, self.labels, self.embed, source="measured")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | Path) -> Measured:
        """From a capacity result file; the H100 step and the cores per process are read from
        the result files beside it, when they are there (the cores only from runs on the
        same CPU as the capacity run: another machine's share of a core is not this one's)."""
        path = Path(path)
        try:
            res = json.loads(path.read_text())
            return cls.from_result(res, str(path), _gpu_figures(path.parent),
                                   _process_cores(path.parent, res["machine"].get("cpu")))
        except OSError as e:
            raise PlanError(f"cannot read the results {str(path)!r}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise PlanError(f"{path} is not a capacity result ({type(e).__name__}: {e})") \
                from None

    @classmethod
    def from_result(cls, res: dict, source: str = "", gpu: dict | None = None,
                    processes: dict | None = None) -> Measured:
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
        # The values as they were measured (the format may have grown since): the cluster row's
        # own size, else that of the plain layout with its dtype and outbox.
        crow = mem["cluster"][0]
        same = {(r["dtype"], r["outbox"]): r["value_bytes"] for r in layouts}
        cvalue = crow.get("value_bytes", same[(crow["dtype"], crow["outbox"])])
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
            measured_value_bytes=same[("float32", 1)],
            kafka_in_bytes_per_msg=_median([r["input_bytes_per_msg"] for r in wide]),
            kafka_in_bytes_per_token=res.get("input_bytes_per_token", 8.0),
            kafka_out_bytes_per_msg=_median([r["output_bytes_per_msg"] for r in wide]),
            rebuild_msgs_per_s=float(res["rebuild"]["rebuild_msg_per_s"]),
            gpu_tokens_per_s=g.get("tokens_per_s"), gpu_engine_ms_512=g.get("engine_512"),
            notes={"gpu_source": g.get("source"),
                   "cores_per_process_source": (processes or {}).get("source")})


# The constants every plan uses unless given --results: an AMD EPYC VM, 2 vCPU, 23.5 GiB RAM,
# Python 3.11, redis-server 7.0.15 (jemalloc 5.3.0), tansu as the broker, 2026-11-27
# (docs/capacity.md, "What was measured"). The measured model: E 512, H 128, 1 layer, 5
# labels, no mean units; a float32 value of 601 B (the GRS2 format). The H100 figures are the
# step alone on one H100 (fp32, CUDA graph). tests/test_sizing.py checks that this equals
# ``Measured.load`` of the newest bench/results/capacity-*.json.
REFERENCE = Measured(
    source="bench/results/capacity-2026-11-27-033459.json",
    machine="AMD EPYC, 2 vCPU, 2026-11-27 03:31",
    hidden=128, layers=1, embed=512, labels=5,
    redis_key_overhead=97.2, cluster_key_overhead=118.1, redis_shard_fixed=257071,
    rss_ratio=1.059, worker_cpu_us_per_msg=94.3, worker_cores_per_process=0.95,
    worker_tokens=4, step_share=0.107, worker_msgs_per_s_wall=5420,
    redis_cpu_us_per_msg=15.7, redis_net_in_per_msg=738.4, redis_net_out_per_msg=613.1,
    measured_value_bytes=601, kafka_in_bytes_per_msg=94.9, kafka_in_bytes_per_token=8.27,
    kafka_out_bytes_per_msg=303.9, rebuild_msgs_per_s=13097.0,
    gpu_tokens_per_s=59862325.0, gpu_engine_ms_512=(6.11, 7.3),
    notes={"gpu_source": "gpu_step-2026-11-26-h100-fused.json",
           "cores_per_process_source": ["processes-2026-11-26-160904.json",
                                        "processes-2026-11-26.json"]})

GPU_RESULT = "gpu_step-2026-11-26-h100-fused.json"  # the H100 re-run after the fused step


def _gpu_figures(results: Path) -> dict:
    """The H100 step (fp32, CUDA graph, 8192 sessions x 4 tokens, with pinned transfers) and
    the engine per 512-message batch on GPU and CPU (docs/benchmarks.md)."""
    path = results / GPU_RESULT
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data  # result files since the tidy
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


def _process_cores(results: Path, cpu: str | None) -> dict:
    """Cores one saturated worker process used: the single-process runs of bench/processes.py
    (a quiet 2-core box) on the CPU ``cpu``, median."""
    cores, names = [], []
    for path in sorted(results.glob("processes-*.json")):
        run = json.loads(path.read_text())
        if run.get("machine", {}).get("cpu") != cpu:
            continue
        for r in run.get("runs", []):
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
    model: ModelShape | None = None  # None: the measured model's
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


def shape_of(p: Profile, m: Measured) -> ModelShape:
    return p.model or m.model


def step_scale(p: Profile, m: Measured) -> float:
    """The model step per token of the profile's model over the measured one's: the GRU's
    multiply-adds per token, layers x H(E + H) (input and recurrent projections)."""
    s = shape_of(p, m)
    return (s.layers * s.hidden * (s.embed + s.hidden)) / (m.layers * m.hidden
                                                           * (m.embed + m.hidden))


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
    s = shape_of(p, m)
    value = state_value_bytes(s.layers, s.state_size, s.labels, p.dtype, p.outbox)
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
    value = state_value_bytes(0, 0, shape_of(p, m).labels, outbox=TOMBSTONE_OUTBOX, ended=True)
    key = state_key_bytes(p.session_id_len, p.cluster, p.key_prefix, p.namespace, p.topic)
    return allocated_bytes(value, key) + (m.cluster_key_overhead if p.cluster
                                          else m.redis_key_overhead)


def fullest_shard_share(partitions: int, shards: int) -> float:
    """Share of all states on the fullest shard when each partition's states sit in one slot
    and slots are placed by partition: ceil(P / S) partitions of P."""
    return math.ceil(partitions / shards) / partitions


def plan(p: Profile, m: Measured = REFERENCE, policy: Policy = Policy()) -> Plan:
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
    shape = shape_of(p, m)
    lines = [
        f"traffic: {p.msgs_per_s:,.0f} msg/s x {p.tokens_per_message:g} tokens, "
        f"{p.sessions:,.0f} resident sessions, TTL {p.ttl_s:,.0f} s, state {p.dtype}, "
        f"{'Redis Cluster' if p.cluster else 'one Redis'}",
        f"model: {shape.describe()} ({shape.source or 'given'})",
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


# --- python -m worker plan ------------------------------------------------------------------

def default_model_dir() -> Path:
    """The artifact ``python -m worker run`` would load: GRU_MODEL__DIR, else its default."""
    from .config import ModelSettings
    return Path(os.environ.get("GRU_MODEL__DIR") or ModelSettings.model_fields["dir"].default)


DESCRIPTION = """\
Print the deployment a traffic profile needs: Kafka partitions, worker processes, Redis
shards and memory, network bytes, the time of a full rebuild. Give the traffic as
--sessions (states resident in Redis), or as --concurrent and --session-s.

The model's shape (state width, labels, step size) comes from an artifact's config.json:
--model-dir, else the artifact `run` would load (GRU_MODEL__DIR, else artifacts/bbc-gru)
when it exists. Without one, describe the model with --hidden, --layers and --labels
(and --mean-units, --embed).

Costs come from constants `python -m bench.capacity measure` measured on one
machine ({machine}); --results FILE uses another
measurement. docs/capacity.md gives every formula and assumption."""


def positive(text: str) -> float:
    """A flag's number that must be above zero (a usage error otherwise)."""
    value = float(text)
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text} is not above zero")
    return value


def add_plan(sub) -> None:
    from .config import StateSettings
    p = sub.add_parser("plan", help="print the deployment a traffic profile needs",
                       description=DESCRIPTION.format(machine=REFERENCE.machine),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("traffic")
    t.add_argument("--msgs-per-s", type=positive, required=True, metavar="N",
                   help="input messages per second [required]")
    t.add_argument("--sessions", type=positive, metavar="N",
                   help="session states resident in Redis: live, and idle within the TTL "
                   "[default: from --concurrent]")
    t.add_argument("--concurrent", type=positive, metavar="N",
                   help="instead of --sessions: sessions open at once ... [default: none]")
    t.add_argument("--session-s", type=positive, metavar="S",
                   help="... lasting this long on average [default: none]")
    t.add_argument("--send-end", action="store_true",
                   help="... whose last message has end=true; else they idle out after the "
                   "TTL [default: off]")
    t.add_argument("--tokens", type=positive, default=4, metavar="K",
                   help="tokens per message [default: %(default)g]")
    t.add_argument("--ends-per-s", type=float, default=0.0, metavar="N",
                   help="sessions ended per second, each leaving a tombstone for "
                   "GRU_STATE__END_TTL_SECONDS [default: %(default)g]")
    t.add_argument("--session-id-len", type=int, default=16, metavar="N",
                   help="characters of a session id [default: %(default)s]")
    d = p.add_argument_group("deployment")
    d.add_argument("--ttl-s", type=positive, metavar="S",
                   default=StateSettings.model_fields["ttl_seconds"].default,
                   help="GRU_STATE__TTL_SECONDS [default: %(default)g]")
    d.add_argument("--state-dtype", choices=["float32", "float16"], default="float32",
                   help="GRU_STATE__DTYPE [default: %(default)s]")
    d.add_argument("--outbox", type=float, default=1, metavar="N",
                   help="mean outbox entries per state [default: %(default)g]")
    d.add_argument("--single-redis", action="store_true",
                   help="one Redis, not a Redis Cluster [default: a Cluster]")
    m = p.add_argument_group("model")
    m.add_argument("--model-dir", type=Path, metavar="DIR",
                   help="a model artifact; only its config.json is read [default: "
                   "GRU_MODEL__DIR, else artifacts/bbc-gru, if it exists]")
    m.add_argument("--hidden", type=int, metavar="H",
                   help="GRU units, to describe a model without an artifact [default: the "
                   "artifact's]")
    m.add_argument("--layers", type=int, metavar="L",
                   help="GRU layers [default: the artifact's]")
    m.add_argument("--labels", type=int, metavar="C",
                   help="output labels [default: the artifact's]")
    m.add_argument("--mean-units", type=int, metavar="M",
                   help="mean units beside the GRU [default: 0]")
    m.add_argument("--embed", type=int, metavar="E", help="token embedding width; only the CPU "
                   f"estimate uses it [default: {REFERENCE.embed}, the measured model's]")
    o = p.add_argument_group("output")
    o.add_argument("--results", type=Path, metavar="FILE",
                   help="a bench/results/capacity-*.json to take the constants from "
                   f"[default: the built-in ones, {REFERENCE.machine}]")
    o.add_argument("--json", action="store_true",
                   help="print the plan, the model and the constants as JSON [default: off]")
    p.set_defaults(func=cmd_plan)


def model_from_args(args: argparse.Namespace) -> ModelShape:
    """The artifact's shape, or the one the flags describe; never a mix of the two."""
    flags = {"hidden": args.hidden, "layers": args.layers, "labels": args.labels,
             "mean_units": args.mean_units, "embed": args.embed}
    given = [k for k, v in flags.items() if v is not None]
    if given:
        if args.model_dir is not None:
            raise PlanError("give --model-dir or --hidden/--layers/--labels, not both")
        missing = [f"--{k}" for k in ("hidden", "layers", "labels") if flags[k] is None]
        if missing:
            raise PlanError(f"without a model artifact, give {' and '.join(missing)} too "
                            f"(--hidden, --layers and --labels describe the model)")
        bad = [f"--{k.replace('_', '-')}={v} must be >= {LEAST[k]}" for k, v in flags.items()
               if v is not None and v < LEAST[k]]
        if bad:
            raise PlanError("; ".join(bad))
        return ModelShape(args.layers, args.hidden, args.labels,
                          args.embed or REFERENCE.embed, args.mean_units or 0)
    model_dir = args.model_dir or default_model_dir()
    if args.model_dir is None and not (model_dir / "config.json").is_file():
        raise PlanError(f"no model artifact at {model_dir} (GRU_MODEL__DIR): give --model-dir "
                        f"DIR, or --hidden, --layers and --labels")
    return ModelShape.from_artifact(model_dir)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan; an input it cannot use is a ``ConfigError`` (one line, exit 2)."""
    from .config import ConfigError
    try:
        shape = model_from_args(args)
        measured = REFERENCE if args.results is None else Measured.load(args.results)
        sessions, ends = args.sessions, args.ends_per_s
        if sessions is None:
            if args.concurrent is None or args.session_s is None:
                raise PlanError("give --sessions, or --concurrent and --session-s")
            sessions, ends = resident_sessions(args.concurrent, args.session_s, args.ttl_s,
                                               args.send_end)
    except (PlanError, OSError) as e:  # OSError: a config.json that cannot be read
        raise ConfigError([str(e)]) from None
    profile = Profile(
        msgs_per_s=args.msgs_per_s, sessions=sessions, tokens_per_message=args.tokens,
        ttl_s=args.ttl_s, model=shape, dtype=args.state_dtype, outbox=args.outbox,
        cluster=not args.single_redis, session_id_len=args.session_id_len, ends_per_s=ends)
    result = plan(profile, measured)
    if args.json:
        print(json.dumps({"plan": asdict(result), "profile": asdict(replace(profile, model=None)),
                          "model": {**asdict(shape), "state_size": shape.state_size},
                          "measured": measured.as_dict()}, indent=2))
    else:
        print(render(result, profile, measured))
    return 0
