"""Start-up refuses what cannot work with one line naming the setting, and exit code 2: a
bad setting (env var or flag), a metrics port in use (before the model loads), a bad model
dir, an unreachable or unknown Kafka, a missing topic, a wrong Redis password, an unknown
Redis host. Each runs ``python -m worker run`` as an operator would and reads its stderr."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.launcher import TEST_GROUP_TIMEOUTS
from devtools.services import RedisServer, free_port, unique_names

ROOT = Path(__file__).resolve().parents[1]


def run_worker(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
               command: str = "run") -> tuple[int, list[str], float]:
    """``python -m worker run ARGS`` with only ``env``'s GRU_* variables: (exit code, stderr
    lines, seconds it took)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRU_")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "worker", command, *args], cwd=ROOT,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stderr.splitlines(), time.monotonic() - t0


def the_error(lines: list[str]) -> str:
    """The one ``error:`` line of a refused start (other lines may be the log before it)."""
    assert not any("Traceback" in l for l in lines), "\n".join(lines)
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1, "\n".join(lines)
    return errors[0]


# --- settings that cannot be right: refused before anything is loaded or contacted ----------

@pytest.mark.unit
@pytest.mark.heavy
@pytest.mark.parametrize("env, args, line", [
    ({"GRU_BATCH__MAX_RECORDS": "abc"}, [],
     "error: GRU_BATCH__MAX_RECORDS (--batch-size): must be an integer, got 'abc'"),
    ({"GRU_OUTPUT__EMIT": "sometimes"}, [],
     "error: GRU_OUTPUT__EMIT (--emit): must be one of 'every', 'change' or 'final', "
     "got 'sometimes'"),
    ({"GRU_STATE__END_TTL_SECONDS": "5"}, [],
     "error: GRU_STATE__END_TTL_SECONDS: must be at least 60, got '5'"),
    ({}, ["--batch-size", "abc"],
     "error: --batch-size (GRU_BATCH__MAX_RECORDS): must be an integer, got 'abc'"),
    ({}, ["--device", "tpu"],
     "error: --device (GRU_MODEL__DEVICE): must be one of 'cpu', 'cuda' or 'auto', got 'tpu'"),
    ({"GRU_KAFKA__SESSION_TIMEOUT_MS": "6000"}, ["--heartbeat-interval-ms", "3000"],
     "error: GRU_KAFKA__HEARTBEAT_INTERVAL_MS (--heartbeat-interval-ms) 3000 must be at most a "
     "third of GRU_KAFKA__SESSION_TIMEOUT_MS (--session-timeout-ms) 6000"),
    ({}, ["--metrics-prot", "1"],
     "error: unrecognized arguments: --metrics-prot 1 (see python -m worker --help)"),
])
def test_a_bad_setting_is_refused_with_one_line_naming_it(env, args, line):
    code, lines, _ = run_worker("--model-dir", "/nonexistent", *args, env=env)
    assert code == 2 and lines == [line], lines


@pytest.mark.unit
@pytest.mark.heavy
def test_a_bad_setting_is_one_json_line_when_json_logs_are_asked_for():
    code, lines, _ = run_worker(env={"GRU_LOG_FORMAT": "json", "GRU_BATCH__MAX_RECORDS": "abc"})
    assert code == 2 and len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["level"] == "CRITICAL" and record["message"] == (
        "GRU_BATCH__MAX_RECORDS (--batch-size): must be an integer, got 'abc'")


@pytest.mark.unit
@pytest.mark.heavy
def test_a_metrics_port_in_use_is_named_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model dir that does not exist: the port must be refused first.
        code, lines, _ = run_worker("--model-dir", "/nonexistent", "--metrics-host", "127.0.0.1",
                                    "--metrics-port", str(port))
    assert code == 2
    assert the_error(lines) == (f"error: metrics port {port} on 127.0.0.1 is in use "
                                f"(GRU_METRICS__PORT / --metrics-port); pick another, or 0 for "
                                f"any free port")


@pytest.mark.unit
@pytest.mark.heavy
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
    code, lines, _ = run_worker("--model-dir", str(target), "--metrics-port", "0",
                                "--bootstrap", "127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0")
    assert code == 2, lines
    line = the_error(lines)
    assert "cannot load the model" in line and reason in line and str(target) in line
    assert "--model-dir / GRU_MODEL__DIR" in line


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
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


# --- the dependencies, checked before the group is joined -------------------------------------

def model_args(model_dir: Path, *more: str) -> list[str]:
    return ["--model-dir", str(model_dir), "--metrics-host", "127.0.0.1", "--metrics-port", "0",
            "--log-level", "WARNING", *more]


@pytest.mark.unit
@pytest.mark.heavy
def test_an_unreachable_bootstrap_server_fails_in_bounded_time_naming_it(tiny_model_dir):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    code, lines, took = run_worker(*model_args(tiny_model_dir, "--bootstrap", dead,
                                               "--redis-url", "memory"),
                                   env={"GRU_STARTUP_TIMEOUT_S": "3"})
    assert code == 2 and took < 20, (took, lines)
    assert the_error(lines).startswith(
        f"error: kafka at {dead}: no broker answered within 3s (GRU_STARTUP_TIMEOUT_S)")
    assert the_error(lines).endswith(
        "check GRU_KAFKA__BOOTSTRAP_SERVERS (--bootstrap) and that Kafka is up")


@pytest.mark.unit
@pytest.mark.heavy
def test_an_unknown_bootstrap_host_fails_at_once(tiny_model_dir):
    code, lines, took = run_worker(*model_args(tiny_model_dir, "--bootstrap",
                                               "kafka.invalid:9092", "--redis-url", "memory"),
                                   env={"GRU_STARTUP_TIMEOUT_S": "60"})
    assert code == 2 and took < 30, (took, lines)
    assert the_error(lines) == ("error: kafka at kafka.invalid:9092: unknown host kafka.invalid; "
                                "check GRU_KAFKA__BOOTSTRAP_SERVERS (--bootstrap)")


@pytest.mark.services
@pytest.mark.heavy
def test_a_missing_input_topic_is_refused_naming_it(broker, tiny_model_dir):
    names = unique_names()
    broker.create_topics([names["out"], names["dlq"]], partitions=1)
    code, lines, _ = run_worker(*model_args(tiny_model_dir, "--bootstrap", broker.bootstrap,
                                            "--redis-url", "memory", "--input-topic", names["in"],
                                            "--output-topic", names["out"]),
                                env={"GRU_KAFKA__DLQ_TOPIC": names["dlq"]})
    assert code == 2
    assert the_error(lines) == (
        f"error: kafka at {broker.bootstrap} has no topic input {names['in']!r} "
        f"(GRU_KAFKA__INPUT_TOPIC / --input-topic): create it (python -m worker topics create), "
        f"or set GRU_KAFKA__CREATE_TOPICS=true")
    assert names["in"] not in set(broker.admin().list_topics())  # and nothing created it


@pytest.mark.services
@pytest.mark.heavy
def test_missing_topics_are_created_when_asked(broker, tiny_model_dir):
    names = unique_names()
    code, lines, _ = run_worker(*model_args(tiny_model_dir, "--bootstrap", broker.bootstrap,
                                            "--redis-url", "memory", "--input-topic", names["in"],
                                            "--output-topic", names["out"], "--group",
                                            names["group"], "--idle-exit", "0.5",
                                            *TEST_GROUP_TIMEOUTS),
                                env={"GRU_KAFKA__DLQ_TOPIC": names["dlq"],
                                     "GRU_KAFKA__CREATE_TOPICS": "true",
                                     "GRU_KAFKA__PARTITIONS": "2"})
    assert code == 0, lines
    admin = broker.admin()
    try:
        meta = {t["name"]: len(t["partitions"])
                for t in admin.describe_topics([names["in"], names["out"], names["dlq"]])}
    finally:
        admin.close()
    assert meta == {names["in"]: 2, names["out"]: 2, names["dlq"]: 2}


@pytest.fixture(scope="module")
def redis_with_a_user():
    """A redis-server with an ACL user ``gru`` (password ``right``); the default user stays
    open, so the service's own readiness probe works."""
    with RedisServer(extra_args=["--user", "gru", "on", ">right", "~*", "&*", "+@all"]) as r:
        yield r


@pytest.mark.services
@pytest.mark.heavy
def test_a_wrong_redis_password_is_refused_at_once_naming_the_address(broker, tiny_model_dir,
                                                                       redis_with_a_user):
    url = f"redis://127.0.0.1:{redis_with_a_user.port}/0"
    code, lines, took = run_worker(*model_args(tiny_model_dir, "--bootstrap", broker.bootstrap,
                                               "--redis-url", url),
                                   env={"GRU_REDIS__USERNAME": "gru",
                                        "GRU_REDIS__PASSWORD": "wrong",
                                        "GRU_STARTUP_TIMEOUT_S": "60"})
    assert code == 2 and took < 30, (took, lines)
    line = the_error(lines)
    assert line.startswith(f"error: redis at 127.0.0.1:{redis_with_a_user.port}/0: "
                           f"authentication failed (AuthenticationError: "), line
    assert line.endswith("check GRU_REDIS__USERNAME and GRU_REDIS__PASSWORD (or the URL's)")
    assert "wrong" not in line


@pytest.mark.services
@pytest.mark.heavy
def test_an_unknown_redis_host_is_refused_at_once(broker, tiny_model_dir):
    code, lines, took = run_worker(*model_args(tiny_model_dir, "--bootstrap", broker.bootstrap,
                                               "--redis-url", "redis://:pw@redis.invalid:6379/0"),
                                   env={"GRU_STARTUP_TIMEOUT_S": "60"})
    assert code == 2 and took < 30, (took, lines)
    line = the_error(lines)
    assert line.startswith("error: redis at redis.invalid:6379/0: unknown host"), line
    assert line.endswith("check GRU_REDIS__URL (--redis-url)") and ":pw@" not in line


@pytest.mark.services
@pytest.mark.heavy
def test_a_refused_redis_is_waited_for_then_named(broker, tiny_model_dir):
    port = free_port()
    code, lines, took = run_worker(*model_args(tiny_model_dir, "--bootstrap", broker.bootstrap,
                                               "--redis-url", f"redis://127.0.0.1:{port}/0"),
                                   env={"GRU_STARTUP_TIMEOUT_S": "2"})
    assert code == 2 and took < 20, (took, lines)
    assert the_error(lines).startswith(f"error: redis at 127.0.0.1:{port}/0 did not answer "
                                       f"within 2s (GRU_STARTUP_TIMEOUT_S): ConnectionError: ")


@pytest.mark.services
@pytest.mark.heavy
def test_a_normal_start_logs_json_lines_without_client_chatter(broker, tiny_model_dir):
    """GRU_LOG_FORMAT=json: every stderr line is one JSON object; kafka-python's INFO lines
    (bootstrap, group join: most of a normal run's log) are not there by default."""
    names = unique_names()
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=1)
    code, lines, _ = run_worker("--model-dir", str(tiny_model_dir), "--metrics-port", "0",
                                "--bootstrap", broker.bootstrap, "--redis-url", "memory",
                                "--input-topic", names["in"], "--output-topic", names["out"],
                                "--group", names["group"], "--idle-exit", "0.5",
                                *TEST_GROUP_TIMEOUTS,
                                env={"GRU_KAFKA__DLQ_TOPIC": names["dlq"],
                                     "GRU_LOG_FORMAT": "json"})
    assert code == 0, lines
    records = [json.loads(l) for l in lines]
    assert records and all({"timestamp", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["message"].startswith("worker stopped:") for r in records)
    assert not [r for r in records if r["logger"].startswith("kafka") and r["level"] == "INFO"]


@pytest.mark.unit
@pytest.mark.heavy
def test_a_supervisor_whose_workers_refuse_to_start_exits_2_instead_of_restarting_them():
    code, lines, took = run_worker("--processes", "2", "--model-dir", "/nonexistent",
                                   "--metrics-port", "0", timeout=60)
    assert code == 2 and took < 45, (took, lines)
    errors = [l for l in lines if l.startswith("error:")]
    assert errors and all("cannot load the model" in l for l in errors), lines
    assert any("refused to start (exit code 2): stopping the others" in l for l in lines)
    assert not any("restarting in" in l for l in lines), lines


@pytest.mark.unit
@pytest.mark.heavy
def test_cuda_without_a_gpu_is_refused_naming_the_setting(tiny_model_dir):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    code, lines, _ = run_worker(*model_args(tiny_model_dir, "--device", "cuda"))
    assert code == 2
    assert the_error(lines) == ("error: GRU_MODEL__DEVICE (--device) is cuda, but torch sees no "
                                "CUDA device")
