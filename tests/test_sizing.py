"""The capacity planning formulas (worker/capacity.py): pure, on made-up constants; the model's
shape read from an artifact's config.json; the built-in constants against the committed
capacity result."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from worker import capacity as sizing
from worker.capacity import REFERENCE, Measured, ModelShape, Policy, Profile, _process_cores
from worker.codec import OutboxEntry, PosKind, SessionState, encode_state
from worker.state import Keys

pytestmark = pytest.mark.unit

M = Measured(
    source="", machine="test", hidden=128, layers=1, embed=512, labels=5,
    redis_key_overhead=100.0, cluster_key_overhead=120.0, redis_shard_fixed=0.0, rss_ratio=1.1,
    worker_cpu_us_per_msg=200.0, worker_cores_per_process=1.0, worker_tokens=4,
    step_share=0.2, worker_msgs_per_s_wall=3000,
    redis_cpu_us_per_msg=5.0, redis_net_in_per_msg=800.0, redis_net_out_per_msg=700.0,
    measured_value_bytes=601.0, kafka_in_bytes_per_msg=100.0, kafka_in_bytes_per_token=8.0,
    kafka_out_bytes_per_msg=300.0, rebuild_msgs_per_s=8000.0, gpu_tokens_per_s=6e7,
    gpu_engine_ms_512=(6.11, 7.3))


@pytest.mark.parametrize("n,cls", [(1, 8), (8, 8), (9, 16), (51, 64), (128, 128), (129, 160),
                                   (349, 384), (605, 640), (764, 768), (1025, 1280)])
def test_jemalloc_size_classes(n, cls):
    assert sizing.jemalloc_class(n) == cls


@pytest.mark.parametrize("layers,hidden,dtype,outbox", [(1, 128, "float32", 1),
                                                        (2, 64, "float16", 3),
                                                        (1, 32, "float32", 0)])
def test_value_bytes_are_the_codec_length(layers, hidden, dtype, outbox):
    box = tuple(OutboxEntry(i, i, 4, False, 7, (0.2,) * 5) for i in range(outbox))
    st = SessionState(np.zeros((layers, hidden), np.float32), 0, PosKind.SEQ, 4, 1, outbox=box)
    assert sizing.state_value_bytes(layers, hidden, 5, dtype, outbox) == \
        len(encode_state(st, 5, dtype))


@pytest.mark.parametrize("cluster", [False, True])
def test_key_bytes_are_the_real_key_layout(cluster):
    keys = Keys("gru", "0123456789abcdef", "gru-worker", cluster=cluster)
    sid = "call-42-abcdefgh"
    assert sizing.state_key_bytes(len(sid), cluster, partitions=64) == \
        len(keys.session(sid, ("tokens", 63)))


def test_the_measured_profile_gives_back_the_measured_cost():
    cost, step = sizing.process_cost_us(Profile(msgs_per_s=1, sessions=1), M)
    assert cost == pytest.approx(200.0) and step == pytest.approx(40.0)
    assert sizing.process_rate(Profile(msgs_per_s=1, sessions=1), M) == pytest.approx(5000)
    wider = Profile(msgs_per_s=1, sessions=1, model=ModelShape(1, 256, 5, 512),
                    tokens_per_message=8)
    # the step: x (256 (512 + 256)) / (128 (512 + 128)) = 2.4, and twice the tokens
    assert sizing.process_cost_us(wider, M) == pytest.approx((160 + 40 * 2.4 * 2, 40 * 2.4 * 2))


def test_memory_is_sessions_times_bytes_per_session():
    p = Profile(msgs_per_s=1000, sessions=10_000_000, cluster=False)
    pl = sizing.plan(p, M)
    value, per = sizing.bytes_per_session(p, M)
    # GRS4: a 64-byte header, h (128 x f32), first-seen tokens (5 x u32), one outbox entry
    assert value == 64 + 512 + 20 + 33 + 20 == 649
    assert per == sizing.sds_bytes(649) + sizing.sds_bytes(
        sizing.state_key_bytes(16, False)) + 100
    assert pl.redis_memory_gib == pytest.approx(10_000_000 * per / 2**30, abs=0.01)
    assert pl.redis_rss_gib == pytest.approx(pl.redis_memory_gib * 1.1, abs=0.01)
    half = sizing.plan(dataclasses.replace(p, dtype="float16"), M)
    assert half.bytes_per_session < pl.bytes_per_session


def test_each_shard_adds_its_fixed_part():
    p = Profile(msgs_per_s=1000, sessions=6000)
    m = dataclasses.replace(M, redis_shard_fixed=250_000)
    assert sizing.redis_used_bytes(p, m, 3) - sizing.redis_used_bytes(p, M, 3) == 750_000


def test_tombstones_add_to_memory():
    p = Profile(msgs_per_s=1000, sessions=1_000_000)
    ended = sizing.plan(dataclasses.replace(p, ends_per_s=100), M)
    extra = 100 * 3600 * sizing.tombstone_bytes(p, M)
    assert ended.redis_memory_gib - sizing.plan(p, M).redis_memory_gib == \
        pytest.approx(extra / 2**30, abs=0.01)


@pytest.mark.parametrize("msgs,sessions", [(10_000, 1e6), (100_000, 1e7), (1_000_000, 1e8),
                                           (20_000, 5e4)])
def test_a_plan_meets_its_own_constraints(msgs, sessions):
    pol = Policy()
    pl = sizing.plan(Profile(msgs_per_s=msgs, sessions=sessions), M, pol)
    rate = sizing.process_rate(Profile(msgs_per_s=msgs, sessions=sessions), M)
    assert pl.worker_processes * rate * pol.worker_utilisation >= msgs
    assert (pl.worker_processes - 1) * rate * pol.worker_utilisation < msgs
    assert pl.partitions >= pl.worker_processes * pol.partitions_per_worker
    assert pl.partitions >= pl.redis_shards * pol.partitions_per_shard
    assert pl.partitions % 4 == 0
    assert pl.shard_memory_gib <= pol.shard_data_gib
    assert pl.redis_shards * pol.redis_utilisation * 1e6 >= msgs * M.redis_cpu_us_per_msg
    assert pl.rebuild_hours == pytest.approx(
        msgs * 86_400 / (M.rebuild_msgs_per_s * pl.worker_processes) / 3600, rel=0.01)


def test_more_traffic_never_needs_less():
    small = sizing.plan(Profile(msgs_per_s=10_000, sessions=1e6), M)
    big = sizing.plan(Profile(msgs_per_s=100_000, sessions=1e7), M)
    for f in ("partitions", "worker_processes", "redis_shards", "redis_memory_gib"):
        assert getattr(big, f) >= getattr(small, f), f


def test_whole_partitions_go_to_a_shard():
    assert sizing.fullest_shard_share(8, 3) == pytest.approx(3 / 8)
    assert sizing.fullest_shard_share(64, 4) == pytest.approx(1 / 4)
    # 100M states need ~3 shards by memory; spread over few partitions the fullest is too full.
    pl = sizing.plan(Profile(msgs_per_s=1000, sessions=1e8), M,
                     Policy(partitions_per_shard=1, partitions_per_worker=1))
    assert pl.shard_memory_gib <= 25.0
    assert math.ceil(pl.partitions / pl.redis_shards) / pl.partitions * pl.redis_rss_gib == \
        pytest.approx(pl.shard_memory_gib, abs=0.01)


def test_gpu_pays_only_when_the_step_dominates():
    assert sizing.plan(Profile(msgs_per_s=1e4, sessions=1e6), M).gpu_pays is False  # 20 %
    heavy = sizing.plan(Profile(msgs_per_s=1e4, sessions=1e6,
                                model=ModelShape(1, 1024, 5, 1024)), M)
    assert heavy.gpu_pays is True and heavy.step_share >= 0.5


def test_the_built_in_constants_are_the_newest_committed_result():
    from bench.capacity import newest_result
    path = newest_result()
    loaded = dataclasses.replace(Measured.load(path), source=REFERENCE.source)
    assert path.name == Path(REFERENCE.source).name
    differ = {k: (v, getattr(REFERENCE, k)) for k, v in loaded.as_dict().items()
              if getattr(REFERENCE, k) != v}
    assert not differ, f"worker.capacity.REFERENCE is not {path.name}: (measured, built in) " \
        f"{differ}"


def test_the_built_in_constants_plan():
    pl = sizing.plan(Profile(msgs_per_s=20_000, sessions=50_000))
    assert pl.worker_processes >= 1 and pl.redis_shards >= 1 and pl.partitions >= 4
    text = sizing.render(pl, Profile(msgs_per_s=20_000, sessions=50_000), REFERENCE)
    assert "Kafka partitions" in text and "Redis shards" in text


def test_the_cluster_overhead_is_taken_against_the_value_as_measured():
    """The result's values were 601 B (GRS2); sized with today's header they would fall in
    another jemalloc class and the per-key overhead would come out negative."""
    assert REFERENCE.measured_value_bytes == 601
    assert 100 < REFERENCE.cluster_key_overhead < 140
    assert REFERENCE.redis_key_overhead < REFERENCE.cluster_key_overhead


# --- the model's shape -----------------------------------------------------------------------

@pytest.mark.parametrize("mean_dim,layers", [(0, 1), (3, 1), (3, 2)])
def test_the_shape_read_from_an_artifact_is_the_model_s(tmp_path, mean_dim, layers):
    """config.json alone gives the state width the engine uses (ModelConfig.state_size)."""
    from model import artifact
    from model.gru import GRUClassifier, ModelConfig
    from model.tokenizer import PAD, UNK, Vocab
    cfg = ModelConfig(vocab_size=6, num_labels=3, embed_dim=4, hidden_size=8,
                      num_layers=layers, mean_dim=mean_dim)
    artifact.save(tmp_path, GRUClassifier(cfg), Vocab((PAD, UNK, "a", "b", "c", "d")),
                  ["x", "y", "z"])
    shape = ModelShape.from_artifact(tmp_path)
    assert (shape.layers, shape.hidden, shape.labels, shape.embed, shape.mean_units) == \
        (layers, 8, 3, 4, mean_dim)
    assert shape.state_size == cfg.state_size == artifact.load(tmp_path).model.config.state_size
    st = SessionState(np.zeros((layers, cfg.state_size), np.float32), 0, PosKind.SEQ, 4, 1,
                      outbox=(OutboxEntry(0, 0, 4, False, 7, (0.2,) * 3),))
    pl = sizing.plan(Profile(msgs_per_s=1, sessions=1, model=shape), M)
    assert pl.value_bytes == len(encode_state(st, 3, "float32"))


def test_the_default_recipe_s_state_is_193_wide():
    """The default model (model/train.py): GRU(160) and 32 mean units, 5 labels."""
    from model.train import TrainConfig
    t = TrainConfig()
    shape = ModelShape(t.num_layers, t.hidden_size, 5, t.embed_dim, t.mean_dim)
    assert shape.state_size == 193
    # GRS4: 64-byte header, 193 x f32, 5 first-seen counts, one outbox entry (33 + 5 x 4)
    assert sizing.state_value_bytes(1, 193, 5) == 64 + 772 + 20 + 53 == 909


@pytest.mark.parametrize("body,what", [
    ("{", "not a model config"),
    ('{"architecture": {"hidden_size": 8}}', "not a model config"),
    ('{"architecture": {"num_layers": 1, "hidden_size": 0, "num_labels": 5, "embed_dim": 4}}',
     "hidden is 0"),
    ('{"architecture": {"num_layers": 1, "hidden_size": 8, "num_labels": true, "embed_dim": 4}}',
     "labels is True"),
])
def test_a_config_that_is_not_a_model_s_is_refused_in_one_line(tmp_path, body, what):
    (tmp_path / "config.json").write_text(body)
    with pytest.raises(sizing.PlanError, match=what) as e:
        ModelShape.from_artifact(tmp_path)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)
    with pytest.raises(sizing.PlanError, match="has no config.json"):
        ModelShape.from_artifact(tmp_path / "absent")


def test_resident_sessions_count_the_ttl_unless_sessions_end():
    # 50k calls of 5 min: 166.7 new calls per second
    resident, ends = sizing.resident_sessions(50_000, 300, 86_400, send_end=False)
    assert resident == pytest.approx(50_000 / 300 * (300 + 86_400)) and ends == 0
    resident, ends = sizing.resident_sessions(50_000, 300, 86_400, send_end=True)
    assert resident == 50_000 and ends == pytest.approx(50_000 / 300)


def test_gpus_take_the_step_off_the_processes():
    pl = sizing.plan(Profile(msgs_per_s=1e5, sessions=1e6), M)
    # 200 µs per message of which 40 in the step: 160 µs left, 1 core, 60 %
    assert pl.gpu_worker_processes == math.ceil(1e5 / (1e6 / 160 * 0.6))
    assert pl.gpus == math.ceil(1e5 * 4 / (6e7 * 0.5))


def test_cores_per_process_come_from_runs_on_the_capacity_run_s_cpu(tmp_path):
    """A bench/processes.py run on another CPU sits in the same folder; its share of a core
    is not the measured machine's, so it is left out."""
    def run(name: str, cpu: str, cores: float) -> None:
        (tmp_path / name).write_text(json.dumps({"machine": {"cpu": cpu}, "runs": [
            {"processes": 1, "cpu": {"worker0": {"cores": cores}}},
            {"processes": 2, "cpu": {"worker0": {"cores": 0.7}, "worker1": {"cores": 0.7}}}]}))

    run("processes-2026-01-01.json", "AMD EPYC", 0.95)
    run("processes-2026-01-02.json", "AMD EPYC", 0.91)
    run("processes-2026-01-03.json", "Intel(R) Xeon(R) Processor", 0.50)
    got = _process_cores(tmp_path, "AMD EPYC")
    assert got == {"cores": pytest.approx(0.93),
                   "source": ["processes-2026-01-01.json", "processes-2026-01-02.json"]}
    assert _process_cores(tmp_path, "Intel(R) Xeon(R) Processor")["cores"] == 0.50
    assert _process_cores(tmp_path, "another CPU") == {}
