"""Prometheus metrics (injected registry) and the HTTP server for /metrics, /healthz, /readyz.

All metric names live here. Tests build ``Metrics(CollectorRegistry())`` and read samples
back with ``registry.get_sample_value``.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (.001, .0025, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .15, .25, .5,
                   1, 2.5, 5, 10, 30)
STAGE_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
OUTCOMES = ("ok", "dead_lettered", "duplicate", "fenced", "replayed", "rebuilt", "deferred")


class BatchHistogram:
    """A histogram fed a whole batch of observations at once (numpy), where
    ``prometheus_client.Histogram`` takes one per call: the worker observes a latency per
    prediction, thousands per batch. Exposed in the same text format (buckets, ``_sum``,
    ``_count``), from a collector registered in the injected registry."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.array([*buckets, float("inf")])
        self.counts = np.zeros(len(self.bounds), np.int64)
        self.total = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values) -> None:
        v = np.asarray(values, np.float64)
        if not v.size:
            return
        counts = np.bincount(np.searchsorted(self.bounds, v, side="left"),
                             minlength=len(self.bounds))
        with self._lock:
            self.counts += counts
            self.total += float(v.sum())

    def observe(self, value: float) -> None:
        self.observe_many([value])

    def collect(self):
        with self._lock:
            cumulative = np.cumsum(self.counts).tolist()
            total = self.total
        le = [_le(b) for b in self.bounds]
        yield HistogramMetricFamily(self.name, self.documentation,
                                    buckets=list(zip(le, cumulative)), sum_value=total)

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation)]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
    PRUNE_PER_CALL = 2000

    def __init__(self, registry: CollectorRegistry, active_window_s: float = 300.0) -> None:
        self.registry = registry
        r = registry
        self.e2e_latency = BatchHistogram(
            "gru_e2e_latency_seconds", "Kafka record timestamp to its prediction being produced",
            LATENCY_BUCKETS, r)
        self.poll_seconds = Histogram("gru_poll_seconds", "Time in a poll that returned records",
                                      buckets=STAGE_BUCKETS, registry=r)
        self.decode_seconds = Histogram("gru_decode_seconds", "Input decode and validation, per batch",
                                        buckets=STAGE_BUCKETS, registry=r)
        self.engine_seconds = Histogram("gru_engine_seconds", "The engine per batch: planning, "
                                        "state codec and the model step", buckets=STAGE_BUCKETS,
                                        registry=r)
        self.step_seconds = Histogram("gru_step_seconds", "Batched model step time per batch",
                                      buckets=STAGE_BUCKETS, registry=r)
        self.encode_seconds = Histogram("gru_encode_seconds", "Prediction and dead-letter "
                                        "encoding, per batch", buckets=STAGE_BUCKETS, registry=r)
        self.load_seconds = Histogram("gru_state_load_seconds", "Redis state load time per batch",
                                      buckets=STAGE_BUCKETS, registry=r)
        self.store_seconds = Histogram("gru_state_store_seconds", "Redis state write time per batch",
                                       buckets=STAGE_BUCKETS, registry=r)
        self.produce_seconds = Histogram("gru_produce_seconds",
                                         "Produce and wait for acknowledgements, per batch",
                                         buckets=STAGE_BUCKETS, registry=r)
        self.commit_seconds = Histogram("gru_commit_seconds", "Offset commit time per batch",
                                        buckets=STAGE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("gru_batch_seconds", "Whole batch: decode to commit",
                                       buckets=STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("gru_batch_size_messages", "Input messages per batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.messages = Counter("gru_messages_total", "Input messages by outcome", ["outcome"],
                                registry=r)
        for o in OUTCOMES:
            self.messages.labels(o)
        self.tokens = Counter("gru_tokens_total", "Tokens applied to session states", registry=r)
        self.predictions = Counter("gru_predictions_total", "Predictions produced", registry=r)
        self.sessions_started = Counter("gru_sessions_started_total", "Sessions begun", registry=r)
        self.sessions_ended = Counter("gru_sessions_ended_total", "Sessions closed by end=true",
                                      registry=r)
        self.active_sessions = Gauge("gru_active_sessions",
                                     f"Sessions with a message in the last {active_window_s:g}s",
                                     registry=r)
        self.lag = Gauge("gru_consumer_lag_messages", "High watermark minus position",
                         ["topic", "partition"], registry=r)
        self.assigned = Gauge("gru_assigned_partitions", "Partitions owned by this worker", registry=r)
        self.retries = Counter("gru_dependency_retries_total", "Retried calls to a dependency",
                               ["dependency"], registry=r)
        self.fenced_partitions = Counter("gru_fenced_partitions_total",
                                         "Partitions dropped because another worker fenced them",
                                         registry=r)
        self.undecodable = Counter(
            "gru_undecodable_batches_total", "Polls that met an input record batch the client "
            "cannot decode (codec missing, CRC failed): its partition cannot advance",
            ["topic", "partition"], registry=r)
        self.dead_letter_fallbacks = Counter(
            "gru_dead_letter_fallbacks_total", "Dead letters refused by Kafka and sent again "
            "with their reason and coordinates only", registry=r)
        self.undeliverable = Counter(
            "gru_undeliverable_total", "Messages Kafka refused for good (too large, invalid), "
            "dropped", ["topic"], registry=r)
        self.rebuilds = Counter(
            "gru_state_rebuilds_total", "Partitions replayed because Redis lost writes "
            "(rollback) or everything (loss)", ["reason"], registry=r)
        for reason in ("rollback", "loss"):
            self.rebuilds.labels(reason)
        self.rebuild_messages = Counter(
            "gru_rebuild_messages_total", "Input messages replayed to rebuild lost states",
            registry=r)
        self.corrupt_states = Counter(
            "gru_corrupt_states_total", "Sessions whose stored value is not a readable state "
            "(their messages are dead-lettered)", registry=r)
        self.partial_sessions = Counter(
            "gru_sessions_partial_total", "Sessions begun with no state at a seq past 0: "
            "their beginning was never applied (predictions say context=partial)", registry=r)
        self.batch_budget = Gauge(
            "gru_batch_budget_seconds", "The latency budget for one batch's processing time "
            "(GRU_BATCH__TARGET_LATENCY_MS; 0: off)", registry=r)
        self.batch_limit = Gauge(
            "gru_batch_limit_records", "The most records the next batch may take, and why "
            "(budget, backlog, warmup, max)", ["reason"], registry=r)
        self.batch_cost = Gauge(
            "gru_batch_cost_seconds", "The fitted batch cost model: fixed seconds per batch and "
            "marginal seconds per message", ["term"], registry=r)
        self.gc_pauses = Histogram(
            "gru_gc_pause_seconds", "Python garbage-collector pauses in the worker, by generation",
            ["generation"], buckets=STAGE_BUCKETS, registry=r)
        self.model_info = Gauge("gru_model_info", "The loaded model", ["model_id", "device"],
                                registry=r)
        self._window = active_window_s
        self._seen: OrderedDict[str, float] = OrderedDict()  # least recently seen first


    def saw_sessions(self, session_ids, now: float | None = None) -> None:
        """Prunes from the least recently seen end, a few entries per call: a pass over every
        session (100k of them) would be a pause of tens of milliseconds."""
        now = time.monotonic() if now is None else now
        seen = self._seen
        for sid in session_ids:
            seen[sid] = now
            seen.move_to_end(sid)
        cutoff = now - self._window
        for _ in range(self.PRUNE_PER_CALL):  # bounded: the gauge catches up over a few calls
            if not seen:
                break
            sid, t = next(iter(seen.items()))
            if t >= cutoff:
                break
            del seen[sid]
        self.active_sessions.set(len(seen))


def watch_gc(metrics: Metrics) -> Callable[[], None]:
    """Observe every garbage-collector pause into ``gru_gc_pause_seconds{generation}``.
    Returns the function that stops watching."""
    children = [metrics.gc_pauses.labels(str(g)) for g in range(3)]
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            children[min(info.get("generation", 2), 2)].observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)
    return lambda: gc.callbacks.remove(callback)


def quiet_gc() -> None:
    """After start-up, everything alive (the model, torch, the clients) moves to the
    permanent generation: no later full collection walks it again. Measured with
    bench/latency.py: without it a full collection paused the worker ~130 ms; the young
    thresholds stay at Python's defaults (a young threshold of 20,000 made each young
    collection ~20 ms instead of ~0.3 ms)."""
    gc.collect()
    gc.freeze()


class HealthServer:
    """Serves /metrics, /healthz (alive) and /readyz (``ready()`` returns (ok, details))."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 ready: Callable[[], tuple[bool, dict]]) -> None:
        registry_, ready_ = registry, ready

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry_), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b'{"status":"ok"}', "application/json")
                elif path == "/readyz":
                    try:
                        ok, details = ready_()
                    except Exception as e:  # a probe must answer, whatever broke
                        ok, details = False, {"error": repr(e)}
                    body = json.dumps({"ready": ok, **details}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="health-http",
                                        daemon=True)

    def start(self) -> "HealthServer":
        self._thread.start()
        log.info("metrics and health on http://%s:%d/metrics", *self.server.server_address[:2])
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
