"""The models a worker serves: one *current* model for new sessions and, during a rollout, the
*previous* one for the sessions that still have live state under it.

State keys carry the model id, so a rollout keeps two namespaces side by side. Each batch
loads every session's value under both in one round trip (``StateStore.load`` with two
models) and routes each session by what is stored:

1. a value under the current model: the current model; but records redelivered at or before
   the offset of the previous model's last message (the batch that ended its conversation
   and began the next on the current model, not acknowledged) go back to the previous
   model, whose outbox holds their predictions;
2. else a live state under the previous model: the previous model, until the session ends
   or expires (its later messages, duplicates and outbox re-emits stay with it);
3. else an ended session's tombstone under the previous model: its replayed positions (at
   or before the tombstone's) go to the previous model, which deduplicates them and re-emits
   its outbox; new positions (a reused session id) start afresh under the current model
   (a replay that finds them below the offset from which it began new sessions: under the
   previous one, which began them);
4. else (nothing stored): the current model.

A background scan (``check_drain``, every ``GRU_MODEL__DRAIN_CHECK_S``) counts the sessions
left under each namespace; once none is left under the previous model (live or tombstone) it
is unloaded between two batches. Each prediction says which model made it (``model_id``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from .codec import (
    ENDED,
    MAGICS,
    MIN_HEADER,
    StateCorrupt,
    last_offset,
    last_timestamp,
    stored_position,
)
from .config import LimitSettings
from .engine import BatchResult, Continuity, Engine
from .messages import PredictionEncoder, Rejection, TokenMessage, decode
from .metrics import Metrics
from .ports import Record, StateStore, TopicPartition

log = logging.getLogger(__name__)


class RolloutStart(NamedTuple):
    """Where, on one partition, the current model began serving new sessions (``since``);
    during a rebuild whose log was cut by retention before ``since``, a session with nothing
    stored first seen at a seq past 0 below ``partial_until`` began before that: on the
    previous model."""

    since: int
    partial_until: int = -1


NOT_BEGUN = RolloutStart(0)  # a partition with no hint: every offset on the current model


@dataclass
class ServedModel:
    """One loaded model and what serving it needs: its engine, its prediction encoder, and
    its tokenizer (input is tokenized by the model that serves its session)."""

    model_id: str
    engine: Engine
    labels: tuple[str, ...]
    encode_tokens: Callable
    vocab_size: int
    vocab_key: object = None  # equal for models that tokenize alike (their vocab)
    device: str = "cpu"
    tenants: bool = False  # session ids carry their tenant (GRU_LIMITS__TENANT_HEADER)

    def __post_init__(self) -> None:
        self.encoder = PredictionEncoder(self.labels, self.model_id, self.tenants)


class ModelSet:
    def __init__(self, current: ServedModel, previous: ServedModel | None,
                 limits: LimitSettings, metrics: Metrics) -> None:
        if previous is not None and previous.model_id == current.model_id:
            log.warning("the previous model is the current one (%s): nothing to drain",
                        current.model_id)
            previous = None
        self.current, self.previous = current, previous
        self.limits, self.metrics = limits, metrics
        self._drained = False
        self._drain_start: int | None = None
        self._lock = threading.Lock()

    # --- what a batch loads -----------------------------------------------------------------

    @property
    def namespaces(self) -> tuple[str | None, ...]:
        """The model namespaces a batch loads: the current one (None), then the previous."""
        return (None,) if self.previous is None else (None, self.previous.model_id)

    def decode(self, records: Sequence[Record]) -> tuple[list[TokenMessage], list[Rejection]]:
        """Validate each record against the message contract with the current model's
        tokenizer. During a rollout a record the current model refuses but the previous one
        accepts (``token_ids`` of its larger vocabulary) is kept: which model serves its
        session is known once its state is loaded, and that model decides (``apply``)."""
        cur, prev = self.current, self.previous
        messages, rejections = [], []
        for r in records:
            m = decode(r, cur.vocab_size, cur.encode_tokens, self.limits)
            if not isinstance(m, TokenMessage) and prev is not None and not self._alike(prev):
                again = decode(r, prev.vocab_size, prev.encode_tokens, self.limits)
                if isinstance(again, TokenMessage):
                    m = replace(again, decoded_by=prev.model_id)
            (messages if isinstance(m, TokenMessage) else rejections).append(m)
        for rej in rejections:
            rec = rej.record
            log.warning("dead-letter %s[%d]@%d: %.300s", rec.topic, rec.partition, rec.offset,
                        rej.reason)
        return messages, rejections

    def encoder(self, model_id: str) -> PredictionEncoder:
        prev = self.previous
        if prev is not None and model_id == prev.model_id:
            return prev.encoder
        return self.current.encoder

    # --- one batch -----------------------------------------------------------------------

    def apply(self, messages: Sequence[TokenMessage],
              loaded: Mapping[str, tuple[bytes | None, ...]],
              begins: Mapping[TopicPartition, RolloutStart] | None = None,
              continuity: Mapping[TopicPartition, Continuity] | None = None) -> BatchResult:
        """Route each session (module docstring) and apply each model's share of the batch.
        ``loaded``: per session, its value under each of ``namespaces``. ``begins``: per
        partition, the offset from which the current model began new sessions: a session
        with nothing stored whose first message lies before it began on the previous model
        (a rebuild after Redis lost it). ``continuity``: see ``Engine.apply``."""
        prev = self.previous
        if prev is None:
            return self._run(messages, {s: v[0] for s, v in loaded.items()}, [], {},
                             continuity)
        to_cur: list[TokenMessage] = []
        to_prev: list[TokenMessage] = []
        cur_values: dict[str, bytes | None] = {}
        prev_values: dict[str, bytes | None] = {}
        routes: dict[str, tuple[str, int | None]] = {}
        first: dict[str, TokenMessage] = {}
        for m in messages:
            first.setdefault(m.session_id, m)
        began = begins or {}

        def start(m: TokenMessage) -> RolloutStart:  # where the current model began, m's partition
            return began.get((m.record.topic, m.record.partition), NOT_BEGUN)

        for sid, (cur, old) in loaded.items():
            routes[sid] = _route(cur, old, first[sid], prev.engine, start(first[sid]))
            cur_values[sid] = cur
            prev_values[sid] = old
        last: dict[str, TokenMessage] = {}  # each session's previous message in the batch
        for m in messages:
            sid = m.session_id
            where, upto = routes[sid]
            before = last.get(sid)
            if where == "prev" and before is not None and _begins_anew(before, m, prev.engine):
                # a replay that ends a conversation of the previous model and begins the next
                # one under the same id: that one began with the current model, unless before
                where = "cur" if m.record.offset >= start(m).since else "prev"
                routes[sid] = (where, None)
            elif where == "split" and m.position > upto and m.record.offset < start(m).since:
                # past the tombstone, a conversation the replay finds begun before the current
                # model began new sessions: the previous model began it, and keeps it
                where = "prev"
                routes[sid] = (where, None)
            last[sid] = m
            if where == "prev" or (where == "split" and m.position <= upto) or (
                    where == "back" and m.record.offset <= upto):
                to_prev.append(m)
            else:
                to_cur.append(m)
        return self._run(to_cur, cur_values, to_prev, prev_values, continuity)

    def reapply(self, messages: Sequence[TokenMessage],
                refused: Mapping[str, tuple[str | None, bytes | None]],
                continuity: Mapping[TopicPartition, Continuity] | None = None) -> BatchResult:
        """Step sessions again under the model they were written under (a STALE write):
        ``refused`` maps each to (model namespace, its value now)."""
        prev = self.previous
        prev_id = prev.model_id if prev is not None else None
        to_prev = [m for m in messages if refused[m.session_id][0] is not None
                   and refused[m.session_id][0] == prev_id]
        in_prev = {m.session_id for m in to_prev}
        to_cur = [m for m in messages if m.session_id not in in_prev]
        values = {s: v for s, (_, v) in refused.items()}
        return self._run(to_cur, {s: values[s] for s in {m.session_id for m in to_cur}},
                         to_prev, {s: values[s] for s in in_prev}, continuity)

    def _run(self, to_cur, cur_values, to_prev, prev_values, skips) -> BatchResult:
        cur = self.current
        refused = [replace(decode(m.record, cur.vocab_size, cur.encode_tokens, self.limits),
                           session_id=m.session_id)
                   for m in to_cur if m.decoded_by is not None]  # only the previous accepts
        if refused:
            to_cur = [m for m in to_cur if m.decoded_by is None]
        result = cur.engine.apply(to_cur, cur_values, skips) if to_cur else BatchResult()
        result.rejections += refused
        prev = self.previous
        if to_prev and prev is not None:
            msgs, rejections = self._retokenize(to_prev, prev)
            old = prev.engine.apply(msgs, prev_values, skips)
            for u in old.updates:
                u.model = prev.model_id
            old.rejections += rejections
            result.merge(old)
        return result

    def _alike(self, model: ServedModel) -> bool:
        """Whether ``model`` tokenizes as the current one does (the same vocabulary)."""
        return model.vocab_key is not None and model.vocab_key == self.current.vocab_key

    def _retokenize(self, messages: Sequence[TokenMessage], model: ServedModel
                    ) -> tuple[list[TokenMessage], list[Rejection]]:
        """Input was decoded with the current model's tokenizer: decode it again with the
        previous model's, unless both tokenize alike."""
        if self._alike(model):
            return list(messages), []
        out, rejections = [], []
        for m in messages:
            if m.decoded_by == model.model_id:
                out.append(m)
                continue
            again = decode(m.record, model.vocab_size, model.encode_tokens, self.limits)
            if isinstance(again, TokenMessage):
                out.append(again)
            else:
                rejections.append(replace(again, session_id=m.session_id))
        return out, rejections

    # --- draining the previous model ---------------------------------------------------------

    def check_drain(self, store: StateStore) -> None:
        """Count the sessions stored under each namespace (a scan); publish the counts and the
        drain's progress; mark the previous model drained when nothing is left under it.
        Safe to call from a background thread: the unload itself happens in ``between_batches``."""
        prev = self.previous
        if prev is None or self._drained:
            return
        counts = store.count_sessions([None, prev.model_id])
        m = self.metrics
        for model, (live, ended) in ((self.current.model_id, counts[None]),
                                     (prev.model_id, counts[prev.model_id])):
            m.model_stored_sessions.labels(model, "live").set(live)
            m.model_stored_sessions.labels(model, "ended").set(ended)
        left = sum(counts[prev.model_id])
        with self._lock:
            if self._drain_start is None:
                self._drain_start = left
            start = max(self._drain_start, left)
        m.drain_progress.labels(prev.model_id).set(1.0 if not start else 1 - left / start)
        if left == 0:
            self._drained = True
            log.info("no session is left under the previous model %s", prev.model_id)

    def between_batches(self) -> None:
        """Unload the previous model once the drain check found nothing left under it."""
        prev = self.previous
        if prev is None or not self._drained:
            return
        self.previous = None
        m = self.metrics
        m.drop_model(prev.model_id, prev.device, "previous")
        m.drain_progress.labels(prev.model_id).set(1.0)
        for state in ("live", "ended"):
            for model in (prev.model_id, self.current.model_id):
                try:
                    m.model_stored_sessions.remove(model, state)
                except KeyError:
                    pass
        m.models_unloaded.inc()
        log.warning("previous model %s unloaded: every session under it has ended or expired; "
                    "model %s serves all sessions", prev.model_id, self.current.model_id)


class DrainWatcher:
    """Runs ``ModelSet.check_drain`` every ``interval_s`` in a daemon thread while a previous
    model is loaded (a scan of the state store must not stall batches)."""

    def __init__(self, models: ModelSet, store: StateStore, interval_s: float) -> None:
        self.models, self.store, self.interval_s = models, store, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drain-check", daemon=True)

    def start(self) -> "DrainWatcher":
        if self.models.previous is not None:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and self.models.previous is not None:
            try:
                self.models.check_drain(self.store)
            except Exception as e:  # a dependency outage: the loop reports it; try later
                log.warning("drain check of the previous model failed: %r", e)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()


def _route(cur: bytes | None, old: bytes | None, first: TokenMessage, engine: Engine,
           current_began: RolloutStart) -> tuple[str, int | None]:
    """("cur" | "prev" | "split" | "back", the tombstone's position for "split", the previous
    model's last offset for "back"), for a session whose first message in the batch is
    ``first``."""
    if cur is not None:
        back = last_offset(old) if old is not None else -1
        if first.record.offset <= back:
            # a redelivery of records the previous model applied or refused, its conversation
            # since ended (or expired) and the next begun on the current one: those records
            # go back to it (it deduplicates them, re-emits its outbox), the rest go on
            return "back", back
        return "cur", None
    if old is None or _expired(old, first, engine):
        # nothing stored that still lives: a new session, unless the log says it began
        # before the current model did (a rebuild)
        offset = first.record.offset
        older = offset < current_began.since or (
            first.seq is not None and first.seq > 0 and offset < current_began.partial_until)
        return ("prev", None) if older else ("cur", None)
    if len(old) < MIN_HEADER or old[:4] not in MAGICS or not old[4] & ENDED:
        return "prev", None  # live (or unreadable: the previous model reports it corrupt)
    return "split", stored_position(old)


def _begins_anew(before: TokenMessage, m: TokenMessage, engine: Engine) -> bool:
    """Whether ``m`` begins a new conversation after ``before``, its session's previous
    message in the batch: that one ended it, or the state expired in between (event time)."""
    ts, ts0 = m.record.timestamp_ms, before.record.timestamp_ms
    gap = ts - ts0 if ts is not None and ts0 is not None else 0
    if before.end:
        return m.position > before.position or gap > engine.end_ttl_ms
    return gap > engine.ttl_ms


def _expired(raw: bytes, first: TokenMessage, engine: Engine) -> bool:
    """Whether a stored value had expired in event time when ``first`` arrived."""
    try:
        last_ts = last_timestamp(raw)
    except StateCorrupt:
        return False
    ts = first.record.timestamp_ms
    if last_ts < 0 or ts is None:
        return False
    return ts - last_ts > (engine.end_ttl_ms if raw[4] & ENDED else engine.ttl_ms)
