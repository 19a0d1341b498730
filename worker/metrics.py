"""Prometheus metrics (injected registry) and the HTTP server for /metrics, /healthz, /readyz.

All metric names live here. Tests build ``Metrics(CollectorRegistry())`` and read samples
back with ``registry.get_sample_value``.
"""

from __future__ import annotations

import atexit
import gc
import io
import json
import logging
import queue
import selectors
import socket
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

import numpy as np
from datasketches import HLL_8, hll_sketch, hll_union
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
SUPPRESSED_REASONS = ("policy", "min_confidence")
DEPENDENCIES = ("redis", "kafka")
POLL_RESULTS = ("records", "empty")
CONFIDENCE_BUCKETS = (.2, .3, .4, .5, .6, .7, .8, .85, .9, .95, .98, .99, 1.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)


class BatchHistogram:
    """A histogram fed a whole batch of observations at once (numpy), where
    ``prometheus_client.Histogram`` takes one per call: the worker observes a latency per
    prediction, thousands per batch. Exposed in the same text format (buckets, ``_sum``,
    ``_count``), from a collector registered in the injected registry. With ``labelnames``,
    ``labels(*values)`` gives the child to observe, as with prometheus_client."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry, labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = labelnames
        self.bounds = np.array([*buckets, float("inf")])
        self._children: dict[tuple[str, ...], list] = {}  # values -> [counts, total]
        self._lock = threading.Lock()
        if not labelnames:
            self._children[()] = [np.zeros(len(self.bounds), np.int64), 0.0]
        registry.register(self)

    def labels(self, *values: str) -> "_Child":
        with self._lock:
            self._children.setdefault(tuple(values),
                                      [np.zeros(len(self.bounds), np.int64), 0.0])
        return _Child(self, tuple(values))

    def remove(self, *values: str) -> None:
        with self._lock:
            self._children.pop(tuple(values), None)

    def observe_many(self, values, key: tuple[str, ...] = ()) -> None:
        v = np.asarray(values, np.float64)
        if not v.size:
            return
        counts = np.bincount(np.searchsorted(self.bounds, v, side="left"),
                             minlength=len(self.bounds))
        with self._lock:
            child = self._children[key]
            child[0] += counts
            child[1] += float(v.sum())

    def observe(self, value: float) -> None:
        self.observe_many([value])

    @property
    def counts(self) -> np.ndarray:
        return self._children[()][0]

    def collect(self):
        with self._lock:
            children = [(k, np.cumsum(c).tolist(), t) for k, (c, t) in self._children.items()]
        le = [_le(b) for b in self.bounds]
        family = HistogramMetricFamily(self.name, self.documentation,
                                       labels=list(self.labelnames))
        for key, cumulative, total in children:
            family.add_metric(list(key), list(zip(le, cumulative)), total)
        yield family

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation,
                                      labels=list(self.labelnames))]


class _Child:
    def __init__(self, parent: BatchHistogram, key: tuple[str, ...]) -> None:
        self.parent, self.key = parent, key

    def observe_many(self, values) -> None:
        self.parent.observe_many(values, self.key)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
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
        # Health of the dependencies and of the loop (worker/health.py sets the first and the
        # partition progress; the loop the others). Counters start at zero for every known
        # label value: increase() misses the first increment of a series that appears at 1.
        self.dependency_up = Gauge(
            "gru_dependency_up", "1 while the dependency's last call succeeded; 0 from its first "
            "failed call until one succeeds", ["dependency"], registry=r)
        self.dependency_backoff = Counter(
            "gru_dependency_backoff_seconds_total", "Seconds the loop slept before retrying a "
            "call to the dependency", ["dependency"], registry=r)
        for dependency in DEPENDENCIES:
            self.retries.labels(dependency)
            self.dependency_backoff.labels(dependency)
        self.ready = Gauge(
            "gru_ready", "1 when the worker is ready (as /readyz): it holds partitions, all "
            "claimed, none being rebuilt", registry=r)
        self.partition_progress = Gauge(
            "gru_partition_progress_timestamp_seconds", "Unix time at which this worker last "
            "advanced the partition: claimed it, or settled records of it", ["topic", "partition"],
            registry=r)
        self.poll_wait = Counter(
            "gru_poll_wait_seconds_total", "Seconds the loop spent in polls, empty ones "
            "included: its rate is the share of time spent waiting for the broker", registry=r)
        self.polls = Counter("gru_polls_total", "Polls of the input by result (records, empty)",
                             ["result"], registry=r)
        for result in POLL_RESULTS:
            self.polls.labels(result)
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
        self.offset_skips = Counter(
            "gru_offset_skips_total", "Claims that found the group's committed offset moved "
            "past this group's progress by someone else (an operator's skip), honoured",
            registry=r)
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
            "gru_batch_cost_seconds", "The fitted batch cost model: fixed seconds per batch, "
            "marginal seconds per message (its tokens included), per token, and per step of "
            "the batch's longest sequence", ["term"], registry=r)
        self.gc_pauses = Histogram(
            "gru_gc_pause_seconds", "Python garbage-collector pauses in the worker, by generation",
            ["generation"], buckets=STAGE_BUCKETS, registry=r)
        self.model_info = Gauge("gru_model_info", "The loaded models: role current (new "
                                "sessions) or previous (draining)",
                                ["model_id", "device", "role"], registry=r)
        # Output control (worker/output.py).
        self.suppressed = Counter(
            "gru_predictions_suppressed_total", "Predictions not emitted: the emit policy did "
            "not select them (policy) or their confidence was too low (min_confidence)",
            ["reason"], registry=r)
        for reason in SUPPRESSED_REASONS:
            self.suppressed.labels(reason)
        # Model quality: every prediction the model made for a live message (emitted or not;
        # not rebuilds, not replays).
        self.model_predictions = Counter(
            "gru_model_predictions_total", "Predictions made, by model, top label and whether "
            "it is a session's final one", ["model_id", "label", "final"], registry=r)
        self.confidence = BatchHistogram(
            "gru_prediction_confidence", "Top probability of each prediction",
            CONFIDENCE_BUCKETS, r, ("model_id",))
        self.tokens_to_final = BatchHistogram(
            "gru_tokens_to_final_label", "At end: tokens read when the session's final label "
            "was first the top label", TOKEN_BUCKETS, r, ("model_id",))
        self.session_length = BatchHistogram(
            "gru_session_length_tokens", "At end: tokens the session read", TOKEN_BUCKETS, r,
            ("model_id",))
        self.label_prior = Gauge(
            "gru_model_label_prior", "Share of each label in the model's training split (absent "
            "for artifacts that do not record it)", ["model_id", "label"], registry=r)
        # Rollout (worker/models.py): sessions per model, and the previous model's drain.
        self.model_active_sessions = Gauge(
            "gru_model_active_sessions", f"Sessions with a message in the last "
            f"{active_window_s:g}s, by the model serving them (this worker)", ["model_id"],
            registry=r)
        self.model_stored_sessions = Gauge(
            "gru_model_stored_sessions", "Sessions stored under each model's namespace in the "
            "state store while a previous model drains (live: a hidden state; ended: a "
            "tombstone), counted by a periodic scan; the same for every worker of the group",
            ["model_id", "state"], registry=r)
        self.drain_progress = Gauge(
            "gru_model_drain_progress", "Share of the previous model's sessions that have ended "
            "or expired since this worker started draining it (1: drained, then unloaded)",
            ["model_id"], registry=r)
        self.models_unloaded = Counter(
            "gru_models_unloaded_total", "Previous models unloaded once no session was left "
            "under them", registry=r)
        self._labels: dict[str, tuple[str, ...]] = {}
        self._window = active_window_s
        self._active = ActiveSessions(active_window_s)
        self._active_by_model: dict[str, ActiveSessions] = {}


    def add_model(self, model_id: str, labels, prior: dict[str, float] | None, device: str,
                  role: str) -> None:
        """A model is served: its info, its label names and its training prior."""
        self._labels[model_id] = tuple(labels)
        self.model_info.labels(model_id, device, role).set(1)
        for label in labels:  # every known label value starts at zero
            for final in ("true", "false"):
                self.model_predictions.labels(model_id, label, final)
        for histogram in (self.confidence, self.tokens_to_final, self.session_length):
            histogram.labels(model_id)
        for label, share in (prior or {}).items():
            self.label_prior.labels(model_id, label).set(share)

    def drop_model(self, model_id: str, device: str, role: str) -> None:
        """A model is unloaded: its series go (counters and histograms stay, as counters do)."""
        for gauge, values in ((self.model_info, (model_id, device, role)),):
            try:
                gauge.remove(*values)
            except KeyError:
                pass
        for label in self._labels.get(model_id, ()):
            try:
                self.label_prior.remove(model_id, label)
            except KeyError:
                pass

    def observe_predictions(self, table, rows: list[int]) -> None:
        """One step table's live rows (worker.engine.StepTable): suppressed outputs, and the
        model-quality series, a handful of calls per batch, not one per prediction."""
        r = np.asarray(rows)
        held, confident = ~table.emit[r], table.confident[r]
        if held.any():
            self.suppressed.labels("min_confidence").inc(int((held & ~confident).sum()))
            self.suppressed.labels("policy").inc(int((held & confident).sum()))
        mid = table.model_id
        names = self._labels.get(mid)
        label, final = table.label[r], table.final[r]
        combos, counts = np.unique(label * 2 + final, return_counts=True)
        for combo, n in zip(combos.tolist(), counts.tolist()):
            name = names[combo // 2] if names else str(combo // 2)
            self.model_predictions.labels(mid, name, "true" if combo % 2 else "false").inc(n)
        self.confidence.labels(mid).observe_many(table.confidence[r])
        ends = r[final]
        if len(ends):
            self.tokens_to_final.labels(mid).observe_many(table.first_reached[ends])
            self.session_length.labels(mid).observe_many(table.tokens_seen[ends])

    def saw_sessions(self, session_ids, now: float | None = None,
                     models: dict[str, list[str]] | None = None) -> None:
        """Sessions that had a message now; ``models``: the same, by the model serving them.
        The gauges are approximate (``ActiveSessions``): a few percent, in bounded memory."""
        now = time.monotonic() if now is None else now
        self._active.add(session_ids, now)
        for mid, sids in (models or {}).items():
            if mid not in self._active_by_model:
                self._active_by_model[mid] = ActiveSessions(self._window)
            self._active_by_model[mid].add(sids, now)
        for mid, active in self._active_by_model.items():
            self.model_active_sessions.labels(mid).set(active.count(now))
        self.active_sessions.set(self._active.count(now))


class ActiveSessions:
    """How many distinct session ids were seen in the last ``window_s`` seconds, approximately,
    in memory that does not grow with them: a HyperLogLog sketch (Apache DataSketches; lg_k 12
    is 4 KB and about 1.6 % relative standard error) for each of ``slices`` slices of the
    window, and their running union, which the count reads. A slice leaves whole: an id counts
    for between ``window_s`` and ``window_s`` plus one slice after it was last seen. Kept
    exactly, 500,000 ids cost 230 MB; this costs about 130 KB whatever their number."""

    def __init__(self, window_s: float, slices: int = 30, lg_k: int = 12) -> None:
        self.width = window_s / slices
        self.slices, self.lg_k = slices, lg_k
        self._sketches: deque[tuple[int, hll_sketch]] = deque()  # (slice number, sketch)
        self._union = hll_union(lg_k)
        _LIVE_COUNTERS.add(self)

    def add(self, session_ids, now: float) -> None:
        current = self._expire(now)
        if not self._sketches or self._sketches[-1][0] != current:
            self._sketches.append((current, hll_sketch(self.lg_k, HLL_8)))
        add_to_slice, add_to_union = self._sketches[-1][1].update, self._union.update
        for sid in session_ids:
            add_to_slice(sid)
            add_to_union(sid)

    def count(self, now: float) -> int:
        self._expire(now)
        return round(self._union.get_estimate())

    def _expire(self, now: float) -> int:
        """Drop the slices older than the window (the union is rebuilt from the others);
        returns the current slice's number."""
        current = int(now // self.width)
        if self._sketches and self._sketches[0][0] < current - self.slices:
            while self._sketches and self._sketches[0][0] < current - self.slices:
                self._sketches.popleft()
            self._union = hll_union(self.lg_k)
            for _, sketch in self._sketches:
                self._union.update(sketch)
        return current


_LIVE_COUNTERS: weakref.WeakSet[ActiveSessions] = weakref.WeakSet()


@atexit.register
def _release_counters() -> None:
    """Free the sketches of every counter still alive at exit: the library's bindings
    (nanobind) report each C++ object still alive when the interpreter ends as a leak, a few
    lines of stderr each (a test run's counters, held by late garbage, printed hundreds)."""
    for counter in list(_LIVE_COUNTERS):
        counter._sketches.clear()
        counter._union = None


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
    """Serves /metrics, /healthz (alive) and /readyz (``ready()`` returns (ok, details)).

    Nobody who reaches the port can tie it up (issue 26, F6):

    1. One thread accepts connections and reads their request heads without blocking: a
       connection holds no thread until its whole head (at most 16 KB) has arrived.
    2. At most ``max_connections`` are open; a new one closes the oldest still waiting.
    3. Each has ``timeout_s`` from its accept to a complete head (idle, half-open or slow
       connections are closed then), and as long again to take its answer.
    4. ``threads`` threads answer complete requests; while they are all busy and as many
       requests wait, more are refused (closed).
    """

    MAX_HEAD_BYTES = 16 * 1024

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 ready: Callable[[], tuple[bool, dict]], max_connections: int = 64,
                 timeout_s: float = 5.0, threads: int = 2,
                 alive: Callable[[], tuple[bool, dict]] | None = None) -> None:
        registry_, ready_ = registry, ready
        self.alive = alive  # /healthz: (ok, details); None: alive while it answers
        server = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:  # the head was read by the acceptor; answer on the socket
                self.connection, head = self.request
                self.rfile = io.BytesIO(head)
                self.wfile = self.connection.makefile("wb")

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry_), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    probe = ready_ if path == "/readyz" else server.alive
                    try:
                        ok, details = probe() if probe is not None else (True, {})
                    except Exception as e:  # a probe must answer, whatever broke
                        ok, details = False, {"error": repr(e)}
                    key = "ready" if path == "/readyz" else "alive"
                    body = json.dumps({key: ok, **details}).encode()
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

        self._handler = Handler
        self.max_connections, self.timeout_s = max_connections, timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family,
                                              backlog=max(128, max_connections))
        self._listener.setblocking(False)
        self.server_address = self._listener.getsockname()[:2]
        self.port = self.server_address[1]
        self._selector = selectors.DefaultSelector()
        self._waiting: OrderedDict[socket.socket, tuple[float, bytearray, tuple]] = OrderedDict()
        self._requests: queue.Queue = queue.Queue(maxsize=threads)
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._threads = [threading.Thread(target=self._accept_and_read, name="health-http",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._answer, name=f"health-http-{i}",
                                           daemon=True) for i in range(threads)]

    def start(self) -> "HealthServer":
        for t in self._threads:
            t.start()
        log.info("metrics and health on http://%s:%d/metrics", *self.server_address)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake_w.send(b"x")
        for _ in self._threads[1:]:
            self._requests.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(self.timeout_s + 1)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # --- the acceptor: connections wait here, without a thread, until their head is in ---

    def _accept_and_read(self) -> None:
        sel = self._selector
        sel.register(self._listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=0.25):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "read":
                        self._read(key.fileobj)
                self._expire(time.monotonic())
        finally:
            for conn in list(self._waiting):
                self._drop(conn)
            sel.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors: make room, or wait for some
                log.debug("health server cannot accept: %r", e)
                if self._waiting:
                    self._drop(next(iter(self._waiting)))
                else:
                    self._stopping.wait(0.05)
                return
            if len(self._waiting) >= self.max_connections:
                self._drop(next(iter(self._waiting)))  # the oldest
            conn.setblocking(False)
            self._waiting[conn] = (time.monotonic() + self.timeout_s, bytearray(), addr)
            self._selector.register(conn, selectors.EVENT_READ, "read")

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        _, head, addr = self._waiting[conn]
        head += data
        if b"\r\n\r\n" in head or b"\n\n" in head:
            self._selector.unregister(conn)
            del self._waiting[conn]
            try:
                self._requests.put_nowait((conn, bytes(head), addr))
            except queue.Full:  # every answering thread is busy and as many wait: refuse
                conn.close()
        elif len(head) > self.MAX_HEAD_BYTES:
            self._drop(conn)

    def _expire(self, now: float) -> None:
        while self._waiting:
            conn, (deadline, _, _) = next(iter(self._waiting.items()))
            if deadline > now:
                return
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self._waiting.pop(conn, None)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    # --- the answering threads -------------------------------------------------------------

    def _answer(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            conn, head, addr = item
            try:
                conn.setblocking(True)
                conn.settimeout(self.timeout_s)
                self._handler((conn, head), addr, self)
            except Exception as e:  # noqa: BLE001 - a client that went away, or too slow
                log.debug("health request from %s failed: %r", addr, e)
            finally:
                conn.close()
