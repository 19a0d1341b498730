"""Tier 1: the pieces that make health mean something, alone: which dependency failures are
permanent (worker/failures.py), each dependency's own state and the loop's progress
(worker/health.py), over a fake clock and a fresh registry."""

from __future__ import annotations

import logging
import socket
import ssl

import pytest
import redis.exceptions as rex
from kafka import errors as kerr
from prometheus_client import CollectorRegistry

from worker.errors import DependencyError
from worker.failures import (
    PermanentFailure,
    classify,
    is_permanent,
    redis_address,
    split_host_port,
    unresolvable_hosts,
)
from worker.health import DependencyHealth, Progress, ready_gauge, watched
from worker.metrics import Metrics

pytestmark = pytest.mark.unit


class StepClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def wrapped(error: BaseException, dependency: str = "redis") -> DependencyError:
    """As the adapters raise it: ``DependencyError(...) from`` the client's error."""
    try:
        try:
            raise error
        except BaseException as e:
            raise DependencyError(dependency, f"call failed: {e!r}") from e
    except DependencyError as d:
        return d


def gaierror(code: int) -> socket.gaierror:
    return socket.gaierror(code, "name lookup")


def redis_conn_error(cause: BaseException) -> rex.ConnectionError:
    """redis-py's ConnectionError with the OSError it keeps as its cause."""
    try:
        try:
            raise cause
        except OSError as e:
            raise rex.ConnectionError(f"Error connecting: {e}") from e
    except rex.ConnectionError as c:
        return c


# --- permanent or transient ----------------------------------------------------------------

@pytest.mark.parametrize("error, permanent, reason", [
    (rex.AuthenticationError("invalid username-password pair"), True, "authentication failed"),
    (rex.AuthenticationWrongNumberOfArgsError("wrong number"), True, "authentication failed"),
    (rex.AuthorizationError("no permission"), True, "not authorized (ACL)"),
    (rex.NoPermissionError("NOPERM this user has no permissions"), True, "not authorized (ACL)"),
    (redis_conn_error(gaierror(socket.EAI_NONAME)), True, "unknown host"),
    (redis_conn_error(gaierror(socket.EAI_AGAIN)), False, "name resolution failed (temporarily)"),
    (redis_conn_error(ConnectionRefusedError(111, "Connection refused")), False, "unavailable"),
    (rex.TimeoutError("Timeout reading from socket"), False, "unavailable"),
    (rex.BusyLoadingError("LOADING"), False, "unavailable"),
    (redis_conn_error(ssl.SSLCertVerificationError(1, "certificate verify failed")), True,
     "TLS certificate rejected"),
    (kerr.SaslAuthenticationFailedError("bad creds"), True, "authentication failed"),
    (kerr.TopicAuthorizationFailedError(), True,
     "not authorized (TopicAuthorizationFailedError)"),
    (kerr.GroupAuthorizationFailedError(), True,
     "not authorized (GroupAuthorizationFailedError)"),
    (kerr.KafkaConnectionError("unable to connect: refused"), False, "unavailable"),
    (kerr.KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:1']"), False, "unavailable"),
    (kerr.RequestTimedOutError(), False, "unavailable"),
    (ValueError("not a client error"), False, "unavailable"),
])
def test_classify_through_the_adapters_wrapping(error, permanent, reason):
    for e in (error, wrapped(error)):
        verdict = classify(e)
        assert (verdict.permanent, verdict.reason) == (permanent, reason)


def test_a_kafka_bootstrap_failure_is_permanent_only_for_a_host_that_does_not_exist():
    dns = kerr.KafkaConnectionError("DNS Resolution failure")
    assert is_permanent(dns, ["kafka.invalid:9092"])
    assert classify(dns, ["kafka.invalid:9092"]).reason == "unknown host kafka.invalid"
    assert not is_permanent(dns, ["127.0.0.1:9092"])  # resolves: it may come back

    class NoBrokersAvailable(kerr.KafkaError):  # the name older kafka-python raises
        __module__ = "kafka.errors"
    assert is_permanent(NoBrokersAvailable(), ["kafka.invalid:9092"])
    assert not is_permanent(NoBrokersAvailable(), ["localhost:9092"])


def test_librdkafka_errors_are_classified_by_name():
    class FakeKafkaError:
        def __init__(self, name: str, fatal: bool = False) -> None:
            self._name, self._fatal = name, fatal

        def name(self) -> str:
            return self._name

        def fatal(self) -> bool:
            return self._fatal

    KafkaException = type("KafkaException", (Exception,), {"__module__": "cimpl"})
    assert classify(KafkaException(FakeKafkaError("_AUTHENTICATION"))).reason == \
        "authentication failed"
    assert classify(KafkaException(FakeKafkaError("TOPIC_AUTHORIZATION_FAILED"))).permanent
    assert not classify(KafkaException(FakeKafkaError("_TRANSPORT"))).permanent
    assert classify(KafkaException(FakeKafkaError("_FENCED", fatal=True))).permanent


def test_addresses_never_carry_a_secret():
    assert redis_address("redis://:s3cret@cache:6380/2") == "cache:6380/2"
    assert redis_address("rediss://user:pw@cache") == "cache:6379/0"
    assert split_host_port("[::1]:9092") == ("::1", 9092)
    assert split_host_port("kafka:9092") == ("kafka", 9092)
    assert unresolvable_hosts(["localhost:1", "nothing.invalid:1"]) == ["nothing.invalid"]
    line = str(PermanentFailure("redis", "cache:6380/2", "authentication failed",
                                "GRU_REDIS__PASSWORD", rex.AuthenticationError("WRONGPASS")))
    assert line == ("redis at cache:6380/2: authentication failed: AuthenticationError: "
                    "WRONGPASS; check GRU_REDIS__PASSWORD")


# --- each dependency's own state -----------------------------------------------------------

def test_a_dependency_goes_down_once_and_comes_back_with_how_long(caplog):
    clock = StepClock()
    m = Metrics(CollectorRegistry())
    h = DependencyHealth(m, clock, addresses={"redis": "cache:6379/0"})
    up = lambda d: m.registry.get_sample_value("gru_dependency_up", {"dependency": d})
    assert (up("redis"), up("kafka")) == (1.0, 1.0) and h.all_up()
    h.ok("redis")
    with caplog.at_level(logging.WARNING, logger="worker.health"):
        h.failed("redis", wrapped(ConnectionRefusedError(111, "refused")))
        clock.now += 10
        h.failed("redis", wrapped(ConnectionRefusedError(111, "refused")))
        assert up("redis") == 0.0 and not h.all_up() and h.down_for("redis") == 10.0
        ready = h.readiness()
        assert ready["kafka"] == {"up": True} and ready["redis"]["up"] is False
        assert ready["redis"]["failures"] == 2 and ready["redis"]["down_for_s"] == 10.0
        clock.now += 21.5
        h.ok("redis")
        h.ok("redis")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # one when it went down, one when it came back
    assert lines[0].startswith("redis at cache:6379/0 is down: DependencyError: redis: call failed")
    assert lines[1].startswith("redis at cache:6379/0 is back after 31.5s down (2 failed calls; "
                               "last error: DependencyError: redis: ")
    assert up("redis") == 1.0 and h.down_for("redis") is None and h.state("redis").failures == 0


def test_watched_ports_report_to_the_dependency_health():
    clock = StepClock()
    h = DependencyHealth(None, clock)

    class Store:
        fail = False

        def load(self, x):
            if self.fail:
                raise DependencyError("redis", "load failed")
            return [x]

        def close(self):
            raise AssertionError("close is passed through untouched")

    class Sink:
        def send(self, messages):
            return "sending"

        def wait(self, sending):
            raise DependencyError("kafka", "not acknowledged")

    store, raw = watched(Store(), "redis", h), None
    assert store.load(1) == [1] and h.state("redis").last_ok == clock.now
    store._port.fail = True
    with pytest.raises(DependencyError):
        store.load(1)
    assert not h.state("redis").up
    store._port.fail = False
    store.load(2)
    assert h.state("redis").up
    sink = watched(Sink(), "kafka", h, successes=("wait",))
    with pytest.raises(DependencyError):
        sink.wait(sink.send([]))
    assert not h.state("kafka").up
    sink.send([])  # a send only buffers: not a sign that Kafka is back
    assert not h.state("kafka").up
    del raw


# --- progress ------------------------------------------------------------------------------

def test_progress_is_unhealthy_only_when_holding_partitions_with_input_waiting():
    clock = StepClock()
    m = Metrics(CollectorRegistry())
    p = Progress(stall_after_s=60, clock=clock, metrics=m)
    stamp = lambda part: m.registry.get_sample_value(
        "gru_partition_progress_timestamp_seconds", {"topic": "in", "partition": part})
    assert p.healthy()[0]
    clock.now += 1000
    assert p.healthy()[0]  # holds nothing: idle is healthy however long
    p.assigned([("in", 0), ("in", 1)])
    assert stamp("0") == clock.time()  # a claim is progress
    p.input_waiting(0)
    clock.now += 1000
    assert p.healthy()[0]  # holds partitions, nothing waiting: idle
    p.input_waiting(5)  # input arrives: the stall clock starts now, not at the last progress
    clock.now += 59
    assert p.healthy()[0]
    clock.now += 2
    ok, details = p.healthy()
    assert not ok and details == {"partitions": 2, "input_waiting": True,
                                  "no_progress_for_s": 61.0, "stall_after_s": 60}
    p.advanced([("in", 1)])
    assert p.healthy()[0] and stamp("1") == clock.time() and stamp("0") < stamp("1")
    clock.now += 61
    assert not p.healthy()[0] and p.stalled_for() == 61.0
    p.input_waiting(None)  # unknown changes nothing
    assert not p.healthy()[0]
    p.released([("in", 0), ("in", 1)])
    assert p.healthy()[0] and stamp("0") is None and stamp("1") is None


def test_the_ready_gauge_never_fails_a_scrape():
    assert ready_gauge(lambda: (True, {}))() == 1.0
    assert ready_gauge(lambda: (False, {}))() == 0.0

    def broken():
        raise RuntimeError("dictionary changed size during iteration")
    assert ready_gauge(broken)() == 0.0
