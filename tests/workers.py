"""The worker wired to in-memory fakes, and the helpers the tier-2 tests share: build a
``Worker`` from a trained classifier, publish to the fake input topic, read predictions."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from worker.codec import decode_state
from worker.config import Settings
from worker.engine import Engine
from worker.loop import Worker
from worker.metrics import Metrics
from worker.models import ModelSet, ServedModel
from worker.output import OutputPolicy

from .fakes import FakeSink, FakeSource

IN, OUT, DLQ = "tokens", "predictions", "tokens.dlq"


def make_worker(clf, log, store, sink=None, source=None, **settings):
    """Batches take up to ``batch.max_records`` unless a test turns the latency budget on
    (its limits follow measured times, so batch boundaries would depend on the machine), and
    every batch is committed once settled unless a test sets a commit interval."""
    settings["batch"] = {"target_latency_ms": 0, **settings.get("batch", {})}
    settings["kafka"] = {"commit_interval_ms": 0, **settings.get("kafka", {})}
    s = Settings(idle_exit_s=0.05, **settings)
    engine = Engine(clf.model, ttl_ms=s.state.ttl_seconds * 1000,
                    end_ttl_ms=s.state.end_ttl_seconds * 1000,
                    output=OutputPolicy(s.output.emit, s.output.min_confidence),
                    model_id=clf.model_id)
    metrics = Metrics(CollectorRegistry())
    metrics.add_model(clf.model_id, clf.labels, clf.label_prior, "cpu", "current")
    models = ModelSet(ServedModel(clf.model_id, engine, tuple(clf.labels), clf.encode,
                                  len(clf.vocab), tuple(clf.vocab.itos)), None, s.limits, metrics)
    return Worker(s, models, store, source or FakeSource(log, IN), sink or FakeSink(log), metrics)


def publish(log, pairs):
    for key, value in pairs:
        log.append(IN, key, value)


def predictions(log):
    return [json.loads(v) for v in log.values(OUT)]


def final_by_session(preds):
    last = {}
    for p in preds:
        if p["session_id"] not in last or p["seq"] >= last[p["session_id"]]["seq"]:
            last[p["session_id"]] = p
    return last


def assert_matches_offline(clf, sessions, preds, store=None):
    last = final_by_session(preds)
    for s in sessions:
        want = clf.classify(s.tokens)
        got = last[s.session_id]
        assert got["tokens_seen"] == len(s.tokens)
        assert max(abs(got["probs"][l] - want[l]) for l in want) <= 1e-5, s.session_id
        if store is not None:
            raw = store.load([s.session_id])[0]
            st = decode_state(raw, 1, clf.model.config.state_size, len(clf.labels))
            assert st.tokens_seen == len(s.tokens)


