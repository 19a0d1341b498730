"""The pure core: apply one batch of token messages to the loaded session states.

``Engine.apply(messages, loaded) -> BatchResult`` touches no Kafka and no Redis. It decides,
per session and in order, which messages are new, duplicate (at or before the stored
position) or invalid for the session, then advances every session with new messages in
one batched model step per round (round r holds the r-th new message of each session), and
returns the new encoded states and the predictions.

It works on whole batches, not per message: the loaded values are decoded as numpy views
over their joined bytes, the new ones encoded the same way (one structured array per value
layout), the token ids and digests of all new messages are built in one pass, and the
predictions come out as arrays (``StepTable``) that the loop encodes in bulk. Only the
decision per message (new, duplicate, reused, wrong numbering) is a Python loop.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.gru import GRUClassifier

from .codec import (
    ENDED,
    F16,
    HEADER,
    HEADER_DTYPE,
    MAGIC,
    MAX_OUTBOX,
    PARTIAL,
    SEQ,
    OutboxEntry,
    PosKind,
    StateCorrupt,
    decode_outbox,
    decode_state,
    token_digests,
    value_dtype,
)
from .compute import Stepper
from .messages import Prediction, Rejection, TokenMessage
from .ports import Record, TopicPartition


@dataclass(slots=True)
class StepTable:
    """The new messages one ``apply`` stepped, as columns: what their predictions and the
    outboxes of the new states are made of."""

    session_ids: list[str]
    records: list[Record]
    seq: np.ndarray  # (n,) int64: the seq reported
    tokens_seen: np.ndarray  # (n,) int64: after the message
    final: np.ndarray  # (n,) bool: the message ended its session
    partial: np.ndarray  # (n,) bool: the session's beginning was never applied
    probs: np.ndarray  # (n, C) float32

    def prediction(self, i: int) -> Prediction:
        return Prediction(self.session_ids[i], int(self.seq[i]), tuple(self.probs[i].tolist()),
                          int(self.tokens_seen[i]), bool(self.final[i]), self.records[i],
                          partial=bool(self.partial[i]))


@dataclass(slots=True)
class SessionUpdate:
    """The write one session needs, and the predictions that may be produced once it lands:
    rows ``steps`` of ``table``."""

    session_id: str
    partition: TopicPartition
    expected_pos: int | None
    new_pos: int
    value: bytes
    ttl_ms: int
    table: StepTable
    steps: list[int]
    started: bool  # the session had no live state before this batch
    tokens: int  # tokens this batch applied to the session

    @property
    def predictions(self) -> list[Prediction]:
        """As objects (for tests and tools; the loop reads ``table`` directly)."""
        return [self.table.prediction(i) for i in self.steps]


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
class _Loaded:
    """The loaded states of the batch's sessions, as columns (index: session)."""

    exists: np.ndarray  # bool
    last_pos: np.ndarray  # int64
    seq_kind: np.ndarray  # bool: numbered by seq
    tokens: np.ndarray  # int64
    messages: np.ndarray  # int64
    ended: np.ndarray  # bool
    partial: np.ndarray  # bool
    h: np.ndarray  # (S, L, H) float32; zeros where there is no live state
    corrupt: dict[int, str]


def decode_states(raws: Sequence[bytes | None], layers: int, hidden: int,
                  num_labels: int) -> _Loaded:
    """Decode every loaded value at once: values of one length are joined and viewed as one
    structured array. Invalid ones are left to ``decode_state`` for the reason."""
    S = len(raws)
    out = _Loaded(np.zeros(S, bool), np.zeros(S, np.int64), np.zeros(S, bool),
                  np.zeros(S, np.int64), np.zeros(S, np.int64), np.zeros(S, bool),
                  np.zeros(S, bool), np.zeros((S, layers, hidden), np.float32), {})
    by_len: dict[int, list[int]] = {}
    for i, raw in enumerate(raws):
        if raw is not None:
            by_len.setdefault(len(raw), []).append(i)
    entry = 8 * 3 + 1 + 8 + 4 * num_labels
    for length, idx in by_len.items():
        if length < HEADER.size:
            for i in idx:
                out.corrupt[i] = _reason(raws[i], layers, hidden, num_labels)
            continue
        buf = np.frombuffer(b"".join(raws[i] for i in idx), np.uint8).reshape(len(idx), length)
        hdr = np.ascontiguousarray(buf[:, :HEADER.size]).view(HEADER_DTYPE).reshape(-1)
        flags = hdr["flags"].astype(np.int64)
        ended = (flags & ENDED) != 0
        f16 = (flags & F16) != 0
        l, hd = hdr["layers"].astype(np.int64), hdr["hidden"].astype(np.int64)
        width = np.where(f16, 2, 4)
        ok = ((hdr["magic"] == MAGIC) & (hdr["labels"] == num_labels)
              & np.where(ended, (l == 0) & (hd == 0), (l == layers) & (hd == hidden))
              & (HEADER.size + l * hd * width + hdr["n_out"].astype(np.int64) * entry == length))
        rows = np.asarray(idx)
        for i in rows[~ok]:
            out.corrupt[int(i)] = _reason(raws[i], layers, hidden, num_labels)
        good = rows[ok]
        out.exists[good] = True
        out.last_pos[good] = hdr["last_pos"][ok]
        out.seq_kind[good] = (flags[ok] & SEQ) != 0
        out.tokens[good] = hdr["tokens"][ok]
        out.messages[good] = hdr["messages"][ok]
        out.ended[good] = ended[ok]
        out.partial[good] = (flags[ok] & PARTIAL) != 0
        for w, dtype in ((4, "<f4"), (2, "<f2")):
            sel = ok & ~ended & (width == w)
            if sel.any():
                hb = np.ascontiguousarray(buf[sel, HEADER.size:HEADER.size + layers * hidden * w])
                out.h[rows[sel]] = hb.view(dtype).reshape(-1, layers, hidden)
    return out


def _reason(raw: bytes, layers: int, hidden: int, num_labels: int) -> str:
    try:
        decode_state(raw, layers, hidden, num_labels, with_outbox=False)
    except StateCorrupt as e:
        return str(e)
    return "state value does not decode"  # pragma: no cover - the checks above are the same


class Engine:
    def __init__(self, model: GRUClassifier, device: str = "cpu", state_dtype: str = "float32",
                 ttl_ms: int = 86_400_000, end_ttl_ms: int = 3_600_000,
                 compute_dtype: str = "float32", cuda_graphs: bool = True) -> None:
        self.stepper = Stepper(model, device, compute_dtype, cuda_graphs=cuda_graphs)
        self.device = self.stepper.device
        self._pinned: torch.Tensor | None = None
        self.state_f16 = state_dtype == "float16"
        self.ttl_ms, self.end_ttl_ms = ttl_ms, end_ttl_ms
        c = model.config
        self.layers, self.hidden, self.num_labels = c.num_layers, c.hidden_size, c.num_labels

    def apply(self, messages: Sequence[TokenMessage],
              loaded: Mapping[str, bytes | None]) -> BatchResult:
        result = BatchResult()
        by_session: dict[str, list[int]] = {}
        for i, m in enumerate(messages):
            by_session.setdefault(m.session_id, []).append(i)
        sids = list(by_session)
        raws = [loaded.get(s) for s in sids]
        st = decode_states(raws, self.layers, self.hidden, self.num_labels)

        # Decide, per session and in order, what each message does (the one Python loop, on
        # plain lists: numpy scalars cost ten times as much to touch one at a time).
        plan_rows: list[int] = []  # session index of each plan row
        row_start: list[int] = []  # its steps are s_*[row_start : row_start + row_count]
        row_count: list[int] = []
        s_msg, s_reset, s_seq, s_seen, s_count, s_partial = [], [], [], [], [], []
        c_exists, c_last, c_seqk = st.exists.tolist(), st.last_pos.tolist(), st.seq_kind.tolist()
        c_tokens, c_msgs = st.tokens.tolist(), st.messages.tolist()
        c_ended, c_partial = st.ended.tolist(), st.partial.tolist()
        SEQK, OFFK = PosKind.SEQ, PosKind.OFFSET
        for k, sid in enumerate(sids):
            idx = by_session[sid]
            if k in st.corrupt:
                result.corrupt_sessions.add(sid)
                reason = f"stored state of session {sid!r} is unreadable: {st.corrupt[k]}"
                result.rejections += [Rejection(messages[i].record, reason, sid) for i in idx]
                continue
            exists = c_exists[k]
            last_pos = c_last[k] if exists else None
            kind = (SEQK if c_seqk[k] else OFFK) if exists else None
            live = exists and not c_ended[k]
            tokens = c_tokens[k] if live else 0
            count = c_msgs[k] if live else 0
            partial = c_partial[k] if live else False
            outbox: dict[int, OutboxEntry] | None = None  # decoded on the first duplicate
            start = len(s_msg)
            for i in idx:
                m = messages[i]
                m_kind = SEQK if m.seq is not None else OFFK
                if kind is not None and m_kind != kind:
                    result.rejections.append(Rejection(m.record, (
                        f"session {sid!r} is numbered by {kind.name.lower()}, but this message "
                        f"{'has' if m.seq is not None else 'has no'} seq; a session must not "
                        f"mix the two"), sid))
                    continue
                pos = m.seq if m.seq is not None else m.record.offset
                if last_pos is not None and pos <= last_pos:
                    if outbox is None:
                        raw = raws[k]
                        outbox = {e.position: e for e in decode_outbox(raw)} if raw else {}
                    entry = outbox.get(pos)
                    if entry is not None and entry.digest != _digest(m):
                        result.rejections.append(Rejection(m.record, (
                            f"session {sid!r} already applied position {pos} with other "
                            f"tokens: a reused session id or seq; start a new conversation "
                            f"with a new session_id, or number it after {last_pos}"), sid))
                        continue
                    result.duplicates.append(m)
                    if entry is not None:
                        result.replayed.append(Prediction(
                            sid, entry.seq, entry.probs, entry.tokens_seen, entry.final,
                            m.record, replayed=True, partial=c_partial[k]))
                    continue
                reset = not live
                if reset:
                    tokens = count = 0
                    # No state at all (not even an ended session's tombstone) and a seq past
                    # 0: the session's beginning was never applied here (expired, or lost by
                    # Redis and older than the log's rebuild window).
                    partial = (not exists and len(s_msg) == start and m.seq is not None
                               and m.seq > 0)
                    if partial:
                        result.partial_sessions.add(sid)
                tokens += len(m.token_ids)
                s_msg.append(i)
                s_reset.append(reset)
                s_seq.append(m.seq if m.seq is not None else count)
                s_seen.append(tokens)
                s_count.append(count + 1)
                s_partial.append(partial)
                count += 1
                last_pos, kind, live = pos, m_kind, not m.end
            n = len(s_msg) - start
            if n:
                if n > MAX_OUTBOX:
                    raise ValueError(f"session {sid!r} has {n} messages in one batch; an "
                                     f"outbox holds at most {MAX_OUTBOX}")
                plan_rows.append(k)
                row_start.append(start)
                row_count.append(n)
        if plan_rows:
            self._run(messages, sids, st, plan_rows, row_start, row_count, s_msg, s_reset, s_seq,
                      s_seen, s_count, s_partial, result)
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

    @torch.inference_mode()
    def _run(self, messages, sids, st: _Loaded, plan_rows, row_start, row_count, s_msg, s_reset,
             s_seq, s_seen, s_count, s_partial, result: BatchResult) -> None:
        t0 = time.perf_counter()
        n_steps, P = len(s_msg), len(plan_rows)
        msgs = [messages[i] for i in s_msg]
        lengths = np.fromiter(map(len, (m.token_ids for m in msgs)), np.int64, n_steps)
        flat = np.fromiter(itertools.chain.from_iterable(m.token_ids for m in msgs), np.int64,
                           int(lengths.sum()))
        kmax = int(lengths.max())
        ids = np.zeros((n_steps, kmax), np.int64)
        ids[np.arange(kmax)[None, :] < lengths[:, None]] = flat
        ends = np.fromiter((m.end for m in msgs), bool, n_steps)
        digests = token_digests(flat, lengths, ends)
        # A plan row's steps are contiguous: step i is the r-th new message of row p.
        starts = np.asarray(row_start, np.int64)
        counts = np.asarray(row_count, np.int64)
        step_row = np.repeat(np.arange(P), counts)
        step_round = np.arange(n_steps) - np.repeat(starts, counts)
        rows_idx = np.asarray(plan_rows)
        live0 = st.exists[rows_idx] & ~st.ended[rows_idx]
        h0 = np.where(live0[:, None, None], st.h[rows_idx], 0.0).astype(np.float32)
        h = self._to_device(h0).transpose(0, 1).contiguous()  # (L, P, H)
        resets = np.asarray(s_reset, bool)
        ids_t, len_t = torch.from_numpy(ids), torch.from_numpy(lengths)
        rounds = int(counts.max())
        if rounds == 1:  # every session has one new message: one step, no gathers
            h_new, p = self.stepper.step(h, ids_t.to(self.device), len_t.to(self.device))
            h, probs = h_new, p.float().cpu().numpy()
        else:
            probs = np.empty((n_steps, self.num_labels), np.float32)
            for r in range(rounds):
                sel = np.flatnonzero(step_round == r)
                rows = step_row[sel]
                if r > 0:
                    again = rows[resets[sel]]
                    if len(again):
                        h[:, torch.from_numpy(again).to(self.device)] = 0
                k = int(lengths[sel].max())
                sel_t = torch.from_numpy(sel)
                idx = torch.from_numpy(rows).to(self.device)
                h_rows, p = self.stepper.step(h.index_select(1, idx),
                                              ids_t[sel_t, :k].to(self.device),
                                              len_t[sel_t].to(self.device))
                h.index_copy_(1, idx, h_rows)
                probs[sel] = p.float().cpu().numpy()
        h_out = h.transpose(0, 1).cpu().numpy()  # (P, L, H)
        result.step_seconds = time.perf_counter() - t0

        seq = np.asarray(s_seq, np.int64)
        seen = np.asarray(s_seen, np.int64)
        partial = np.asarray(s_partial, bool)
        seq_given = np.fromiter((m.seq is not None for m in msgs), bool, n_steps)
        positions = np.where(seq_given, seq, np.fromiter((m.record.offset for m in msgs),
                                                         np.int64, n_steps))
        last = starts + counts - 1
        table = StepTable([m.session_id for m in msgs], [m.record for m in msgs], seq, seen,
                          ends, partial, probs)
        values = self._encode(starts, counts, last, h_out, positions, seq, seen,
                              np.asarray(s_count, np.int64), ends, partial, digests, seq_given,
                              probs)
        tokens = np.add.reduceat(lengths, starts).tolist()
        new_pos, ended = positions[last].tolist(), ends[last].tolist()
        exists, old_pos, was_ended = (st.exists[rows_idx].tolist(), st.last_pos[rows_idx].tolist(),
                                      st.ended[rows_idx].tolist())
        ttl, end_ttl = self.ttl_ms, self.end_ttl_ms
        for p in range(P):
            lrec = msgs[row_start[p] + row_count[p] - 1].record
            result.updates.append(SessionUpdate(
                sids[plan_rows[p]], (lrec.topic, lrec.partition),
                old_pos[p] if exists[p] else None, new_pos[p], values[p],
                end_ttl if ended[p] else ttl, table,
                list(range(row_start[p], row_start[p] + row_count[p])),
                not exists[p] or was_ended[p], tokens[p]))

    def _encode(self, starts, counts, last, h_out, positions, seq, seen, count, ends, partial,
                digests, seq_given, probs) -> list[bytes]:
        """The new state values, one structured array per layout (ended or not, outbox size)."""
        L, H, C = self.layers, self.hidden, self.num_labels
        ended = ends[last]
        flags = ((F16 if self.state_f16 else 0) | np.where(seq_given[last], SEQ, 0)
                 | np.where(ended, ENDED, 0) | np.where(partial[last], PARTIAL, 0)).astype(np.uint8)
        values: list[bytes] = [b""] * len(starts)
        layout = ended.astype(np.int64) * (MAX_OUTBOX + 1) + counts
        for key in np.unique(layout).tolist():
            rows = np.flatnonzero(layout == key)
            is_ended, n = key > MAX_OUTBOX, key % (MAX_OUTBOX + 1)
            dt = value_dtype(0 if is_ended else L, H, C, n, self.state_f16)
            arr = np.zeros(len(rows), dt)
            hdr = arr["hdr"]
            hdr["magic"] = MAGIC
            hdr["flags"] = flags[rows]
            if not is_ended:
                hdr["layers"], hdr["hidden"] = L, H
                arr["h"] = h_out[rows]
            hdr["labels"] = C
            hdr["n_out"] = n
            li = last[rows]
            hdr["last_pos"] = positions[li]
            hdr["tokens"] = seen[li]
            hdr["messages"] = count[li]
            steps = starts[rows][:, None] + np.arange(n)[None, :]  # (G, n)
            out = arr["out"]
            out["position"] = positions[steps]
            out["seq"] = seq[steps]
            out["seen"] = seen[steps]
            out["final"] = ends[steps]
            out["digest"] = digests[steps]
            out["probs"] = probs[steps]
            raw = arr.tobytes()
            size = dt.itemsize
            for j, p in enumerate(rows.tolist()):
                values[p] = raw[j * size:(j + 1) * size]
        return values


def _digest(m: TokenMessage) -> int:
    return int(token_digests(np.asarray(m.token_ids, np.int64), np.array([len(m.token_ids)]),
                             np.array([m.end]))[0])
