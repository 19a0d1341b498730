"""Worker startup refuses a bad model dir with a clear one-line error (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind, reason", [("missing", "is not a directory"),
                                          ("file", "is not a directory"),
                                          ("empty", "has no config.json")])
def test_worker_run_rejects_a_bad_model_dir(tmp_path, kind, reason):
    target = tmp_path / "model"
    if kind == "file":
        target.write_text("not a model")
    elif kind == "empty":
        target.mkdir()
    # Port 1 on localhost: nothing may be contacted before the model is checked.
    proc = subprocess.run([sys.executable, "-m", "worker", "run", "--model-dir", str(target),
                           "--bootstrap", "127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot load the model" in proc.stderr and reason in proc.stderr
    assert str(target) in proc.stderr and "Traceback" not in proc.stderr


def test_redis_tls_and_auth_settings_reach_the_client(monkeypatch):
    from worker.app import redis_client
    from worker.config import Settings

    for k, v in {"GRU_REDIS__URL": "rediss://cache.example:6380/0", "GRU_REDIS__USERNAME": "gru",
                 "GRU_REDIS__PASSWORD": "s3cret", "GRU_REDIS__SSL_CA_CERTS": "/etc/ca.pem",
                 "GRU_REDIS__SSL_CERTFILE": "/etc/client.pem",
                 "GRU_REDIS__SSL_KEYFILE": "/etc/client.key"}.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert "s3cret" not in repr(s)  # the password is a SecretStr
    kw = redis_client(s).connection_pool.connection_kwargs  # nothing is connected yet
    assert kw["username"] == "gru" and kw["password"] == "s3cret"
    assert (kw["ssl_ca_certs"], kw["ssl_certfile"], kw["ssl_keyfile"]) == (
        "/etc/ca.pem", "/etc/client.pem", "/etc/client.key")


def test_kafka_sasl_ssl_settings_reach_the_clients(monkeypatch):
    from worker.config import Settings

    for k, v in {"GRU_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "GRU_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
                 "GRU_KAFKA__SASL_PLAIN_USERNAME": "gru", "GRU_KAFKA__SASL_PLAIN_PASSWORD": "pw",
                 "GRU_KAFKA__SSL_CAFILE": "/etc/ca.pem"}.items():
        monkeypatch.setenv(k, v)
    opts = Settings().kafka.client_options()
    assert opts["security_protocol"] == "SASL_SSL" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "gru" and opts["sasl_plain_password"] == "pw"
    assert opts["ssl_cafile"] == "/etc/ca.pem"


def test_kafka_sasl_ssl_settings_reach_librdkafka_under_its_names(monkeypatch):
    """The same GRU_KAFKA__* settings configure confluent-kafka: every consumer, producer and
    admin client the confluent adapter makes starts from this mapping."""
    pytest.importorskip("confluent_kafka")
    from worker.config import Settings
    from worker.rdkafka_io import client_config, consumer_config, producer_config

    for k, v in {"GRU_KAFKA__CLIENT": "confluent", "GRU_KAFKA__BOOTSTRAP_SERVERS": "k1:9093,k2:9093",
                 "GRU_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
                 "GRU_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
                 "GRU_KAFKA__SASL_PLAIN_USERNAME": "gru", "GRU_KAFKA__SASL_PLAIN_PASSWORD": "pw",
                 "GRU_KAFKA__SSL_CAFILE": "/etc/ca.pem", "GRU_KAFKA__SSL_CERTFILE": "/etc/c.pem",
                 "GRU_KAFKA__SSL_KEYFILE": "/etc/c.key"}.items():
        monkeypatch.setenv(k, v)
    k = Settings().kafka
    assert k.client == "confluent"
    conf = client_config(k)
    assert conf == {"bootstrap.servers": "k1:9093,k2:9093", "client.id": "gru-worker",
                    "security.protocol": "sasl_ssl", "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": "gru", "sasl.password": "pw",
                    "ssl.ca.location": "/etc/ca.pem", "ssl.certificate.location": "/etc/c.pem",
                    "ssl.key.location": "/etc/c.key"}
    for full in (consumer_config(k), producer_config(k, 30.0)):
        assert conf.items() <= full.items()
    # librdkafka checks them when a client is made (nothing is contacted yet): a CA file that
    # is not there never heals, and ends the worker with one line naming the setting
    from worker.rdkafka_io import RdKafkaSink
    with pytest.raises(SystemExit, match="GRU_KAFKA__SSL_CAFILE"):
        RdKafkaSink(k)
    from worker.config import KafkaSettings
    plain = KafkaSettings(client="confluent")  # the defaults, not the environment
    assert client_config(plain) == {"bootstrap.servers": "127.0.0.1:9092",
                                    "client.id": "gru-worker", "security.protocol": "plaintext"}
