"""Where the simulator builds the worker and its fakes. This is the one place to edit when the
``Worker`` constructor or its ports change: the rest of tests/sim only calls ``build_world``
and ``build_worker``, and reaches the worker through ``run_once``, ``settle`` and ``stop``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from worker.app import build_engine
from worker.config import Settings
from worker.engine import Engine
from worker.loop import Worker
from worker.metrics import Metrics
from worker.models import ModelSet, ServedModel

from .broker import Broker, BrokerSink, Group, Member
from .clock import SimClock
from .models import SimModel
from .store import SimRedis, StoreView
from .workload import END_TTL_S, SESSION_TIMEOUT_S, TTL_S, Config

INPUT, OUTPUT, DLQ, GROUP = "tokens", "predictions", "tokens.dlq", "gru-sim"

# wrap(port name, port) -> the port as the worker sees it (with effect boundaries around calls)
Wrap = Callable[[str, object], object]


@dataclass
class World:
    clock: SimClock
    broker: Broker
    group: Group
    redis: SimRedis


@dataclass
class WorkerParts:
    worker: Worker
    member: Member
    sink: BrokerSink


def settings(cfg: Config) -> Settings:
    return Settings(
        kafka={"input_topic": INPUT, "output_topic": OUTPUT, "dlq_topic": DLQ, "group_id": GROUP,
               "commit_interval_ms": cfg.commit_interval_ms, "async_commits": cfg.async_commits,
               "session_timeout_ms": int(SESSION_TIMEOUT_S * 1000),
               "heartbeat_interval_ms": int(SESSION_TIMEOUT_S * 1000 / 3)},
        state={"ttl_seconds": TTL_S, "end_ttl_seconds": END_TTL_S},
        batch={"max_records": cfg.max_records, "target_latency_ms": 0, "max_wait_ms": 0},
        output={"emit": cfg.emit, "min_confidence": cfg.min_confidence},
        retry={"initial_backoff_s": 0.05, "max_backoff_s": 1.0},
    )


def build_world(cfg: Config) -> World:
    clock = SimClock()
    broker = Broker(clock, cfg.partitions)
    for topic in (INPUT, OUTPUT, DLQ):
        broker.topic(topic)
    group = broker.group(GROUP, INPUT, cfg.assignor, SESSION_TIMEOUT_S)
    return World(clock, broker, group, SimRedis(clock))


def _engine(s: Settings, m: SimModel) -> Engine:
    return build_engine(s, m, "cpu")  # as the worker builds it from its settings


def build_worker(world: World, cfg: Config, current: SimModel, previous: SimModel | None,
                 member_id: str, wrap: Wrap) -> WorkerParts:
    """A worker serving ``current`` (and ``previous`` during a rollout), as app.build_worker
    wires it, on the world's fakes seen through ``wrap``."""
    s = settings(cfg)
    member = Member(world.broker, world.group, member_id)
    sink = BrokerSink(world.broker)
    metrics = Metrics(CollectorRegistry())
    metrics.add_model(current.model_id, current.labels, None, "cpu", "current")
    served = None
    if previous is not None:
        metrics.add_model(previous.model_id, previous.labels, None, "cpu", "previous")
        served = ServedModel(previous.model_id, _engine(s, previous), previous.labels,
                             previous.encode, previous.vocab_size, previous.vocab.itos)
    models = ModelSet(ServedModel(current.model_id, _engine(s, current), current.labels,
                                  current.encode, current.vocab_size, current.vocab.itos),
                      served, s.limits, metrics)
    worker = Worker(s, models, wrap("store", StoreView(world.redis, current.model_id)),
                    wrap("source", member), wrap("sink", sink), metrics,
                    clock=wrap("clock", world.clock))
    return WorkerParts(worker, member, sink)
