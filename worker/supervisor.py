"""``python -m worker run --processes N``: N worker processes in one consumer group.

Each child is a plain ``python -m worker run`` with the same flags; child i serves its
metrics on ``port + i`` (or a free port when the port is 0). SIGTERM/SIGINT are passed on
and the supervisor waits for every child to finish its batch and commit. A child that dies
with an error is restarted with backoff; one that exits 0 (a bounded run) is not; one that
refuses to start (exit code 2: a setting or a dependency that will not heal) stops them all,
and the supervisor exits 2 too.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

REFUSED = 2  # a child's exit code when its settings or dependencies cannot work (__main__)


def child_argv(argv: Sequence[str], index: int, base_port: int) -> list[str]:
    """The child's command line: ``--processes`` dropped, ``--metrics-port`` set to base + i."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("--processes", "--metrics-port"):
            skip = True
            continue
        if a.startswith(("--processes=", "--metrics-port=")):
            continue
        out.append(a)
    port = base_port + index if base_port else 0
    return [sys.executable, "-m", "worker", *out, "--metrics-port", str(port)]


def supervise(argv: Sequence[str], processes: int, base_port: int,
              restart_backoff_s: float = 1.0) -> int:
    children: list[subprocess.Popen | None] = [None] * processes
    failures = [0] * processes
    stopping = False

    def start(i: int) -> None:
        cmd = child_argv(argv, i, base_port)
        children[i] = subprocess.Popen(cmd)
        log.info("started worker %d (pid %d): %s", i, children[i].pid, " ".join(cmd[2:]))

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            if c is not None and c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(processes):
        start(i)
    codes: dict[int, int] = {}
    while len(codes) < processes:
        for i, c in enumerate(children):
            if i in codes or c is None or c.poll() is None:
                continue
            if c.returncode == 0 or stopping:
                codes[i] = c.returncode
                continue
            if c.returncode == REFUSED:
                # A setting or a dependency that will not heal (its one line is above):
                # restarting would loop for ever here; stop all, so the orchestrator sees it.
                log.error("worker %d refused to start (exit code %d): stopping the others",
                          i, REFUSED)
                codes[i] = REFUSED
                on_signal(signal.SIGTERM, None)
                continue
            failures[i] += 1
            delay = min(30.0, restart_backoff_s * 2 ** (failures[i] - 1))
            log.error("worker %d exited with %d; restarting in %.1fs", i, c.returncode, delay)
            time.sleep(delay)
            if not stopping:
                start(i)
        time.sleep(0.1)
    log.info("all %d workers stopped: exit codes %s", processes, [codes[i] for i in range(processes)])
    if REFUSED in codes.values():  # the others were stopped for it, by a signal maybe
        return REFUSED
    return max((abs(c) for c in codes.values()), default=0)
