"""The fixtures several test modules share, registered once by ``pytest_plugins`` in
tests/conftest.py: the tiny models (tier 1 and 2), the Kafka client to test with, and the real
services of tier 3 (a tansu broker per module, unique names on the shared Redis, a Redis
Cluster for the session). A fixture only one module uses stays in that module."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import redis

import model
from devtools.services import Tansu
from model.train import TrainConfig, train

from .services_support import REDIS_URL, RedisCluster

# The tiny model's recipe: 60 docs per label, small layers, a few epochs.
TINY = dict(limit=60, min_freq=2, embed_dim=32, hidden_size=32, bag_units=9, num_layers=1, dropout=0.1,
            epochs=8, patience=8, batch_size=16, lr=1e-2, max_train_tokens=120, threads=1, quiet=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 5-class BBC model trained on 60 docs per label (a few seconds on 2 cores)."""
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


@pytest.fixture(scope="module")
def clf(tiny_model_dir):
    """The tiny model, loaded."""
    return model.load(tiny_model_dir)


@pytest.fixture(scope="module")
def clf_b(tiny_model_dir_b):
    """The other tiny model, loaded (another model_id than ``clf``)."""
    return model.load(tiny_model_dir_b)


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


# --- tier 3: real services (a test that takes one of these is marked ``services``) -------

@pytest.fixture(scope="module")
def broker():
    """A tansu broker of the module's own (topics are per test: see ``names``)."""
    with Tansu() as t:
        yield t


@pytest.fixture
def names(kafka_client):
    """Unique topics, group and Redis prefix per test; the prefix's keys are removed after.
    ``client``: the worker's Kafka client (``settings_for`` and the CLI tests pass it on), so
    every test that takes ``names`` runs with each client."""
    tag = uuid.uuid4().hex[:8]
    n = {"in": f"in-{tag}", "out": f"out-{tag}", "dlq": f"dlq-{tag}", "group": f"g-{tag}",
         "prefix": f"test-{tag}", "client": kafka_client}
    yield n
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{n['prefix']}:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def redis_cluster():
    """A 3-node Redis Cluster on loopback, one for the whole session."""
    c = RedisCluster(3).start()
    try:
        yield c
    finally:
        c.close()


# The fixtures above that start or reach a real service: tests/conftest.py checks that every
# test that takes one is marked ``services``.
SERVICE_FIXTURES = frozenset({"broker", "names", "redis_cluster"})
