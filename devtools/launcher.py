"""One way to run ``python -m worker run`` as a child process: start it, wait until it is
ready, read its /metrics, signal it, stop it. The demo, the tests and the benchmarks all use
this class, so a change of the CLI is made here once.

    w = WorkerProcess(["--bootstrap", kafka.bootstrap, "--redis-url", url, ...]).start()
    w.wait_ready()
    w.metrics()['gru_messages_total{outcome="ok"}']
    w.terminate()  # SIGTERM, then the exit code
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .services import die_with_parent, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
TEST_GROUP_TIMEOUTS = ["--session-timeout-ms", "6000", "--heartbeat-interval-ms", "1000"]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{label="v",...}': value}`` (labels sorted), every sample."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:PORT/PATH; an HTTP error status is not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class WorkerProcess:
    """``python -m worker run ARGS`` (or another module's CLI with ``module=``) in its own
    process group, with its own metrics port and its output in a log file (a temporary one
    unless ``log_path`` is given; ``log=False`` discards it), pinned to ``cpus`` if given. ``env`` adds to a copy of this
    process's environment without its ``GRU_*`` variables."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None,
                 log_path: Path | None = None, port: int | None = None,
                 module: str = "worker", command: Sequence[str] = ("run",),
                 log: bool = True, cpus: set[int] | None = None) -> None:
        self.args, self.extra_env = list(args), dict(env or {})
        self.port = port or free_port()
        if log and log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="gru-worker-")) / "worker.log"
        self.log_path = log_path
        self.module, self.command = module, list(command)
        self.cpus = cpus  # CPU affinity of the process and every thread it starts
        self.proc: subprocess.Popen | None = None

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.command, *self.args,
                "--metrics-host", "127.0.0.1", "--metrics-port", str(self.port)]

    def start(self) -> "WorkerProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRU_")}
        env.update({"PYTHONUNBUFFERED": "1", **self.extra_env})
        out = subprocess.DEVNULL
        log = None
        if self.log_path is not None:
            log = open(self.log_path, "ab")
            log.write(f"\n=== start {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            out = log
        try:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=self._preexec())
        finally:
            if log is not None:
                log.close()
        return self

    def _preexec(self):
        own_group = die_with_parent(os.getpid())
        if self.cpus is None:
            return own_group
        cpus = set(self.cpus)

        def preexec() -> None:
            own_group()
            os.sched_setaffinity(0, cpus)
        return preexec

    # --- state ----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        return http_get(self.port, path, timeout)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics")[1])

    def outcome(self, name: str) -> float:
        return self.metrics().get(f'gru_messages_total{{outcome="{name}"}}', 0.0)

    def wait_ready(self, timeout: float = 60.0) -> "WorkerProcess":
        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"the worker exited with {self.proc.returncode if self.proc else None} "
                                   f"before it was ready:\n{self.log_tail()}")
            try:
                return self.get("/readyz", 1.0)[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout, 0.2, f"worker /readyz on port {self.port}")
        return self

    def log_text(self) -> str:
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    # --- signals --------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown work (after SIGCONT, in case it was stopped)."""
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self._collect(10)

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait for the exit code (the graceful path); SIGKILL after ``timeout``."""
        assert self.proc is not None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self._collect(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"the worker ignored SIGTERM for {timeout}s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float) -> int:
        return self._collect(timeout)

    def _collect(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def restart(self) -> "WorkerProcess":
        self.kill()
        return self.start()

    def __enter__(self) -> "WorkerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        if self.alive:
            with contextlib.suppress(Exception):
                self.terminate(15)
        if self.alive:
            self.kill()
