"""What each settled batch did: the outcome of every input message, the metrics it feeds and
the run's summary line.

An input message ends in exactly one outcome (``metrics.OUTCOMES``): applied (``ok``),
``dead_lettered``, ``duplicate`` (already applied; ``replayed`` when its prediction was
re-emitted from an outbox), ``fenced`` (another worker owns its partition now), ``rebuilt``
(applied again to rebuild lost states, outputs suppressed) or ``deferred`` (its write did not
land, or its partition was rewound: it is read again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .delivery import InFlight, _by_table
from .metrics import OUTCOMES, Metrics
from .ports import Record
from .recovery import Recovery


@dataclass
class RunSummary:
    messages: int = 0
    batches: int = 0
    predictions: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    tokens: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.messages / self.seconds if self.seconds else 0.0
        outcomes = " ".join(f"{k}={v}" for k, v in self.outcomes.items())
        return (f"worker stopped: {self.messages} messages in {self.batches} batches, "
                f"{self.predictions} predictions, {self.tokens} tokens, {outcomes}, "
                f"{self.seconds:.1f}s ({rate:.0f} msg/s)")


def account(f: InFlight, live: Callable[[Record], bool], recovery: Recovery, metrics: Metrics,
            summary: RunSummary, now: float) -> None:
    """Count a settled batch: ``live(record)`` says whether the batch produced its outputs;
    ``now`` is the wall time its outputs were acknowledged (end-to-end latency)."""
    w, result, m = f.written, f.written.result, metrics
    counts = dict.fromkeys(OUTCOMES, 0)
    for r in f.records:
        tp = (r.topic, r.partition)
        if tp in w.fenced:
            counts["fenced"] += 1
        elif tp in w.behind:
            counts["deferred"] += 1
        elif recovery.suppressed(r):
            counts["rebuilt"] += 1
            recovery.replayed(tp, 1)
    counts["deferred"] += w.deferred
    produced = applied = 0
    stamps: list[int] = []
    for u, rows in f.live:
        if not rows:
            continue
        applied += len(rows)
        emit = u.table.emit
        emitted = [i for i in rows if emit[i]]
        produced += len(emitted)
        stamps += [u.table.records[i].timestamp_ms for i in emitted]
        m.sessions_started.inc(u.started)
        m.sessions_ended.inc(bool(u.table.final[u.steps[-1]]))
    for table, rows in _by_table(f.live).values():
        m.observe_predictions(table, rows)
    if stamps:
        ts = np.array([t for t in stamps if t is not None], np.float64)
        m.e2e_latency.observe_many(np.maximum(0.0, now - ts / 1000))
    counts["ok"] = applied
    counts["dead_lettered"] = sum(1 for x in [*f.rejections, *result.rejections]
                                  if live(x.record))
    counts["duplicate"] = sum(1 for d in result.duplicates if live(d.record))
    counts["replayed"] = sum(1 for p in result.replayed if live(p.record))
    produced += counts["replayed"]
    for outcome, n in counts.items():
        if n:
            m.messages.labels(outcome).inc(n)
            summary.outcomes[outcome] += n
    if counts["rebuilt"]:
        m.rebuild_messages.inc(counts["rebuilt"])
    if result.corrupt_sessions:
        m.corrupt_states.inc(len(result.corrupt_sessions))
    if result.partial_sessions:
        m.partial_sessions.inc(len(result.partial_sessions))
    tokens = sum(u.tokens for u in result.updates if u.partition not in w.skipped)
    m.predictions.inc(produced)
    m.tokens.inc(tokens)
    m.step_seconds.observe(result.step_seconds)
    m.batch_size.observe(len(f.records))
    m.batch_seconds.observe(f.t_sent - f.t_batch + f.settle_s)  # its own time, not the overlap
    by_model: dict[str, list[str]] = {}
    for u in result.updates:
        by_model.setdefault(u.table.model_id, []).append(u.session_id)
    m.saw_sessions([u.session_id for u in result.updates], models=by_model)
    summary.messages += len(f.records)
    summary.batches += 1
    summary.predictions += produced
    summary.tokens += tokens
