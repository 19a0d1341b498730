"""Wiring: build a running worker (model, state store, Kafka, metrics, health) from Settings.

Everything here is construction; the behaviour lives in ``loop``, ``engine`` and the adapters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import redis.cluster
import torch
from prometheus_client import CollectorRegistry

import model as model_pkg
from model.artifact import ArtifactError

from .config import CLUSTER_SCHEMES, Settings
from .engine import Engine
from .kafka_io import KafkaSink, KafkaSource, ensure_checkpoint_topic, missing_codecs
from .loop import Worker
from .metrics import HealthServer, Metrics, quiet_gc, watch_gc
from .models import DrainWatcher, ModelSet, ServedModel
from .output import OutputPolicy
from .ports import StateStore
from .state import Keys, MemoryStateStore, RedisStateStore

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("model.device=cuda but torch sees no CUDA device")
    return device


def redis_client(settings: Settings):
    """A redis-py client; ``redis+cluster://`` (or ``rediss+cluster://``) gives RedisCluster."""
    r = settings.redis
    options = dict(username=r.username,
                   password=r.password.get_secret_value() if r.password else None,
                   socket_timeout=r.socket_timeout_s, socket_connect_timeout=r.socket_timeout_s)
    if r.ssl_ca_certs:
        options["ssl_ca_certs"] = r.ssl_ca_certs
    if r.ssl_certfile:
        options["ssl_certfile"] = r.ssl_certfile
    if r.ssl_keyfile:
        options["ssl_keyfile"] = r.ssl_keyfile
    scheme, rest = r.url.split("://", 1)
    if scheme in CLUSTER_SCHEMES:
        return redis.cluster.RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    return redis.Redis.from_url(r.url, **options)


def build_store(settings: Settings, model_id: str) -> StateStore:
    if settings.redis.url == "memory":
        log.warning("state store: in-process memory (state is lost when the worker stops)")
        return MemoryStateStore()
    keys = Keys(settings.redis.prefix, model_id,
                settings.state.namespace or settings.kafka.group_id,
                cluster=settings.redis.cluster)
    return RedisStateStore(redis_client(settings), keys)


@dataclass
class App:
    worker: Worker
    health: HealthServer
    registry: CollectorRegistry
    drain: DrainWatcher | None = None
    unwatch_gc: Callable[[], None] = lambda: None

    def close(self) -> None:
        if self.drain is not None:
            self.drain.stop()
        self.health.stop()
        self.unwatch_gc()


def build_engine(settings: Settings, clf, device: str) -> Engine:
    """The engine of one served model, from the settings every model shares."""
    return Engine(clf.model, device=device, state_dtype=settings.state.dtype,
                  ttl_ms=settings.state.ttl_seconds * 1000,
                  end_ttl_ms=settings.state.end_ttl_seconds * 1000,
                  compute_dtype=settings.model.dtype, cuda_graphs=settings.model.cuda_graphs,
                  output=OutputPolicy(settings.output.emit, settings.output.min_confidence),
                  model_id=clf.model_id, max_seq_gap=settings.limits.max_seq_gap)


def build_worker(settings: Settings, registry: CollectorRegistry) -> App:
    torch.set_num_threads(settings.model.threads)
    device = resolve_device(settings.model.device)
    try:
        clf = model_pkg.load(settings.model.dir, device=device,
                             max_parameters=settings.model.max_parameters)
    except ArtifactError as e:
        raise ArtifactError(f"(--model-dir / GRU_MODEL__DIR): {e}") from None
    log.info("model %s from %s on %s: %d labels, vocab %d, hidden %d x %d layers",
             clf.model_id, settings.model.dir, device, len(clf.labels), len(clf.vocab),
             clf.model.config.hidden_size, clf.model.config.num_layers)
    store = build_store(settings, clf.model_id)
    metrics = Metrics(registry)
    metrics.add_model(clf.model_id, clf.labels, clf.label_prior, device, "current")
    if settings.model.dtype == "float16" and device != "cuda":
        raise SystemExit("model.dtype=float16 needs model.device=cuda (or auto with a GPU)")
    engine = build_engine(settings, clf, device)
    tenants = settings.limits.tenant_header is not None
    previous = None
    if settings.model.previous_dir is not None:
        try:
            old = model_pkg.load(settings.model.previous_dir, device=device,
                                 max_parameters=settings.model.max_parameters)
        except ArtifactError as e:
            raise ArtifactError(f"(--previous-model-dir / GRU_MODEL__PREVIOUS_DIR): {e}") from None
        if old.model_id != clf.model_id:
            log.info("previous model %s from %s: its live sessions stay on it until they end "
                     "or expire; new sessions go to %s", old.model_id,
                     settings.model.previous_dir, clf.model_id)
            metrics.add_model(old.model_id, old.labels, old.label_prior, device, "previous")
            previous = ServedModel(old.model_id, build_engine(settings, old, device),
                                   tuple(old.labels), old.encode, len(old.vocab),
                                   tuple(old.vocab.itos), device, tenants)
    missing = missing_codecs()
    if missing:
        log.error("kafka-python cannot decode %s: input compressed with them will stall its "
                  "partition (gru_undecodable_batches_total). Install the project's "
                  "dependencies: pip install python-snappy lz4 zstandard", ", ".join(missing))
    ensure_checkpoint_topic(settings.kafka)
    source = KafkaSource(settings.kafka)
    sink = KafkaSink(settings.kafka)
    current = ServedModel(clf.model_id, engine, tuple(clf.labels), clf.encode, len(clf.vocab),
                          tuple(clf.vocab.itos), device, tenants)
    models = ModelSet(current, previous, settings.limits, metrics)
    worker = Worker(settings, models, store, source, sink, metrics)
    drain = DrainWatcher(models, store, settings.model.drain_check_s).start()

    def ready() -> tuple[bool, dict]:
        try:
            redis_ok = store.ping()
        except Exception:
            redis_ok = False
        kafka_ok = time.monotonic() - worker.last_poll_ok < max(30.0, settings.kafka.session_timeout_ms / 1000)
        ok, details = worker.ready()
        return redis_ok and kafka_ok and ok, {"redis": redis_ok, "kafka": kafka_ok, **details}

    health = HealthServer(registry, settings.metrics.host, settings.metrics.port, ready,
                          settings.metrics.max_connections, settings.metrics.timeout_s).start()
    unwatch = watch_gc(metrics)
    if settings.batch.gc_freeze:
        quiet_gc()
    return App(worker, health, registry, drain, unwatch)
