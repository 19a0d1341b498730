"""Model-quality metrics (issue 16, part 2), tier 2: what the loop observes equals what the
model does offline; the artifact records its training prior, and an artifact without one
exposes no prior (the drift series are then absent, see deploy/prometheus/alerts.yml)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import model
from worker.metrics import Metrics
from worker.state import MemoryStateStore

from .fakes import FakeLog
from .streams import bbc_sessions, interleave
from .workers import make_worker, publish

pytestmark = pytest.mark.fakes


def test_the_artifact_records_its_training_prior(clf, tiny_model_dir):
    prior = clf.label_prior
    assert prior is not None and set(prior) == set(clf.labels)
    assert abs(sum(prior.values()) - 1) < 1e-9 and all(0 < p < 1 for p in prior.values())
    # An artifact written before the prior existed loads, without one.
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.pop("label_prior")
    assert model.artifact.Classifier(clf.model, clf.vocab, clf.labels, clf.model_id,
                                     config).label_prior is None


def test_quality_metrics_equal_the_model_offline(clf):
    log, store = FakeLog(partitions=2), MemoryStateStore()
    sessions = bbc_sessions(10, seed=70, max_chunk=15, max_tokens=150)
    pairs = interleave(sessions, seed=70, end=True)
    publish(log, pairs)
    w = make_worker(clf, log, store, batch={"max_records": 7})
    w.run()
    reg = w.metrics.registry
    mid = clf.model_id
    by_label: dict[tuple[str, str], int] = {}
    firsts, lengths = [], []
    for s in sessions:
        seen, first = [], {}
        for i, chunk in enumerate(s.chunks):
            seen += chunk
            probs = clf.classify(seen)
            label = max(probs, key=probs.get)
            first.setdefault(label, len(seen))
            final = "true" if i == len(s.chunks) - 1 else "false"
            by_label[(label, final)] = by_label.get((label, final), 0) + 1
        firsts.append(first[label])
        lengths.append(len(seen))
    for (label, final), n in by_label.items():
        assert reg.get_sample_value("gru_model_predictions_total", {
            "model_id": mid, "label": label, "final": final}) == n, (label, final)
    assert reg.get_sample_value("gru_prediction_confidence_count", {"model_id": mid}) == len(pairs)
    assert reg.get_sample_value("gru_tokens_to_final_label_count", {"model_id": mid}) == len(sessions)
    assert reg.get_sample_value("gru_tokens_to_final_label_sum", {"model_id": mid}) == sum(firsts)
    assert reg.get_sample_value("gru_session_length_tokens_sum", {"model_id": mid}) == sum(lengths)
    for label, share in clf.label_prior.items():
        assert reg.get_sample_value("gru_model_label_prior",
                                    {"model_id": mid, "label": label}) == pytest.approx(share)


def test_a_model_without_a_prior_exposes_no_prior_series():
    m = Metrics(CollectorRegistry())
    m.add_model("old", ["a", "b"], None, "cpu", "current")
    text = generate_latest(m.registry).decode()
    assert 'gru_model_info{device="cpu",model_id="old",role="current"} 1.0' in text
    assert "gru_model_label_prior{" not in text
