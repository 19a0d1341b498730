"""Fault injection a test asks for, kept out of the production package.

``python -m devtools.faults --crash-after-write N run ARGS`` runs the worker as
``python -m worker run ARGS`` does, with its state store wrapped so that the process dies by
SIGKILL right after the Nth write call that landed: that batch is written, but neither
produced nor committed (tests/test_faults.py, "crash after write").

``--crash-at-load N`` dies as the Nth load of states begins: batch N has been polled, and
batch N-1 is written and sent but not yet acknowledged nor committed (two batches in flight).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from worker.ports import (
    PartitionMark,
    StateStore,
    StateWrite,
    StoreResult,
    TopicPartition,
    WriteStatus,
)

log = logging.getLogger("devtools.faults")


def _die(what: str) -> None:
    log.critical("fault injection: SIGKILL %s", what)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


class CrashAfterWrite:
    """A StateStore that SIGKILLs its process after its ``after``-th write call that landed,
    or as its ``at_load``-th load begins."""

    def __init__(self, store: StateStore, after: int | None = None,
                 at_load: int | None = None) -> None:
        self.inner, self.after, self.at_load = store, after, at_load
        self.landed = self.loads = 0

    def claim(self, partitions: Sequence[TopicPartition]):
        return self.inner.claim(partitions)

    def load(self, session_ids: Sequence[str], partitions: Sequence[TopicPartition],
             models: Sequence[str | None] = (None,)):
        self.loads += 1
        if self.loads == self.at_load:
            _die(f"as load {self.loads} begins, with the batch before it in flight")
        return self.inner.load(session_ids, partitions, models)

    def count_sessions(self, models: Sequence[str | None]):
        return self.inner.count_sessions(models)

    def ping(self) -> bool:
        return self.inner.ping()

    def store(self, marks: Mapping[TopicPartition, PartitionMark],
              writes: Sequence[StateWrite]) -> StoreResult:
        res = self.inner.store(marks, writes)
        if any(s == WriteStatus.OK for s in res.statuses):
            self.landed += 1
            if self.landed == self.after:
                _die(f"after state write {self.landed}, before produce and commit")
        return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.faults", description=__doc__)
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--crash-after-write", type=int, metavar="N")
    how.add_argument("--crash-at-load", type=int, metavar="N")
    ours, rest = ap.parse_known_args(argv)
    import worker.app
    from worker.__main__ import main as worker_main

    build_store = worker.app.build_store

    def crashing_store(settings, model_id):
        return CrashAfterWrite(build_store(settings, model_id), ours.crash_after_write,
                               ours.crash_at_load)

    worker.app.build_store = crashing_store
    return worker_main(rest)


if __name__ == "__main__":
    sys.exit(main())
