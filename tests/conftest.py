"""Shared fixtures: a small BBC model trained in seconds, reused by every tier of tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from model.train import TrainConfig, train

TINY = dict(limit=60, min_freq=2, embed_dim=32, hidden_size=32, bag_units=9, num_layers=1, dropout=0.1,
            epochs=8, patience=8, batch_size=16, lr=1e-2, max_train_tokens=120, threads=1, quiet=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 5-class BBC model trained on 60 docs per label (about 10 s on 2 cores)."""
    out = tmp_path_factory.mktemp("tiny-gru")
    summary = train(TrainConfig(**TINY), out)
    (out / "summary.json").write_text(json.dumps(summary, default=str))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory) -> Path:
    """Another tiny model (seed 1: another split, vocab and weights, so another model_id),
    the new model of the rollout tests."""
    out = tmp_path_factory.mktemp("tiny-gru-b")
    train(TrainConfig(**{**TINY, "seed": 1}), out)
    return out


# Every broker-backed test runs with each client; TEST_KAFKA_CLIENTS=kafka-python (or
# confluent) narrows a local run to one of them. CI runs both.
KAFKA_CLIENTS = os.environ.get("TEST_KAFKA_CLIENTS", "kafka-python,confluent").split(",")


@pytest.fixture(params=KAFKA_CLIENTS)
def kafka_client(request) -> str:
    """The worker's Kafka client (``kafka.client``): a test that asks for it runs once with
    each. A test of one client's own workaround pins it with
    ``@pytest.mark.parametrize("kafka_client", ["kafka-python"])``."""
    if request.param == "confluent":
        pytest.importorskip("confluent_kafka")
    return request.param
