"""The worker wired to in-memory fakes, and the helpers the tier-2 tests share: build a
``Worker`` from a trained classifier, publish to the fake input topic, read predictions."""

from __future__ import annotations

import dataclasses
import json

from prometheus_client import CollectorRegistry

from worker.codec import decode_state
from worker.config import Settings
from worker.app import build_engine
from worker.loop import Worker
from worker.metrics import Metrics
from worker.models import ModelSet, ServedModel
from worker.state import MemoryStateStore

from .fakes import FakeSink, FakeSource
from .streams import assert_exact

IN, OUT, DLQ = "tokens", "predictions", "tokens.dlq"


def make_worker(clf, log, store, sink=None, source=None, clock=None, **settings):
    """Batches take up to ``batch.max_records`` unless a test turns the latency budget on
    (its limits follow measured times, so batch boundaries would depend on the machine), and
    every batch is committed once settled unless a test sets a commit interval."""
    settings["batch"] = {"target_latency_ms": 0, **settings.get("batch", {})}
    settings["kafka"] = {"commit_interval_ms": 0, **settings.get("kafka", {})}
    s = Settings(**{"idle_exit_s": 0.05, **settings})
    engine = build_engine(s, clf, "cpu")  # as the worker builds it from its settings
    metrics = Metrics(CollectorRegistry())
    metrics.add_model(clf.model_id, clf.labels, clf.label_prior, "cpu", "current")
    models = ModelSet(ServedModel(clf.model_id, engine, tuple(clf.labels), clf.encode,
                                  len(clf.vocab), tuple(clf.vocab.itos),
                                  tenants=s.limits.tenant_header is not None),
                      None, s.limits, metrics)
    return Worker(s, models, store, source or FakeSource(log, IN), sink or FakeSink(log), metrics,
                  *([clock] if clock else []))


def publish(log, pairs):
    for key, value in pairs:
        log.append(IN, key, value)


def predictions(log):
    return [json.loads(v) for v in log.values(OUT)]


def assert_matches_offline(clf, sessions, preds, store=None):
    """``assert_exact``, and each session's state in ``store`` has seen all its tokens."""
    assert_exact(clf, sessions, preds)
    if store is not None:
        for s in sessions:
            raw = store.load([s.session_id])[0]
            st = decode_state(raw, 1, clf.model.config.state_size, len(clf.labels))
            assert st.tokens_seen == len(s.tokens), s.session_id


class ModelKeyed:
    """A worker's view of a shared MemoryStateStore in which "the current model" (None) is
    that worker's model id, as ``state.Keys`` makes it for Redis: two workers on two models
    then see each other's namespaces as they would in Redis."""

    def __init__(self, store: MemoryStateStore, model_id: str) -> None:
        self.inner, self.model_id = store, model_id

    def _ids(self, models):
        return [self.model_id if m is None else m for m in models]

    def claim(self, partitions):
        return self.inner.claim(partitions)

    def load(self, session_ids, partitions=None, models=(None,)):
        return self.inner.load(session_ids, partitions, self._ids(models))

    def store(self, marks, writes):
        return self.inner.store(marks, [dataclasses.replace(w, model=w.model or self.model_id)
                                        for w in writes])

    def count_sessions(self, models):
        counts = self.inner.count_sessions(self._ids(models))
        return {m: counts[i] for m, i in zip(models, self._ids(models))}

    def ping(self):
        return True


def rollout_worker(new, old, log, store, source=None, clock=None, **settings):
    """A worker serving ``new``, with ``old`` as the previous model (as app.build_worker
    wires ``--model-dir NEW --previous-model-dir OLD``)."""
    s = Settings(**{"idle_exit_s": 0.05, **settings})
    metrics = Metrics(CollectorRegistry())
    metrics.add_model(new.model_id, new.labels, new.label_prior, "cpu", "current")
    metrics.add_model(old.model_id, old.labels, old.label_prior, "cpu", "previous")
    engine = lambda c: build_engine(s, c, "cpu")  # noqa: E731
    previous = ServedModel(old.model_id, engine(old), tuple(old.labels), old.encode,
                           len(old.vocab), tuple(old.vocab.itos))
    current = ServedModel(new.model_id, engine(new), tuple(new.labels), new.encode,
                          len(new.vocab), tuple(new.vocab.itos))
    return Worker(s, ModelSet(current, previous, s.limits, metrics),
                  ModelKeyed(store, new.model_id), source or FakeSource(log, IN), FakeSink(log),
                  metrics, *([clock] if clock else []))
