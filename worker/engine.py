"""The pure core: apply one batch of token messages to the loaded session states.

``Engine.apply(messages, loaded) -> BatchResult`` touches no Kafka and no Redis. It decides,
per session and in order, which messages are new, duplicate (at or before the stored
position) or invalid for the session, then advances every session with new messages and
returns the new encoded states and the predictions.

A batch costs what it holds, not its longest message times its size (``_advance``): each
session's new messages run as one token sequence, read at every message's end; sequences
are grouped by length (power-of-two buckets, so padding at most doubles a group's work) and
long ones run packed, with no padding at all, in windows of a bounded number of tokens.

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
from typing import NamedTuple

import numpy as np
import torch

from model.gru import UNROLL_MAX_TOKENS, WINDOW_TOKENS, GRUClassifier

from .codec import (
    ENDED,
    F16,
    FORMATS,
    MAGIC,
    MAX_OUTBOX,
    NO_LABEL,
    OUT_FINAL,
    OUT_PARTIAL,
    OUT_SUPPRESSED,
    PARTIAL,
    SEEN_MAX,
    SEQ,
    OutboxEntry,
    PosKind,
    StateCorrupt,
    decode_outbox,
    decode_state,
    outbox_label,
    with_carried,
    token_digests,
    value_dtype,
)
from .compute import Stepper
from .messages import Prediction, Rejection, TokenMessage
from .output import OutputPolicy, decide
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
    label: np.ndarray  # (n,) int64: the top label
    confidence: np.ndarray  # (n,) float32: its probability
    emit: np.ndarray  # (n,) bool: emitted under the output policy (worker.output)
    confident: np.ndarray  # (n,) bool: confidence at least the policy's minimum
    first_reached: np.ndarray  # (n,) int64: on final rows, tokens seen when the final label
    #                            was first predicted in the session; 0 elsewhere
    model_id: str = ""

    def prediction(self, i: int) -> Prediction:
        return Prediction(self.session_ids[i], int(self.seq[i]), tuple(self.probs[i].tolist()),
                          int(self.tokens_seen[i]), bool(self.final[i]), self.records[i],
                          partial=bool(self.partial[i]), model_id=self.model_id)


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
    model: str | None = None  # the model namespace it is written under (None: the current)
    start_offset: int = -1  # input offset of the session's first message (-1: unknown)
    last_ts: int = -1  # record timestamp (ms) of the last message applied (-1: unknown)
    ended: bool = False  # the last message applied ended the session
    replaces: bool = False  # the stored value had expired in event time (``StateWrite``)

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
    # sessions whose stored value the batch left as it is (only redeliveries, duplicates or
    # refusals): (session id, partition, its first offset, when it expires in event time ms)
    kept: list[tuple[str, TopicPartition, int, int]] = field(default_factory=list)
    step_seconds: float = 0.0
    longest: int = 0  # tokens of the longest sequence stepped: the batch's sequential steps

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
            kept=[k for k in self.kept if k[0] not in session_ids],
            step_seconds=self.step_seconds, longest=self.longest)

    def merge(self, other: "BatchResult") -> None:
        self.updates += other.updates
        self.replayed += other.replayed
        self.rejections += other.rejections
        self.duplicates += other.duplicates
        self.corrupt_sessions |= other.corrupt_sessions
        self.partial_sessions |= other.partial_sessions
        self.kept += other.kept
        self.step_seconds += other.step_seconds
        self.longest = max(self.longest, other.longest)


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
    last_label: np.ndarray  # int64: the last label emitted, -1 for none
    first: np.ndarray  # (S, C) int64: tokens seen when each label was first predicted, 0: not yet
    start_offset: np.ndarray  # int64: input offset of the session's first message, -1: unknown
    last_offset: np.ndarray  # int64: input offset of its last message, -1: unknown
    last_ts: np.ndarray  # int64: that message's record timestamp (ms), -1: unknown
    corrupt: dict[int, str]


def decode_states(raws: Sequence[bytes | None], layers: int, hidden: int,
                  num_labels: int) -> _Loaded:
    """Decode every loaded value at once: values of one length and format are joined and
    viewed as one structured array. Invalid ones are left to ``decode_state`` for the reason."""
    S = len(raws)
    out = _Loaded(np.zeros(S, bool), np.zeros(S, np.int64), np.zeros(S, bool),
                  np.zeros(S, np.int64), np.zeros(S, np.int64), np.zeros(S, bool),
                  np.zeros(S, bool), np.zeros((S, layers, hidden), np.float32),
                  np.full(S, -1, np.int64), np.zeros((S, num_labels), np.int64),
                  np.full(S, -1, np.int64), np.full(S, -1, np.int64), np.full(S, -1, np.int64),
                  {})
    by_len: dict[tuple[int, bytes], list[int]] = {}
    for i, raw in enumerate(raws):
        if raw is not None:
            by_len.setdefault((len(raw), bytes(raw[:4])), []).append(i)
    entry = 8 * 3 + 1 + 8 + 4 * num_labels
    for (length, magic), idx in by_len.items():
        fmt = FORMATS.get(magic)
        hsize = fmt.header.size if fmt is not None else 0
        if fmt is None or length < hsize:
            for i in idx:
                out.corrupt[i] = _reason(raws[i], layers, hidden, num_labels)
            continue
        buf = np.frombuffer(b"".join(raws[i] for i in idx), np.uint8).reshape(len(idx), length)
        hdr = np.ascontiguousarray(buf[:, :hsize]).view(fmt.dtype).reshape(-1)
        flags = hdr["flags"].astype(np.int64)
        ended = (flags & ENDED) != 0
        f16 = (flags & F16) != 0
        l, hd = hdr["layers"].astype(np.int64), hdr["hidden"].astype(np.int64)
        width = np.where(f16, 2, 4)
        first_bytes = np.where(ended | (not fmt.first_seen), 0, 4 * num_labels)
        ok = ((hdr["labels"] == num_labels)
              & np.where(ended, (l == 0) & (hd == 0), (l == layers) & (hd == hidden))
              & (hsize + l * hd * width + first_bytes + hdr["n_out"].astype(np.int64) * entry
                 == length))
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
        if fmt.first_seen:
            lab = hdr["last_label"][ok].astype(np.int64)
            out.last_label[good] = np.where(lab == NO_LABEL, -1, lab)
        else:  # GRS2 kept no last label: its outbox's last emitted entry has it
            for i in good.tolist():
                label = outbox_label(decode_outbox(raws[i]))
                out.last_label[i] = -1 if label is None else label
        if fmt.lineage:
            out.start_offset[good] = hdr["start_offset"][ok]
            out.last_offset[good] = hdr["last_offset"][ok]
            out.last_ts[good] = hdr["last_ts"][ok]
        for w, dtype in ((4, "<f4"), (2, "<f2")):
            sel = ok & ~ended & (width == w)
            if sel.any():
                end = hsize + layers * hidden * w
                hb = np.ascontiguousarray(buf[sel, hsize:end])
                out.h[rows[sel]] = hb.view(dtype).reshape(-1, layers, hidden)
                if fmt.first_seen:
                    fb = np.ascontiguousarray(buf[sel, end:end + 4 * num_labels])
                    out.first[rows[sel]] = fb.view("<u4").reshape(-1, num_labels)
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
                 compute_dtype: str = "float32", cuda_graphs: bool = True,
                 output: OutputPolicy = OutputPolicy(), model_id: str = "",
                 max_seq_gap: int = 1000, keyed: bool = True) -> None:
        self.stepper = Stepper(model, device, compute_dtype, cuda_graphs=cuda_graphs)
        self.max_seq_gap = max_seq_gap  # GRU_LIMITS__MAX_SEQ_GAP
        # A session's records share one partition (GRU_LIMITS__REQUIRE_KEY): one at or before
        # the offset of its last applied message is a redelivery, whatever its seq says.
        self.keyed = keyed
        self.output, self.model_id = output, model_id
        self.device = self.stepper.device
        self._pinned: torch.Tensor | None = None
        self.state_f16 = state_dtype == "float16"
        self.ttl_ms, self.end_ttl_ms = ttl_ms, end_ttl_ms
        c = model.config
        self.layers, self.hidden, self.num_labels = c.num_layers, c.state_size, c.num_labels

    def apply(self, messages: Sequence[TokenMessage], loaded: Mapping[str, bytes | None],
              continuity: Mapping[TopicPartition, Continuity] | None = None) -> BatchResult:
        """Apply ``messages`` to the ``loaded`` values of their sessions. ``continuity``: per
        partition, what recovery knows of records its states never applied (``Continuity``)."""
        result = BatchResult()
        by_session: dict[str, list[int]] = {}
        for i, m in enumerate(messages):
            by_session.setdefault(m.session_id, []).append(i)
        sids = list(by_session)
        raws = [loaded.get(s) for s in sids]
        st = decode_states(raws, self.layers, self.hidden, self.num_labels)
        plan = _Plan()
        gaps = continuity or {}

        # Decide, per session and in order, what each message does (the one Python loop, on
        # plain lists: numpy scalars cost ten times as much to touch one at a time).
        c_exists, c_last, c_seqk = st.exists.tolist(), st.last_pos.tolist(), st.seq_kind.tolist()
        c_tokens, c_msgs = st.tokens.tolist(), st.messages.tolist()
        c_ended, c_partial = st.ended.tolist(), st.partial.tolist()
        c_start, c_loff, c_lts = (st.start_offset.tolist(), st.last_offset.tolist(),
                                  st.last_ts.tolist())
        SEQK, OFFK = PosKind.SEQ, PosKind.OFFSET
        ttl, end_ttl, max_gap = self.ttl_ms, self.end_ttl_ms, self.max_seq_gap
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
            start_offset = c_start[k] if live else -1
            last_ts = c_lts[k] if exists else -1
            last_offset = c_loff[k] if exists and self.keyed else -1
            conv_start = c_start[k] if exists else -1  # its conversation's first offset
            gap = gaps.get(_tp(messages[idx[0]]), NO_GAP)
            if exists and c_loff[k] < gap.restart_below:
                # written before records the log no longer holds and the store never
                # applied: begins again from what the log holds (a suffix, partial)
                exists = live = partial = False
                last_pos = kind = None
                tokens = count = 0
                start_offset = last_ts = last_offset = conv_start = -1
            # whether skipped records may lie between the stored state and its next message
            check_skip = live and not partial and c_loff[k] >= 0 and bool(gap.skips)
            outbox: dict[int, OutboxEntry] | None = None  # decoded on the first duplicate
            carried: list[int] = []  # positions re-emitted from the outbox in this batch
            planned: dict[int, TokenMessage] = {}  # position -> the message applied in it
            start = len(plan.msg)
            for i in idx:
                m = messages[i]
                ts = m.record.timestamp_ms
                if exists and last_ts >= 0 and ts is not None and ts - last_ts > (
                        ttl if live else end_ttl):
                    # expired in event time: the state, or an ended session's tombstone, is
                    # gone for this message (the key may outlive it in the store)
                    exists = live = partial = False
                    last_pos = kind = None
                    tokens = count = 0
                    start_offset = last_offset = conv_start = -1
                    outbox, carried = {}, []
                    check_skip = False
                pos = m.seq if m.seq is not None else m.record.offset
                m_kind = SEQK if m.seq is not None else OFFK
                if m.record.offset <= last_offset:
                    # redelivered (a crash before the commit): applied or refused before. Its
                    # position may have been reused since by a new conversation in the same
                    # batch, so the outbox answers only for the same content.
                    if kind is not None and m_kind != kind and 0 <= conv_start <= m.record.offset:
                        # inside the stored conversation, which never changed its numbering:
                        # refused then, its dead letter perhaps never acknowledged; again
                        result.rejections.append(Rejection(m.record, _mixed(sid, kind, m), sid))
                        continue
                    if outbox is None:
                        raw = raws[k]
                        outbox = {e.position: e for e in decode_outbox(raw)} if raw else {}
                    entry = outbox.get(pos)
                    result.duplicates.append(m)
                    if entry is not None and entry.digest == _digest(m) and not entry.suppressed:
                        result.replayed.append(Prediction(
                            sid, entry.seq, entry.probs, entry.tokens_seen, entry.final,
                            m.record, replayed=True,
                            partial=c_partial[k] if entry.partial is None else entry.partial,
                            model_id=self.model_id))
                        if len(plan.msg) == start and pos not in carried:
                            carried.append(pos)
                    continue
                if kind is not None and m_kind != kind:
                    result.rejections.append(Rejection(m.record, _mixed(sid, kind, m), sid))
                    continue
                if kind is SEQK and pos - last_pos > max_gap:
                    # a producer chooses seq: one record must not move a session (or an
                    # ended one's tombstone) so far ahead that its own next messages become
                    # duplicates for as long as the state lives
                    result.rejections.append(Rejection(m.record, (
                        f"seq {pos} of session {sid!r} jumps {pos - last_pos} past its last "
                        f"position {last_pos}, more than max_seq_gap={max_gap} "
                        f"(GRU_LIMITS__MAX_SEQ_GAP); nothing was applied. Number a session's "
                        f"messages one after another"), sid))
                    continue
                if last_pos is not None and pos <= last_pos and pos in planned:
                    # the same position earlier in this batch: its prediction is produced
                    if _digest(planned[pos]) != _digest(m):
                        result.rejections.append(Rejection(m.record, (
                            f"session {sid!r} already applied position {pos} with other "
                            f"tokens in this batch: a reused session id or seq"), sid))
                    else:
                        result.duplicates.append(m)
                    continue
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
                    if entry is not None and not entry.suppressed:
                        result.replayed.append(Prediction(
                            sid, entry.seq, entry.probs, entry.tokens_seen, entry.final,
                            m.record, replayed=True,
                            partial=c_partial[k] if entry.partial is None else entry.partial,
                            model_id=self.model_id))
                        if len(plan.msg) == start and pos not in carried:
                            carried.append(pos)  # kept in the outbox until acknowledged
                    continue
                if check_skip:
                    # the first message applied to the stored state: the group skipped
                    # records between the two, where the session may have lost messages,
                    # unless its seq goes on without a gap
                    check_skip = False
                    if gap.skipped_between(c_loff[k], m.record.offset):
                        partial = not (kind == SEQK and m.seq == last_pos + 1)
                reset = not live
                if reset:
                    tokens = count = 0
                    start_offset = conv_start = m.record.offset
                    # No state at all (not even an ended session's tombstone; or it expired
                    # earlier in this batch) and a seq past 0: the session's beginning was
                    # never applied here (expired, or lost by Redis and deleted from the log).
                    partial = not exists and m.seq is not None and m.seq > 0
                    if partial:
                        result.partial_sessions.add(sid)
                tokens += len(m.token_ids)
                if reset:
                    planned.clear()
                planned[pos] = m  # its digest only if the position comes again
                plan.step(i, reset, m.seq if m.seq is not None else count, tokens, count + 1,
                          partial, start_offset)
                count += 1
                last_pos, kind, live, exists = pos, m_kind, not m.end, True
                last_ts = ts if ts is not None else -1
                last_offset = m.record.offset if self.keyed else -1
            n = len(plan.msg) - start
            if not n and exists and c_exists[k]:
                # nothing new (a redelivery): the stored value goes on as it is; a lineage
                # that lost the note of its write (a crash before the checkpoint) gets it
                expires = c_lts[k] + (end_ttl if c_ended[k] else ttl) if c_lts[k] >= 0 else -1
                result.kept.append((sid, _tp(messages[idx[0]]), c_start[k], expires))
            if n:
                if n + len(carried) > MAX_OUTBOX:
                    raise ValueError(f"session {sid!r} has {n} messages in one batch; an "
                                     f"outbox holds at most {MAX_OUTBOX}")
                plan.row(k, start, n, [outbox[p] for p in carried] if carried else [])
        if plan.rows:
            self._run(messages, sids, st, plan, result)
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

    def _advance(self, flat: np.ndarray, lengths: np.ndarray, segment: np.ndarray,
                 first_step: np.ndarray, h0: np.ndarray
                 ) -> tuple[torch.Tensor, np.ndarray, int]:
        """Run every segment through its tokens from ``h0`` (S, L, H): the new states
        (L, S, H) on the device, the probabilities after each step (message) and the longest
        segment's tokens.

        Segments are grouped: one-message segments by a power-of-two bucket of their length up
        to UNROLL_MAX_TOKENS, each bucket one ``Stepper.step`` (CUDA graphs; padding at most
        doubles a group's work); segments of several messages up to UNROLL_MAX_TOKENS tokens
        in one group, whatever their lengths, which ``advance`` runs longest first, each token
        step over the rows that still have a token (so the group costs its tokens, in as few
        and as wide calls as the longest segment allows); and the longer ones in one group that
        ``advance`` runs packed. A segment of several messages is read at each message's end:
        one pass over its tokens, not a step per message. No call pads more than
        WINDOW_TOKENS tokens."""
        n_steps, S = len(lengths), len(first_step)
        tok_end = np.cumsum(lengths)
        seg_begin = tok_end[first_step] - lengths[first_step]  # its first token in ``flat``
        seg_len = np.add.reduceat(lengths, first_step)
        seg_steps = np.diff(np.append(first_step, n_steps))
        read_at = tok_end - seg_begin[segment]  # tokens of its segment through each step
        width = np.maximum(seg_len, 1)
        single = seg_steps == 1
        bucket = np.where(seg_len > UNROLL_MAX_TOKENS, 0,  # 0: long
                          np.where(single, 1 << np.ceil(np.log2(width)).astype(np.int64),
                                   UNROLL_MAX_TOKENS))
        key = bucket * 2 + single
        dev = self.device
        h = self._to_device(h0).transpose(0, 1).contiguous()  # (L, S, H)
        h_new = torch.empty_like(h)
        probs = np.empty((n_steps, self.num_labels), np.float32)
        flat_t = torch.from_numpy(flat)
        for k in np.unique(key).tolist():
            group = np.flatnonzero(key == k)
            K, single = k // 2, bool(k % 2)
            per_call = len(group) if not K else max(1, WINDOW_TOKENS // K)
            for c in range(0, len(group), per_call):
                segs = group[c:c + per_call]
                segs_t = torch.from_numpy(segs).to(dev)
                lens = seg_len[segs]
                if K and single:
                    kmax = max(int(lens.max()), 1)  # a group of empty closing messages: 1
                    pos = seg_begin[segs][:, None] + np.arange(kmax)[None, :]
                    real = np.arange(kmax)[None, :] < lens[:, None]
                    ids = np.zeros(real.shape, np.int64)
                    ids[real] = flat[pos[real]]
                    hn, p = self.stepper.step(h.index_select(1, segs_t),
                                              torch.from_numpy(ids).to(dev),
                                              torch.from_numpy(lens).to(dev))
                    steps = first_step[segs]
                else:
                    toks = _ranges(seg_begin[segs], lens)
                    steps = _ranges(first_step[segs], seg_steps[segs])
                    local = np.repeat(np.arange(len(segs)), seg_steps[segs])
                    hn, p = self.stepper.advance(h.index_select(1, segs_t),
                                                 flat_t[torch.from_numpy(toks)].to(dev),
                                                 torch.from_numpy(lens), torch.from_numpy(local),
                                                 torch.from_numpy(read_at[steps]))
                h_new.index_copy_(1, segs_t, hn)
                probs[steps] = p.cpu().numpy()
        return h_new, probs, int(seg_len.max()) if S else 0

    @torch.inference_mode()
    def _run(self, messages: Sequence[TokenMessage], sids: list[str], st: _Loaded, plan: "_Plan",
             result: BatchResult) -> None:
        t0 = time.perf_counter()
        n_steps, P = len(plan.msg), len(plan.rows)
        msgs = [messages[i] for i in plan.msg]
        lengths = np.fromiter(map(len, (m.token_ids for m in msgs)), np.int64, n_steps)
        flat = np.fromiter(itertools.chain.from_iterable(m.token_ids for m in msgs), np.int64,
                           int(lengths.sum()))
        ends = np.fromiter((m.end for m in msgs), bool, n_steps)
        digests = token_digests(flat, lengths, ends)
        # A plan row's steps are contiguous: step i is the r-th new message of row p.
        starts = np.asarray(plan.row_start, np.int64)
        counts = np.asarray(plan.row_count, np.int64)
        step_row = np.repeat(np.arange(P), counts)
        rows_idx = np.asarray(plan.rows)
        resets = np.asarray(plan.reset, bool)
        # A *segment* is a run of steps sharing one session state: a row, split where an
        # ended session's id begins a new conversation. Each runs as one token sequence.
        seg_start = resets.copy()
        seg_start[starts] = True
        segment = np.cumsum(seg_start) - 1
        first_step = np.flatnonzero(seg_start)
        continues = ~resets[first_step]  # the segment goes on from a stored live state
        stored = rows_idx[step_row[first_step]]
        h0 = np.where(continues[:, None, None], st.h[stored], 0.0).astype(np.float32)
        h_seg, probs, result.longest = self._advance(flat, lengths, segment, first_step, h0)
        last = starts + counts - 1
        row_seg = segment[last]
        h_out = h_seg.index_select(1, torch.from_numpy(row_seg).to(self.device))
        h_out = h_out.transpose(0, 1).cpu().numpy()  # (P, L, H)
        result.step_seconds = time.perf_counter() - t0

        # Output decisions and label statistics, per segment.
        label = probs.argmax(axis=1)
        confidence = probs[np.arange(n_steps), label]
        init_label = np.where(continues, st.last_label[stored], -1)
        decisions = decide(self.output, label, confidence, ends, segment, init_label)
        # First-seen token counts per (segment, label); 0 (not yet) compares as never.
        never = np.int64(2**62)
        first = np.where(continues[:, None], st.first[stored], 0)
        first = np.where(first == 0, never, first)
        seen = np.asarray(plan.seen, np.int64)
        np.minimum.at(first, (segment, label), seen)
        first_reached = np.where(ends, first[segment, label], 0)

        seq = np.asarray(plan.seq, np.int64)
        partial = np.asarray(plan.partial, bool)
        seq_given = np.fromiter((m.seq is not None for m in msgs), bool, n_steps)
        offsets = np.fromiter((m.record.offset for m in msgs), np.int64, n_steps)
        stamps = np.fromiter((-1 if m.record.timestamp_ms is None else m.record.timestamp_ms
                              for m in msgs), np.int64, n_steps)
        positions = np.where(seq_given, seq, offsets)
        table = StepTable([m.session_id for m in msgs], [m.record for m in msgs], seq, seen,
                          ends, partial, probs, label, confidence, decisions.emit,
                          decisions.confident, first_reached, self.model_id)
        rows = _Rows(
            last=last, counts=counts, h=h_out, label=decisions.last_label[row_seg],
            first=np.where(first[row_seg] == never, 0, np.minimum(first[row_seg], SEEN_MAX)),
            start_offset=np.asarray(plan.start_offset, np.int64)[last],
            carried=plan.carried)
        steps = _Steps(positions=positions, seq=seq, seen=seen,
                       count=np.asarray(plan.count, np.int64), ends=ends, partial=partial,
                       digests=digests, seq_given=seq_given, probs=probs, emit=decisions.emit,
                       offsets=offsets, stamps=stamps)
        values = self._encode(rows, steps)
        tokens = np.add.reduceat(lengths, starts).tolist()
        new_pos, ended = positions[last].tolist(), ends[last].tolist()
        exists, old_pos = st.exists[rows_idx].tolist(), st.last_pos[rows_idx].tolist()
        started = resets[starts].tolist()
        first_offset, last_ts = rows.start_offset.tolist(), stamps[last].tolist()
        ttl, end_ttl = self.ttl_ms, self.end_ttl_ms
        for p in range(P):
            lrec = msgs[last[p]].record
            result.updates.append(SessionUpdate(
                sids[plan.rows[p]], (lrec.topic, lrec.partition),
                old_pos[p] if exists[p] else None, new_pos[p], values[p],
                end_ttl if ended[p] else ttl, table,
                list(range(plan.row_start[p], plan.row_start[p] + plan.row_count[p])),
                started[p], tokens[p], start_offset=first_offset[p], last_ts=last_ts[p],
                ended=ended[p], replaces=exists[p] and new_pos[p] <= old_pos[p]))

    def _encode(self, rows: "_Rows", steps: "_Steps") -> list[bytes]:
        """The new state values, one structured array per layout (ended or not, outbox size);
        outbox entries carried from the stored value (re-emitted, not yet acknowledged) go
        first in their session's outbox."""
        L, H, C = self.layers, self.hidden, self.num_labels
        last, counts = rows.last, rows.counts
        ended = steps.ends[last]
        flags = ((F16 if self.state_f16 else 0) | np.where(steps.seq_given[last], SEQ, 0)
                 | np.where(ended, ENDED, 0)
                 | np.where(steps.partial[last], PARTIAL, 0)).astype(np.uint8)
        starts = last - counts + 1
        values: list[bytes] = [b""] * len(last)
        layout = ended.astype(np.int64) * (MAX_OUTBOX + 1) + counts
        for key in np.unique(layout).tolist():
            sel = np.flatnonzero(layout == key)
            is_ended, n = key > MAX_OUTBOX, key % (MAX_OUTBOX + 1)
            dt = value_dtype(0 if is_ended else L, H, C, n, self.state_f16)
            arr = np.zeros(len(sel), dt)
            hdr = arr["hdr"]
            hdr["magic"] = MAGIC
            hdr["flags"] = flags[sel]
            if not is_ended:
                hdr["layers"], hdr["hidden"] = L, H
                arr["h"] = rows.h[sel]
                arr["first"] = rows.first[sel]
            hdr["labels"] = C
            hdr["last_label"] = np.where(rows.label[sel] < 0, NO_LABEL, rows.label[sel])
            hdr["n_out"] = n
            li = last[sel]
            hdr["last_pos"] = steps.positions[li]
            hdr["tokens"] = steps.seen[li]
            hdr["messages"] = steps.count[li]
            hdr["start_offset"] = rows.start_offset[sel]
            hdr["last_offset"] = steps.offsets[li]
            hdr["last_ts"] = steps.stamps[li]
            at = starts[sel][:, None] + np.arange(n)[None, :]  # (G, n)
            out = arr["out"]
            out["position"] = steps.positions[at]
            out["seq"] = steps.seq[at]
            out["seen"] = steps.seen[at]
            out["marks"] = (np.where(steps.ends[at], OUT_FINAL, 0)
                            | np.where(steps.emit[at], 0, OUT_SUPPRESSED)
                            | np.where(steps.partial[at], OUT_PARTIAL, 0))
            out["digest"] = steps.digests[at]
            out["probs"] = steps.probs[at]
            raw = arr.tobytes()
            size = dt.itemsize
            for j, p in enumerate(sel.tolist()):
                values[p] = raw[j * size:(j + 1) * size]
        for p, entries in rows.carried.items():
            values[p] = with_carried(values[p], entries, C)
        return values


class Continuity(NamedTuple):
    """What recovery knows of one partition's records its states never applied.
    ``skips``: ``[first, end)`` ranges an operator moved the group past: a live session whose
    next message lies past a skipped range that began after its last write may have lost
    messages there, and continues marked partial unless its ``seq`` shows it lost none.
    ``restart_below``: Redis lost writes whose records retention has since deleted, up to
    this offset: a session last written below it begins again from what the log holds."""

    skips: tuple[tuple[int, int], ...] = ()
    restart_below: int = -1

    def skipped_between(self, last: int, offset: int) -> bool:
        """Whether records after offset ``last`` and before ``offset`` were skipped."""
        return any(a < offset and b - 1 > last for a, b in self.skips)


NO_GAP = Continuity()


@dataclass(slots=True)
class _Plan:
    """What ``apply`` decided, as columns: one entry per new message (step), and per session
    with new messages (row) where its steps begin, how many, and what its outbox carries."""

    msg: list[int] = field(default_factory=list)  # index into the batch's messages
    reset: list[bool] = field(default_factory=list)  # begins a new session state
    seq: list[int] = field(default_factory=list)  # the seq reported
    seen: list[int] = field(default_factory=list)  # tokens seen after it
    count: list[int] = field(default_factory=list)  # messages applied after it
    partial: list[bool] = field(default_factory=list)
    start_offset: list[int] = field(default_factory=list)  # its session's first offset
    rows: list[int] = field(default_factory=list)  # session index of each row
    row_start: list[int] = field(default_factory=list)
    row_count: list[int] = field(default_factory=list)
    carried: dict[int, list[OutboxEntry]] = field(default_factory=dict)  # row -> entries

    def step(self, msg: int, reset: bool, seq: int, seen: int, count: int, partial: bool,
             start_offset: int) -> None:
        self.msg.append(msg)
        self.reset.append(reset)
        self.seq.append(seq)
        self.seen.append(seen)
        self.count.append(count)
        self.partial.append(partial)
        self.start_offset.append(start_offset)

    def row(self, session: int, start: int, count: int, carried: list[OutboxEntry]) -> None:
        if carried:
            self.carried[len(self.rows)] = carried
        self.rows.append(session)
        self.row_start.append(start)
        self.row_count.append(count)


@dataclass(slots=True)
class _Rows:
    """Per row (session written): what its new value's header and state hold."""

    last: np.ndarray  # its last step
    counts: np.ndarray  # its steps
    h: np.ndarray  # (P, L, H) the new state
    label: np.ndarray  # the last label emitted, -1: none
    first: np.ndarray  # (P, C) first-seen token counts
    start_offset: np.ndarray  # the session's first offset
    carried: dict[int, list[OutboxEntry]]


@dataclass(slots=True)
class _Steps:
    """Per step (new message applied): what its outbox entry and the header hold."""

    positions: np.ndarray
    seq: np.ndarray
    seen: np.ndarray
    count: np.ndarray
    ends: np.ndarray
    partial: np.ndarray
    digests: np.ndarray
    seq_given: np.ndarray
    probs: np.ndarray
    emit: np.ndarray
    offsets: np.ndarray
    stamps: np.ndarray


def _ranges(begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The indices ``begin[i] .. begin[i] + length[i] - 1`` for every i, back to back."""
    total = int(length.sum())
    before = np.zeros(len(length), np.int64)
    np.cumsum(length[:-1], out=before[1:])
    return np.repeat(begin - before, length) + np.arange(total)


def _tp(m: TokenMessage) -> TopicPartition:
    return (m.record.topic, m.record.partition)


def _mixed(sid: str, kind: PosKind, m: TokenMessage) -> str:
    return (f"session {sid!r} is numbered by {kind.name.lower()}, but this message "
            f"{'has' if m.seq is not None else 'has no'} seq; a session must not mix the two")


def _digest(m: TokenMessage) -> int:
    return int(token_digests(np.asarray(m.token_ids, np.int64), np.array([len(m.token_ids)]),
                             np.array([m.end]))[0])
