"""Fault injection a test asks for, kept out of the production package.

``python -m devtools.faults --crash-after-write N run ARGS`` runs the worker as
``python -m worker run ARGS`` does, with its state store wrapped so that the process dies by
SIGKILL right after the Nth write call that landed: that batch is written, but neither
produced nor committed (tests/test_faults.py, "crash after write").
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from worker.ports import PartitionMark, StateStore, StateWrite, StoreResult, TopicPartition, WriteStatus

log = logging.getLogger("devtools.faults")


class CrashAfterWrite:
    """A StateStore that SIGKILLs its process after its ``after``-th write call that landed."""

    def __init__(self, store: StateStore, after: int) -> None:
        self.inner, self.after, self.landed = store, after, 0

    def claim(self, partitions: Sequence[TopicPartition]):
        return self.inner.claim(partitions)

    def load(self, session_ids: Sequence[str], partitions: Sequence[TopicPartition]):
        return self.inner.load(session_ids, partitions)

    def ping(self) -> bool:
        return self.inner.ping()

    def store(self, marks: Mapping[TopicPartition, PartitionMark],
              writes: Sequence[StateWrite]) -> StoreResult:
        res = self.inner.store(marks, writes)
        if any(s == WriteStatus.OK for s in res.statuses):
            self.landed += 1
            if self.landed == self.after:
                log.critical("fault injection: SIGKILL after state write %d, before produce and "
                             "commit", self.landed)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)
        return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.faults", description=__doc__)
    ap.add_argument("--crash-after-write", type=int, required=True, metavar="N")
    ours, rest = ap.parse_known_args(argv)
    import worker.app
    from worker.__main__ import main as worker_main

    build_store = worker.app.build_store

    def crashing_store(settings, model_id):
        return CrashAfterWrite(build_store(settings, model_id), ours.crash_after_write)

    worker.app.build_store = crashing_store
    return worker_main(rest)


if __name__ == "__main__":
    sys.exit(main())
