"""Wiring: build a running worker (model, state store, Kafka, metrics, health) from Settings.

Everything here is construction; the behaviour lives in ``loop``, ``engine`` and the adapters.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis
import redis.cluster
import torch
from prometheus_client import CollectorRegistry

import model as model_pkg
from model.artifact import ArtifactError

from .config import CLUSTER_SCHEMES, KafkaSettings, Settings
from .engine import Engine
from .failures import redis_address
from .health import DependencyHealth, ready_gauge, watched
from .kafka_io import ensure_checkpoint_topic
from .loop import Worker
from .metrics import HealthServer, Metrics, quiet_gc, watch_gc
from .models import DrainWatcher, ModelSet, ServedModel
from .output import OutputPolicy
from .ports import Sink, Source, StateStore
from .preflight import StartupError, check_kafka, check_redis, port_error
from .state import Keys, MemoryStateStore, RedisStateStore

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StartupError("GRU_MODEL__DEVICE (--device) is cuda, but torch sees no CUDA device")
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


def build_kafka(settings: KafkaSettings) -> tuple[Source, Sink]:
    """The consumer-group source and the acknowledged sink of the client ``kafka.client``
    names: kafka-python (worker.kafka_io) or confluent-kafka (worker.rdkafka_io)."""
    if settings.client == "confluent":
        from .rdkafka_io import RdKafkaSink, RdKafkaSource
        return RdKafkaSource(settings), RdKafkaSink(settings)
    from .kafka_io import KafkaSink, KafkaSource, missing_codecs
    missing = missing_codecs()
    if missing:
        log.error("kafka-python cannot decode %s: input compressed with them will stall its "
                  "partition (gru_undecodable_batches_total). Install the project's "
                  "dependencies: pip install python-snappy lz4 zstandard", ", ".join(missing))
    return KafkaSource(settings), KafkaSink(settings)


@dataclass
class App:
    worker: Worker
    health: HealthServer
    registry: CollectorRegistry
    drain: DrainWatcher | None = None
    unwatch_gc: Callable[[], None] = lambda: None
    dependencies: DependencyHealth | None = None

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
                  model_id=clf.model_id, max_seq_gap=settings.limits.max_seq_gap,
                  keyed=settings.limits.require_key)


def build_worker(settings: Settings, registry: CollectorRegistry) -> App:
    """Start-up, in the order of worker/preflight.py: the metrics port (bound and serving
    before the model loads: a port in use is named at once, and /readyz answers 503 while
    loading), the model, Redis and Kafka checked, then the clients and the worker. Raises
    ``StartupError`` (or ``ArtifactError``) with the line to print."""
    readiness: list[Callable[[], tuple[bool, dict]]] = [lambda: (False, {"starting": True})]
    try:
        health = HealthServer(registry, settings.metrics.host, settings.metrics.port,
                              lambda: readiness[0](), settings.metrics.max_connections,
                              settings.metrics.timeout_s).start()
    except OSError as e:
        raise port_error(settings.metrics, e) from None
    try:
        return _build(settings, registry, health, readiness)
    except BaseException:
        health.stop()
        raise


def _build(settings: Settings, registry: CollectorRegistry, health: HealthServer,
           readiness: list) -> App:
    torch.set_num_threads(settings.model.threads)
    device = resolve_device(settings.model.device)
    if settings.model.dtype == "float16" and device != "cuda":
        raise StartupError("GRU_MODEL__DTYPE (--dtype) float16 needs GRU_MODEL__DEVICE "
                           "(--device) cuda, or auto with a GPU")
    try:
        clf = model_pkg.load(settings.model.dir, device=device,
                             max_parameters=settings.model.max_parameters)
    except ArtifactError as e:
        raise ArtifactError(f"(--model-dir / GRU_MODEL__DIR): {e}") from None
    log.info("model %s from %s on %s: %d labels, vocab %d, hidden %d x %d layers",
             clf.model_id, settings.model.dir, device, len(clf.labels), len(clf.vocab),
             clf.model.config.hidden_size, clf.model.config.num_layers)
    metrics = Metrics(registry)
    metrics.add_model(clf.model_id, clf.labels, clf.label_prior, device, "current")
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
    # The dependencies, checked before the group is joined: what cannot heal ends start-up
    # with one line naming it; what may heal is waited for up to startup_timeout_s.
    k = settings.kafka
    if settings.redis.url != "memory":
        check_redis(settings, lambda: redis_client(settings))
    check_kafka(settings)
    dependencies = DependencyHealth(metrics, addresses={
        "redis": redis_address(settings.redis.url) if settings.redis.url != "memory" else "memory",
        "kafka": k.bootstrap_servers})
    for topic in (k.output_topic, k.dlq_topic):
        metrics.undeliverable.labels(topic)  # every known label value starts at zero
    store = watched(build_store(settings, clf.model_id), "redis", dependencies)
    ensure_checkpoint_topic(k)
    source, sink = build_kafka(k)
    # A send only buffers: acknowledgements (wait) say Kafka is back, not sends.
    sink = watched(sink, "kafka", dependencies, successes=("wait",))
    current = ServedModel(clf.model_id, engine, tuple(clf.labels), clf.encode, len(clf.vocab),
                          tuple(clf.vocab.itos), device, tenants)
    models = ModelSet(current, previous, settings.limits, metrics)
    worker = Worker(settings, models, store, source, sink, metrics, health=dependencies)
    health.alive = worker.alive
    drain = DrainWatcher(models, store, settings.model.drain_check_s).start()

    def ready() -> tuple[bool, dict]:
        """Each dependency from its own last result; Redis is asked too (a ping, watched),
        as an idle worker calls it for nothing else."""
        if settings.redis.url != "memory":
            with contextlib.suppress(Exception):
                store.ping()
        return worker.ready()

    def ready_now() -> tuple[bool, dict]:
        """Readiness without I/O, for gru_ready at each scrape: the worker's own state and
        each dependency's last result."""
        return worker.ready()

    readiness[0] = ready
    metrics.ready.set_function(ready_gauge(ready_now))
    unwatch = watch_gc(metrics)
    if settings.batch.gc_freeze:
        quiet_gc()
    return App(worker, health, registry, drain, unwatch, dependencies)
