"""Output control: which predictions are emitted (``GRU_OUTPUT__EMIT``, ``MIN_CONFIDENCE``).

The decision is made once, when a message is applied, from the session's stored state (the
last label emitted is in the state's header), and it is stored with the prediction in the
state's outbox. So a restart, a replay or a rebuild decides exactly as before, and a
suppressed prediction is never emitted later by a replay. Pure numpy over a batch's steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Emit = Literal["every", "change", "final"]


@dataclass(frozen=True, slots=True)
class OutputPolicy:
    """``every``: each prediction; ``change``: a prediction whose label differs from the last
    one emitted for the session (the session's first one included); ``final``: only the
    prediction of a session's ``end`` message. Any of them emits only predictions whose
    confidence (the top probability, unrounded) is at least ``min_confidence``."""

    emit: Emit = "every"
    min_confidence: float = 0.0


@dataclass(slots=True)
class Decisions:
    """Per step of a batch: emitted or not; per segment: the last label emitted."""

    emit: np.ndarray  # (n,) bool
    confident: np.ndarray  # (n,) bool: confidence >= min_confidence
    last_label: np.ndarray  # (segments,) int64, -1: none


def decide(policy: OutputPolicy, label: np.ndarray, confidence: np.ndarray, final: np.ndarray,
           segment: np.ndarray, initial_label: np.ndarray) -> Decisions:
    """Steps are in order within a session; ``segment`` numbers each run of steps that share
    one session state (a session, or a new conversation after an ``end``), and
    ``initial_label`` (per segment) is the last label emitted before it (-1: none).

    For ``change``, a confident step is emitted when its label differs from the previous
    confident step's label in its segment (or from ``initial_label`` for the first one): the
    last emitted label is always the last confident label, so no loop is needed."""
    n = len(label)
    confident = confidence >= policy.min_confidence
    if policy.emit == "every":
        emit = confident
    elif policy.emit == "final":
        emit = confident & final
    else:
        idx = np.flatnonzero(confident)
        prev = initial_label[segment[idx]].copy()
        if len(idx) > 1:
            same = segment[idx[1:]] == segment[idx[:-1]]
            prev[1:][same] = label[idx[:-1]][same]
        emit = np.zeros(n, bool)
        emit[idx] = label[idx] != prev
    last_emitted = np.full(len(initial_label), -1, np.int64)
    steps = np.flatnonzero(emit)
    np.maximum.at(last_emitted, segment[steps], steps)
    last_label = np.where(last_emitted >= 0, label[np.maximum(last_emitted, 0)], initial_label)
    return Decisions(emit, confident, last_label)
