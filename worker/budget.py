"""How many records the next batch may take: a latency budget over a learned cost model.

A record waits for the batch in hand, then for its own, so a batch's processing time is
what the budget bounds. Each batch's time is fitted as

    seconds ≈ fixed + per_message · messages + per_session · sessions
                    + per_token · tokens + per_step · longest

by exponentially weighted least squares (recursive, with forgetting). ``tokens`` are the
tokens the model read; ``longest`` is the longest sequence it stepped (one session's new
tokens), the batch's sequential steps: a GRU reads a sequence one token after another, so a
4,096-token document costs 4,096 steps however few rows run beside it, while tokens spread
over many sessions share each step. The next batch takes at most the number of messages
whose predicted time fits ``target_s``, with sessions and tokens per message and the longest
sequence at their recent averages. The budget never makes a batch wait: what has arrived is
taken at once, up to that limit. Two exceptions:

* a **backlog**: when more records wait than two budgeted batches would take, the budget
  is already lost to queueing, and the largest batches drain it fastest (peak throughput is
  what shortens the wait now), so the batch may take up to ``max_records``;
* **no model yet**: until a few batches were measured, the limit starts small and grows.

Pure (no clocks, no I/O): the loop feeds it measurements and asks for limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Limit:
    records: int
    reason: str  # "budget" | "backlog" | "warmup" | "max"


class BatchBudget:
    """``target_s`` = 0 turns the budget off (every batch may take ``max_records``)."""

    def __init__(self, target_s: float, max_records: int, min_records: int = 16,
                 forget: float = 0.98, warmup_batches: int = 8) -> None:
        self.target_s, self.max_records = target_s, max_records
        self.min_records = min(min_records, max_records)
        self.forget, self.warmup_batches = forget, warmup_batches
        # Normal equations of the weighted fit, decayed: A = Σ w·x·xᵀ, b = Σ w·x·y, with
        # x = (1, messages, sessions, tokens, longest). A small ridge, relative to each
        # term's own scale, keeps A invertible while terms move together (they often do).
        self._A = np.eye(5) * 1e-9
        self._b = np.zeros(5)
        self._ratio = 1.0  # sessions per message, recent average
        self._tokens = 0.0  # tokens per message, recent average
        self._longest = 0.0  # the longest sequence, recent average
        self._seen = 0
        self._coef = np.zeros(5)

    # --- measurements ---------------------------------------------------------------------

    def observe(self, messages: int, sessions: int, seconds: float, tokens: int = 0,
                longest: int = 0) -> None:
        if messages <= 0 or seconds < 0:
            return
        x = np.array([1.0, messages, sessions, tokens, longest])
        self._A = self.forget * self._A + np.outer(x, x)
        self._b = self.forget * self._b + x * seconds
        a = 0.1 if self._seen else 1.0  # the first batch sets the averages
        self._ratio += a * (sessions / messages - self._ratio)
        self._tokens += a * (tokens / messages - self._tokens)
        self._longest += a * (longest - self._longest)
        self._seen += 1
        ridge = np.diag([1e-12, 1e-6, 1e-6, 1e-6, 1e-6]) * np.maximum(np.diag(self._A), 1.0)
        try:
            coef = np.linalg.solve(self._A + ridge, self._b)
        except np.linalg.LinAlgError:
            return
        self._coef = coef

    # --- the model's view -----------------------------------------------------------------

    @property
    def fixed_s(self) -> float:
        return max(float(self._coef[0]), 0.0)

    @property
    def per_token_s(self) -> float:
        return max(float(self._coef[3]), 0.0)

    @property
    def per_step_s(self) -> float:
        """Seconds of one more step of the longest sequence."""
        return max(float(self._coef[4]), 0.0)

    @property
    def per_message_s(self) -> float:
        """Marginal seconds of one more message, its share of a new session and its tokens
        included."""
        c = self._coef
        return max(float(c[1] + c[2] * self._ratio + c[3] * self._tokens), 1e-7)

    def predict(self, messages: int, tokens: int | None = None, sessions: int | None = None,
                longest: int | None = None) -> float:
        """A batch's predicted seconds; what is not given is taken at its recent average."""
        c = self._coef
        if tokens is None and sessions is None:
            var = self.per_message_s * messages
        else:
            var = (c[1] * messages
                   + c[2] * (self._ratio * messages if sessions is None else sessions)
                   + c[3] * (self._tokens * messages if tokens is None else tokens))
        steps = self._longest if longest is None else longest
        return self.fixed_s + max(float(var), 0.0) + self.per_step_s * steps

    # --- the limit ------------------------------------------------------------------------

    def limit(self, waiting: int | None = None) -> Limit:
        """The most records the next batch may take; ``waiting`` is how many records are
        known to wait (consumer lag), or None when unknown."""
        if self.target_s <= 0:
            return Limit(self.max_records, "max")
        if self._seen < self.warmup_batches:
            n = min(self.max_records, self.min_records << self._seen)
            return Limit(n, "warmup")
        room = self.target_s - self.fixed_s - self.per_step_s * self._longest
        n = int(room / self.per_message_s) if room > 0 else self.min_records
        n = max(self.min_records, min(self.max_records, n))
        if waiting is not None and waiting > 2 * n and n < self.max_records:
            return Limit(self.max_records, "backlog")
        return Limit(n, "budget")
