"""The pure core: apply one batch of token messages to the loaded session states.

``Engine.apply(messages, loaded) -> BatchResult`` touches no Kafka and no Redis. It decides,
per session and in order, which messages are new, duplicate (at or before the stored
position) or invalid for the session, then advances every session with new messages in
one batched model step per round (round r holds the r-th new message of each session), and
returns the new encoded states and the predictions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.gru import GRUClassifier

from .codec import (MAX_OUTBOX, OutboxEntry, PosKind, SessionState, StateCorrupt, decode_outbox,
                    decode_state, encode_state, token_digest)
from .compute import Stepper
from .messages import Prediction, Rejection, TokenMessage
from .ports import TopicPartition


@dataclass(slots=True)
class SessionUpdate:
    """The write one session needs, and the predictions that may be produced once it lands."""

    session_id: str
    partition: TopicPartition
    expected_pos: int | None
    new_pos: int
    value: bytes
    ttl_ms: int
    predictions: list[Prediction]
    started: bool  # the session had no live state before this batch
    tokens: int  # tokens this batch applied to the session


@dataclass(slots=True)
class BatchResult:
    updates: list[SessionUpdate] = field(default_factory=list)
    replayed: list[Prediction] = field(default_factory=list)  # re-emitted from outboxes
    rejections: list[Rejection] = field(default_factory=list)
    duplicates: list[TokenMessage] = field(default_factory=list)
    corrupt_sessions: set[str] = field(default_factory=set)  # stored value unreadable
    partial_sessions: set[str] = field(default_factory=set)  # begun with no state at a seq > 0
    step_seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(u.tokens for u in self.updates)

    def without_sessions(self, session_ids: set[str]) -> "BatchResult":
        """This result minus everything it decided for ``session_ids`` (to re-run them)."""
        return BatchResult(
            updates=[u for u in self.updates if u.session_id not in session_ids],
            replayed=[p for p in self.replayed if p.session_id not in session_ids],
            rejections=[r for r in self.rejections if r.session_id not in session_ids],
            duplicates=[m for m in self.duplicates if m.session_id not in session_ids],
            corrupt_sessions=self.corrupt_sessions - session_ids,
            partial_sessions=self.partial_sessions - session_ids,
            step_seconds=self.step_seconds)

    def merge(self, other: "BatchResult") -> None:
        self.updates += other.updates
        self.replayed += other.replayed
        self.rejections += other.rejections
        self.duplicates += other.duplicates
        self.corrupt_sessions |= other.corrupt_sessions
        self.partial_sessions |= other.partial_sessions
        self.step_seconds += other.step_seconds


@dataclass(slots=True)
class _Step:
    message: TokenMessage
    reset: bool  # start from a zero state (new session, or one that ended earlier)
    seq: int  # the seq reported in the prediction
    tokens_seen: int  # after this message
    messages: int  # messages applied to the session after this one
    partial: bool  # the session's first messages were never applied
    probs: tuple[float, ...] = ()


class Engine:
    def __init__(self, model: GRUClassifier, device: str = "cpu", state_dtype: str = "float32",
                 ttl_ms: int = 86_400_000, end_ttl_ms: int = 3_600_000,
                 compute_dtype: str = "float32", cuda_graphs: bool = True) -> None:
        self.stepper = Stepper(model, device, compute_dtype, cuda_graphs=cuda_graphs)
        self.device = self.stepper.device
        self._pinned: torch.Tensor | None = None
        self.state_dtype = state_dtype
        self.ttl_ms, self.end_ttl_ms = ttl_ms, end_ttl_ms
        c = model.config
        self.layers, self.hidden, self.num_labels = c.num_layers, c.hidden_size, c.num_labels

    def apply(self, messages: Sequence[TokenMessage],
              loaded: Mapping[str, bytes | None]) -> BatchResult:
        result = BatchResult()
        by_session: dict[str, list[TokenMessage]] = {}
        for m in messages:
            by_session.setdefault(m.session_id, []).append(m)

        plans: list[tuple[str, SessionState | None, list[_Step]]] = []
        for sid, msgs in by_session.items():
            raw = loaded.get(sid)
            try:
                state = decode_state(raw, self.layers, self.hidden, self.num_labels,
                                     with_outbox=False) if raw is not None else None
            except StateCorrupt as e:
                result.corrupt_sessions.add(sid)
                result.rejections += [Rejection(m.record, f"stored state of session {sid!r} is "
                                                f"unreadable: {e}", sid) for m in msgs]
                continue
            steps = self._plan(state, raw, msgs, result)
            if steps:
                plans.append((sid, state, steps))
        if plans:
            self._run(plans, result)
        return result

    def _to_device(self, h0: np.ndarray) -> torch.Tensor:
        """Host states to the device; through a reused pinned buffer when that is a GPU."""
        if self.device.type != "cuda":
            return torch.from_numpy(h0)
        n = h0.shape[0]
        if self._pinned is None or self._pinned.shape[0] < n:
            self._pinned = torch.empty((max(n, 1024), *h0.shape[1:]), pin_memory=True)
        buf = self._pinned[:n]
        buf.numpy()[:] = h0
        return buf.to(self.device, non_blocking=True)

    def _plan(self, state: SessionState | None, raw: bytes | None, msgs: list[TokenMessage],
              result: BatchResult) -> list[_Step]:
        """Decide, without the model, what each message does to its session."""
        outbox: dict[int, OutboxEntry] | None = None  # decoded on the first duplicate
        last_pos = state.last_pos if state else None
        kind = state.pos_kind if state else None
        live = state is not None and not state.ended
        tokens = state.tokens_seen if live else 0
        count = state.messages if live else 0
        partial = state.partial if live else False
        steps: list[_Step] = []
        for m in msgs:
            m_kind = PosKind.SEQ if m.seq is not None else PosKind.OFFSET
            if kind is not None and m_kind != kind:
                result.rejections.append(Rejection(m.record, (
                    f"session {m.session_id!r} is numbered by {kind.name.lower()}, but this message "
                    f"{'has' if m.seq is not None else 'has no'} seq; a session must not mix the two"),
                    m.session_id))
                continue
            if last_pos is not None and m.position <= last_pos:
                if outbox is None:
                    outbox = {e.position: e for e in decode_outbox(raw)} if raw else {}
                entry = outbox.get(m.position)
                if entry is not None and entry.digest != token_digest(m.token_ids, m.end):
                    result.rejections.append(Rejection(m.record, (
                        f"session {m.session_id!r} already applied position {m.position} with "
                        f"other tokens: a reused session id or seq; start a new conversation "
                        f"with a new session_id, or number it after {last_pos}"), m.session_id))
                    continue
                result.duplicates.append(m)
                if entry is not None:
                    result.replayed.append(Prediction(m.session_id, entry.seq, entry.probs,
                                                      entry.tokens_seen, entry.final, m.record,
                                                      replayed=True, partial=state.partial))
                continue
            reset = not live
            if reset:
                tokens = count = 0
                # No state at all (not even an ended session's tombstone) and a seq past 0:
                # the session's beginning was never applied here (expired, or lost by Redis
                # and older than the log's rebuild window).
                partial = state is None and not steps and m.seq is not None and m.seq > 0
                if partial:
                    result.partial_sessions.add(m.session_id)
            tokens += len(m.token_ids)
            steps.append(_Step(m, reset, m.seq if m.seq is not None else count, tokens, count + 1,
                               partial))
            count += 1
            last_pos, kind, live = m.position, m_kind, not m.end
        if len(steps) > MAX_OUTBOX:
            raise ValueError(f"session {msgs[0].session_id!r} has {len(steps)} messages in one "
                             f"batch; an outbox holds at most {MAX_OUTBOX}")
        return steps

    @torch.inference_mode()
    def _run(self, plans: list[tuple[str, SessionState | None, list[_Step]]],
             result: BatchResult) -> None:
        t0 = time.perf_counter()
        n = len(plans)
        h0 = np.zeros((n, self.layers, self.hidden), np.float32)
        for i, (_, state, _) in enumerate(plans):
            if state is not None and not state.ended:
                h0[i] = state.h
        h = self._to_device(h0).transpose(0, 1).contiguous()  # (L, S, H)
        rounds = max(len(steps) for _, _, steps in plans)
        for r in range(rounds):
            rows = [i for i, (_, _, steps) in enumerate(plans) if r < len(steps)]
            batch = [plans[i][2][r] for i in rows]
            resets = [i for i, s in zip(rows, batch) if s.reset and r > 0]
            if resets:
                h[:, resets] = 0
            width = max(len(s.message.token_ids) for s in batch)
            ids = np.zeros((len(batch), width), np.int64)
            for j, s in enumerate(batch):
                ids[j, : len(s.message.token_ids)] = s.message.token_ids
            lengths = torch.tensor([len(s.message.token_ids) for s in batch])
            idx = torch.tensor(rows, device=self.device)
            h_rows, probs = self.stepper.step(h.index_select(1, idx),
                                              torch.from_numpy(ids).to(self.device),
                                              lengths.to(self.device))
            h.index_copy_(1, idx, h_rows)
            for s, p in zip(batch, probs.float().cpu().tolist()):
                s.probs = tuple(p)
        h_out = h.transpose(0, 1).cpu().numpy()  # (S, L, H)
        result.step_seconds = time.perf_counter() - t0

        for i, (sid, state, steps) in enumerate(plans):
            last = steps[-1]
            ended = last.message.end
            new_state = SessionState(
                h=h_out[i], last_pos=last.message.position,
                pos_kind=PosKind.SEQ if last.message.seq is not None else PosKind.OFFSET,
                tokens_seen=last.tokens_seen, messages=last.messages, ended=ended,
                outbox=tuple(OutboxEntry(s.message.position, s.seq, s.tokens_seen, s.message.end,
                                         token_digest(s.message.token_ids, s.message.end), s.probs)
                             for s in steps),
                partial=last.partial)
            preds = [Prediction(sid, s.seq, s.probs, s.tokens_seen, s.message.end, s.message.record,
                                partial=s.partial) for s in steps]
            result.updates.append(SessionUpdate(
                session_id=sid, partition=(last.message.record.topic, last.message.record.partition),
                expected_pos=state.last_pos if state else None, new_pos=new_state.last_pos,
                value=encode_state(new_state, self.num_labels, self.state_dtype),
                ttl_ms=self.end_ttl_ms if ended else self.ttl_ms,
                predictions=preds, started=state is None or state.ended,
                tokens=sum(len(s.message.token_ids) for s in steps)))

