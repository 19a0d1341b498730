"""The offline oracle: what the worker should have done with the input, and the invariants.

An *ideal processor* reads each input partition once, in order, and applies the contract
(README, "Message contract") with the intended semantics of issue 24: a session's state
expires when the gap between the record timestamps of two of its messages exceeds the TTL
(an ended session's tombstone, END_TTL); a conversation stays on the model that began it;
each record is validated by the model that serves its session; an ``end`` with no tokens
ends the session; records an operator skipped are gone. It splits each session into
*conversations* (runs of messages sharing one state) and runs the model over each offline.

Then, on what the run left (output and dead-letter topics, the store, the group):

1. every live session's stored state holds its applied tokens exactly once, in order;
2. every input message was answered at least once: a prediction, a suppression by the emit
   policy, or a dead letter;
3. every prediction equals the oracle of the model that began its conversation on the tokens
   up to its message, and says ``"partial"`` exactly when the conversation's start is gone
   from the log (deleted by retention before a rebuild could read it; skipped by an operator;
   or a session first seen at a seq past 0);
4. no partition stalls (reported by the run itself).

A prediction may legitimately cover only a suffix of its conversation: when the messages
before it were deleted by retention by the time it was produced. Its ``tokens_seen`` says
which suffix; anything else must cover the whole conversation.

One thing the log cannot tell a rebuild: which model began a conversation whose first message
the rebuild finds at or past the rollout's offset with a seq past 0 (or, numbered by offsets,
past its deleted beginning), once retention deleted records (a retention shorter than the
retention rule of docs/reliability.md). Its beginning may lie in the deleted records, before
the rollout (the previous model) or after it (the current one), or nowhere (a session first
seen past seq 0): the worker decides by a rule of thumb (worker/models.py, ``RolloutStart``).
Such a conversation (``Conversation.alt``) may be served by the other model from the first
Redis fault that may have made a rebuild take it up: its predictions and its state are then
checked against that model over what the log held (the same rules otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.tokenizer import tokenize
from worker.codec import StateCorrupt, decode_state
from worker.ports import Record

from .clock import EPOCH
from .models import LABELS, SimModel, model_pair
from .trace import Trace, Violation
from .wiring import DLQ, INPUT, OUTPUT
from .workload import END_TTL_S, MARGIN_S, TTL_S

TOL = 1e-5
TIE = 1e-4  # a top-label margin (or a confidence this close to the minimum) is a coin toss


@dataclass(eq=False)
class Msg:
    record: Record
    ids: list[int]
    seq: int | None
    end: bool


@dataclass(eq=False)
class Conversation:
    session: str
    partition: int
    model: SimModel
    numbered: bool
    partial_start: bool  # began at a seq past 0 with nothing stored: every answer "partial"
    either_start: bool  # began at a seq past 0 right after a live tombstone: either context
    msgs: list[Msg] = field(default_factory=list)
    last_ts: int = 0
    ended: bool = False
    skipped_from: int | None = None  # an operator skipped one of its messages before this one
    skipped_seqs: set = field(default_factory=set)  # the seqs of those messages
    skip_live_from: int | None = None  # it was live when an operator skipped records
    results: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    emits: list[bool | None] = field(default_factory=list)
    cumulative: list[int] = field(default_factory=list)  # tokens seen after each message
    # the other model a rebuild may have taken it up with (module docstring), from when
    alt: SimModel | None = None
    alt_from: float = float("inf")
    alt_ids: list[list[int] | None] = field(default_factory=list)  # per message (alt's)

    @property
    def last_pos(self) -> int:
        m = self.msgs[-1]
        return m.seq if m.seq is not None else m.record.offset

    def position(self, i: int) -> int:
        m = self.msgs[i]
        return m.seq if m.seq is not None else m.record.offset

    def describe(self) -> str:
        return (f"{self.session} (partition {self.partition}, {len(self.msgs)} messages from "
                f"offset {self.msgs[0].record.offset}, model {self.model.model_id})")


@dataclass
class Expect:
    kind: str  # "apply" | "duplicate" | "dead" | "skipped" | "any"
    conv: Conversation | None = None
    index: int = -1
    reason: str = ""


def _run_messages(model: SimModel, ids: Sequence[list[int] | None]
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``model`` over a conversation's messages, one result per message: a message with no
    tokens (an end with none) keeps the result before it."""
    steps = iter(model.run([x for x in ids if x]))
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for x in ids:
        out.append(next(steps) if x else out[-1])
    return out


def _body(value: bytes | None) -> dict | None:
    try:
        body = json.loads(value) if value is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


class Ideal:
    """The ideal processor over the run's input (see the module docstring)."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.cfg = trace.scenario.config
        self.old, self.new = model_pair(self.cfg.model_seed)
        self.expect: dict[tuple[int, int], Expect] = {}
        self.convs: list[Conversation] = []
        self.final: dict[str, Conversation] = {}  # each session's last conversation
        self.hostile: dict[tuple[int, int], str] = {}
        for send, rec in trace.sent:
            if send.hostile and send.hostile != "mixed numbering":
                self.hostile[(rec.partition, rec.offset)] = send.hostile
        for p, part in enumerate(trace.broker.topic(INPUT)):
            self._partition(p, part.records)
        for c in self.convs:
            self._ambiguous(c)
            self._offline(c)

    def _current(self, p: int, offset: int) -> SimModel:
        ro = self.trace.rollout_offsets
        return self.old if ro is None or offset < ro[p] else self.new

    def _partition(self, p: int, records: Sequence[Record]) -> None:
        skipped = {o: s for s in self.trace.skips if s.partition == p
                   for o in range(s.start, s.end)}
        state: dict[str, Conversation] = {}
        for r in records:
            key = (p, r.offset)
            skip = skipped.get(r.offset)
            if skip is not None:
                self.expect[key] = Expect("skipped")
                if r.offset == skip.start:  # every live conversation may now say "partial"
                    for c in state.values():
                        if not c.ended and c.skip_live_from is None:
                            c.skip_live_from = len(c.msgs)
                body = _body(r.value)
                c = state.get(body.get("session_id")) if body else None  # type: ignore[arg-type]
                if c is not None and not c.ended and self._would_apply(c, r, body, key):
                    if c.skipped_from is None:
                        c.skipped_from = len(c.msgs)
                    c.skipped_seqs.add(body.get("seq"))
                continue
            if key in self.hostile:
                self.expect[key] = Expect("dead", reason=self.hostile[key])
                continue
            body = _body(r.value)
            assert body is not None, f"record {key} is neither hostile nor JSON"
            sid, seq, end = body["session_id"], body.get("seq"), bool(body.get("end"))
            c = state.get(sid)
            ts = r.timestamp_ms or 0
            if c is not None and ts - c.last_ts > (END_TTL_S if c.ended else TTL_S) * 1000:
                c = None  # expired
            pos = seq if seq is not None else r.offset
            # the model that serves it: its live conversation's; a tombstone's for a replayed
            # position (worker/models.py, "split"); else the current one
            served = c is not None and (not c.ended or pos <= c.last_pos)
            ids = self._ids(body, c.model if served and c is not None else
                            self._current(p, r.offset))
            if ids is None:
                self.expect[key] = Expect("dead", reason="token ids out of range")
                continue
            if c is not None and c.numbered != (seq is not None):
                self.expect[key] = Expect("dead", reason="mixed numbering")
                continue
            if c is not None and pos <= c.last_pos:
                original = next((i for i in range(len(c.msgs)) if c.position(i) == pos), None)
                same = original is not None and (c.msgs[original].ids, c.msgs[original].end) == (
                    ids, end)
                # a reused position with other content: dead-lettered while the original is in
                # the outbox (its digest differs), else counted a duplicate (README, contract)
                self.expect[key] = Expect("duplicate", c, original) if same else Expect("any")
                continue
            if c is None or c.ended:
                if not ids and end:  # an end with no tokens and nothing to end
                    self.expect[key] = Expect("any")
                    continue
                c_new = Conversation(sid, p, self._current(p, r.offset), seq is not None,
                                     partial_start=c is None and bool(seq),
                                     either_start=c is not None and bool(seq))
                self.convs.append(c_new)
                state[sid] = self.final[sid] = c = c_new
            if c.skipped_from == len(c.msgs) and seq is not None and seq == c.last_pos + 1:
                # the first message after the skip follows the last one without a gap: by
                # the documented rule (docs/reliability.md, "At a claim" 1) the worker takes
                # it for one that lost nothing there. What it lost can only be an end (its
                # seq is past this one) after which the id began again from 0: invisible to
                # it, so either context is right
                c.skip_live_from = min(c.skip_live_from or c.skipped_from, c.skipped_from)
                c.skipped_from = None
                c.skipped_seqs.clear()
            if seq is not None and seq in c.skipped_seqs:
                # a copy of a skipped message came through (a producer's retry): nothing of
                # the conversation is lost once every skipped one did; partial stays allowed
                c.skipped_seqs.discard(seq)
                if not c.skipped_seqs and c.skipped_from is not None:
                    c.skip_live_from = min(c.skip_live_from or c.skipped_from, c.skipped_from)
                    c.skipped_from = None
            c.msgs.append(Msg(r, ids, seq, end))
            c.last_ts, c.ended = ts, end
            self.expect[key] = Expect("apply", c, len(c.msgs) - 1)

    def _would_apply(self, c: Conversation, r: Record, body: dict | None,
                     key: tuple[int, int]) -> bool:
        """Whether a skipped record would have gone on live conversation ``c``: one that
        would have been dead-lettered (hostile, or mixed numbering), counted a duplicate or a
        reused position (at or before its last), or begun another conversation (past the TTL)
        took nothing from it."""
        if body is None or key in self.hostile:
            return False
        seq = body.get("seq")
        if c.numbered != (seq is not None):
            return False
        if (r.timestamp_ms or 0) - c.last_ts > TTL_S * 1000:
            return False
        return (seq if seq is not None else r.offset) > c.last_pos

    def _ambiguous(self, c: Conversation) -> None:
        """Whether a rebuild may have taken ``c`` up with the other model (module docstring):
        sets ``c.alt`` (and from when, and its token ids under it) if so."""
        ro = self.trace.rollout_offsets
        if ro is None:
            return
        rollout = ro[c.partition]
        part = self.trace.broker.topic(INPUT)[c.partition]
        log_start = part.log_start_at(self.trace.end)  # at the latest: lenient, not strict
        if log_start == 0:
            return
        first = next((k for k, m in enumerate(c.msgs) if m.record.offset >= log_start), None)
        if first is None or c.msgs[first].record.offset < rollout:
            return  # wholly deleted, or found before the rollout: the previous model's
        m = c.msgs[first]
        if c.model is self.old:
            if first == 0:
                return  # began before the rollout and found there: the previous model's
        elif m.seq == 0 or (m.seq is None and first == 0):
            return  # found at its beginning after the rollout: the current model's
        t0, t1 = self._ms_to_t(c.msgs[0].record), self._ms_to_t(c.msgs[-1].record)
        faults = sorted(f.at for f in self.trace.scenario.faults
                        if f.kind in ("redis_loss", "redis_rollback") and t0 < f.at <= t1 + TTL_S)
        if not faults:
            return  # no rebuild took it up: the worker knew
        alt = self.new if c.model is self.old else self.old
        ids = [None] * first + [self._ids(_body(x.record.value) or {}, alt)
                                for x in c.msgs[first:]]
        if any(x is None or len(x) != len(y.ids) for x, y in zip(ids[first:], c.msgs[first:])):
            return  # the other model refuses some of it: it cannot have served it
        c.alt, c.alt_from, c.alt_ids = alt, max(faults[0], self.cfg.rollout_at or 0.0), ids

    @staticmethod
    def _ids(body: dict, model: SimModel) -> list[int] | None:
        if "token_ids" in body:
            ids = list(body["token_ids"])
            return ids if all(0 <= t < model.vocab_size for t in ids) else None
        if "tokens" in body:
            return model.encode(body["tokens"])
        return model.encode(tokenize(body["text"]))

    def _offline(self, c: Conversation) -> None:
        c.results = _run_messages(c.model, [m.ids for m in c.msgs])
        seen = 0
        for m in c.msgs:
            seen += len(m.ids)
            c.cumulative.append(seen)
        self._decide(c)

    def _decide(self, c: Conversation) -> None:
        """The emit policy over the conversation's whole history (worker/output.py); where
        another model may have served it from its beginning, only what both decide alike."""
        c.emits = self._decisions(c.msgs, c.results)
        if c.alt is not None and c.alt_ids[0] is not None:
            other = self._decisions(c.msgs, _run_messages(c.alt, c.alt_ids))
            c.emits = [a if a == b else None for a, b in zip(c.emits, other)]

    def _decisions(self, msgs: list[Msg], results: list[tuple[np.ndarray, np.ndarray]]
                   ) -> list[bool | None]:
        emit, floor = self.cfg.emit, self.cfg.min_confidence
        prev = -1
        unsure = False
        up = self.trace.upgraded_at
        emits: list[bool | None] = []
        for i, (m, (_, probs)) in enumerate(zip(msgs, results)):
            if unsure:
                emits.append(None)
                continue
            order = np.argsort(probs)
            label, conf = int(order[-1]), float(probs[order[-1]])
            tie = floor > 0 and abs(conf - floor) < TIE  # the floor decides by a hair
            confident = conf >= floor
            if emit == "every":
                e: bool | None = confident
            elif emit == "final":
                e = confident and m.end
            else:
                e = confident and label != prev
                if confident:
                    prev = label
                # GRS2 holds no last label: its outbox tells it only when its last entries were
                # emitted (the simulator's downgrade keeps suppressed ones, which no GRS2
                # writer made), so after an upgrade the decisions are not predictable here
                tie = tie or probs[order[-1]] - probs[order[-2]] < TIE  # the label, by a hair
                unsure = tie or (up is not None and self._ms_to_t(m.record) > up)
                tie = unsure
            emits.append(None if tie else e)
        return emits

    @staticmethod
    def _ms_to_t(r: Record) -> float:
        return (r.timestamp_ms or 0) / 1000 - EPOCH


@dataclass
class Prediction:
    body: dict
    at: float  # when it was produced (simulated seconds)


def _outputs(trace: Trace, topic: str) -> list[Prediction]:
    out = []
    for part in trace.broker.topic(topic):
        for r in part.records:
            body = _body(r.value)
            out.append(Prediction(body or {}, (r.timestamp_ms or 0) / 1000 - EPOCH))
    return out


class Checker:
    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.ideal = Ideal(trace)
        self.violations: list[Violation] = []
        self._suffix: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}

    def fail(self, kind: str, detail: str, record: Record | tuple[int, int] | None = None
             ) -> None:
        if isinstance(record, Record):
            record = (record.partition, record.offset)
        self.violations.append(Violation(kind, detail, record))

    def deleted(self, c: Conversation, k: int, at: float) -> bool:
        """Whether message ``k`` of ``c`` had been deleted by retention at time ``at``."""
        part = self.trace.broker.topic(INPUT)[c.partition]
        return c.msgs[k].record.offset < part.log_start_at(at)

    def suffix(self, c: Conversation, j: int, alt: bool = False
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The model over messages ``j..`` of ``c`` alone (a state rebuilt from there); with
        ``alt``, the other model that a rebuild may have taken it up with."""
        got = self._suffix.get((id(c), j, alt))
        if got is None:
            model = c.alt if alt else c.model
            assert model is not None
            got = _run_messages(model, c.alt_ids[j:] if alt else [m.ids for m in c.msgs[j:]])
            self._suffix[(id(c), j, alt)] = got
        return got

    def alt_start(self, c: Conversation, i: int, tokens_seen: int, at: float) -> int | None:
        """Which suffix ``j..i`` of ``c`` the other model may have served at time ``at`` (a
        rebuild that took it up from where the log began: module docstring), by its tokens."""
        j = self.start_of(c, i, tokens_seen)
        if c.alt is None or at < c.alt_from or j is None or c.alt_ids[j] is None:
            return None
        return j if j == 0 or self.deleted(c, j - 1, at) else None

    def start_of(self, c: Conversation, i: int, tokens_seen: int) -> int | None:
        """Which suffix ``j..i`` of ``c`` has ``tokens_seen`` tokens (None: none)."""
        before = [0] + c.cumulative
        for j in range(i + 1):
            if c.cumulative[i] - before[j] == tokens_seen:
                return j
        return None

    def context_rule(self, c: Conversation, i: int, j: int, partial: bool, what: str) -> None:
        at = c.msgs[i].record
        if not c.numbered:
            return  # a session numbered by offsets cannot be told partial: either is right
        if j > 0:
            if not partial:
                self.fail("full-but-incomplete", f"{what} covers messages {j}..{i} of "
                          f"{c.describe()} (the first ones deleted) but says full", at)
            return
        required = c.partial_start or (c.skipped_from is not None and i >= c.skipped_from)
        either = c.either_start or (c.skip_live_from is not None and i >= c.skip_live_from)
        if required and not partial:
            self.fail("should-be-partial", f"{what} of {c.describe()} message {i} says full; "
                      f"its conversation's start is gone", at)
        elif partial and not required and not either:
            self.fail("partial-but-whole", f"{what} of {c.describe()} message {i} says "
                      f"partial, but its whole conversation is in the log", at)

    # --- 3: predictions ---------------------------------------------------------------------

    def prediction(self, p: Prediction, c: Conversation, i: int) -> None:
        b, m = p.body, c.msgs[i]
        what = f"prediction (seq {b.get('seq')}, offset {b.get('offset')}, t={p.at:.3f})"
        alt = c.alt is not None and b.get("model_id") == c.alt.model_id
        if alt:
            j = self.alt_start(c, i, int(b.get("tokens_seen", -1)), p.at)
            if j is not None:
                if bool(b.get("final")) != m.end:
                    self.fail("wrong-final", f"{what}: final={b.get('final')}, expected "
                              f"{m.end}", m.record)
                self.check_probs(p, c, i, j, True, what)
                return
        if b.get("model_id") != c.model.model_id:
            self.fail("wrong-model", f"{what} of {c.describe()} message {i} by model "
                      f"{b.get('model_id')}, expected {c.model.model_id}", m.record)
            return
        if bool(b.get("final")) != m.end:
            self.fail("wrong-final", f"{what}: final={b.get('final')}, expected {m.end}",
                      m.record)
        j = self.start_of(c, i, int(b.get("tokens_seen", -1)))
        if j is None:
            self.fail("wrong-tokens", f"{what} of {c.describe()} message {i}: tokens_seen="
                      f"{b.get('tokens_seen')}, expected {c.cumulative[i]}", m.record)
            return
        if j > 0 and not self.deleted(c, j - 1, p.at):
            self.fail("incomplete-with-start-in-log", f"{what} of {c.describe()} message {i} "
                      f"covers messages {j}..{i} only (tokens_seen {b['tokens_seen']} of "
                      f"{c.cumulative[i]}); message {j - 1} (offset "
                      f"{c.msgs[j - 1].record.offset}) was still in the log", m.record)
            return
        self.check_probs(p, c, i, j, False, what)

    def check_probs(self, p: Prediction, c: Conversation, i: int, j: int, alt: bool,
                    what: str) -> None:
        """A prediction of message ``i`` of ``c`` made over messages ``j..i``."""
        b, m = p.body, c.msgs[i]
        probs = (c.results if j == 0 and not alt else self.suffix(c, j, alt))[i - j][1]
        got = np.array([float(b["probs"][label]) for label in LABELS])
        diff = float(np.abs(got - probs).max())
        if diff > TOL:
            self.fail("wrong-probs", f"{what} of {c.describe()} message {i}: probs differ "
                      f"from the oracle by {diff:.3g}", m.record)
        want_seq = m.seq if m.seq is not None else i - j
        if b.get("seq") != want_seq:
            self.fail("wrong-seq", f"{what} of {c.describe()} message {i}: seq {b.get('seq')}, "
                      f"expected {want_seq}", m.record)
        self.context_rule(c, i, j, b.get("context") == "partial", what)

    # --- 1: stored states -------------------------------------------------------------------

    def states(self) -> None:
        now_ms = (EPOCH + self.trace.end) * 1000
        for sid, c in sorted(self.ideal.final.items()):
            age = now_ms - c.last_ts
            if self.deleted(c, len(c.msgs) - 1, self.trace.end):
                continue  # retention took all of it: a Redis loss cannot be rebuilt from the log
            if c.ended and age < (END_TTL_S - MARGIN_S) * 1000:
                raw = self.trace.redis.value(sid, c.model.model_id)
                st = None if raw is None else self._decode(raw, c)
                if raw is None and c.alt is not None:  # (module docstring)
                    raw = self.trace.redis.value(sid, c.alt.model_id)
                    st = None if raw is None else self._decode(raw, c, c.alt)
                if st is None or not st.ended or st.last_pos != c.last_pos:
                    self.fail("tombstone-wrong", f"{c.describe()} ended at position "
                              f"{c.last_pos}: stored {self._show(raw, st)}{self._elsewhere(c)}",
                              c.msgs[-1].record)
            elif not c.ended and age < (TTL_S - MARGIN_S) * 1000:
                self.live_state(c)

    def _decode(self, raw: bytes, c: Conversation, model: SimModel | None = None):
        model = model or c.model
        try:
            return decode_state(raw, model.layers, model.state_size, len(LABELS))
        except StateCorrupt:
            return None

    def _elsewhere(self, c: Conversation) -> str:
        """What the session's key holds under the other model, if anything."""
        for m in (self.ideal.old, self.ideal.new):
            if m is not c.model and self.trace.redis.value(c.session, m.model_id) is not None:
                return f" (but model {m.model_id} holds a value for it)"
        return ""

    @staticmethod
    def _show(raw: bytes | None, st) -> str:
        if raw is None:
            return "nothing"
        if st is None:
            return f"an unreadable value ({raw[:4]!r})"
        return (f"ended={st.ended} last_pos={st.last_pos} tokens={st.tokens_seen} "
                f"messages={st.messages} partial={st.partial}")

    def live_state(self, c: Conversation) -> None:
        raw = self.trace.redis.value(c.session, c.model.model_id)
        st = None if raw is None else self._decode(raw, c)
        what = f"the state of {c.describe()}"
        n = len(c.msgs) - 1
        alt = False
        if raw is None and c.alt is not None:  # (module docstring)
            raw_alt = self.trace.redis.value(c.session, c.alt.model_id)
            st_alt = None if raw_alt is None else self._decode(raw_alt, c, c.alt)
            if st_alt is not None and not st_alt.ended and self.alt_start(
                    c, n, st_alt.tokens_seen, self.trace.end) is not None:
                raw, st, alt = raw_alt, st_alt, True
        if st is None or st.ended:
            self.fail("state-wrong", f"{what}: stored {self._show(raw, st)}{self._elsewhere(c)}",
                      c.msgs[-1].record)
            return
        j = self.start_of(c, n, st.tokens_seen)
        if j is None:
            self.fail("state-wrong", f"{what} holds {st.tokens_seen} tokens, expected "
                      f"{c.cumulative[n]} ({self._show(raw, st)})", c.msgs[-1].record)
            return
        if j > 0 and not self.deleted(c, j - 1, self.trace.end):
            self.fail("state-incomplete-with-start-in-log", f"{what} holds messages {j}..{n} "
                      f"only; message {j - 1} is still in the log", c.msgs[-1].record)
            return
        h = (c.results if j == 0 and not alt else self.suffix(c, j, alt))[n - j][0]
        if st.messages != n + 1 - j or st.last_pos != c.last_pos:
            self.fail("state-wrong", f"{what}: {self._show(raw, st)}, expected messages "
                      f"{n + 1 - j} last_pos {c.last_pos}", c.msgs[-1].record)
        diff = float(np.abs(st.h - h).max())
        if diff > TOL:
            self.fail("state-wrong", f"{what}: h differs from the oracle by {diff:.3g}",
                      c.msgs[-1].record)
        self.context_rule(c, n, j, st.partial, "the stored state")

    # --- 2 and 3 ----------------------------------------------------------------------------

    def check(self) -> list[Violation]:
        ideal = self.ideal
        answered: set[tuple[int, int]] = set()  # (conversation id, message index)
        for p in _outputs(self.trace, OUTPUT):
            key = (p.body.get("partition"), p.body.get("offset"))
            e = ideal.expect.get(key)  # type: ignore[arg-type]
            if e is not None and e.kind == "duplicate":
                e = Expect("apply", e.conv, e.index)
            if e is None or e.kind in ("dead", "skipped"):
                self.fail("unexpected-prediction", f"a prediction for input {key} "
                          f"({e.kind if e else 'no such record'}{': ' + e.reason if e else ''})"
                          f": {p.body}", key if e is not None else None)  # type: ignore[arg-type]
                continue
            if e.kind == "any":
                continue
            assert e.conv is not None
            answered.add((id(e.conv), e.index))
            self.prediction(p, e.conv, e.index)
        dead = {(d.body.get("partition"), d.body.get("offset")): str(d.body.get("reason"))
                for d in _outputs(self.trace, DLQ)}
        for key, e in sorted(ideal.expect.items()):
            if e.kind == "dead" and key not in dead:
                self.fail("unanswered-dead-letter", f"input {key} ({e.reason}) has no dead "
                          f"letter", key)
            if e.kind in ("apply", "duplicate") and key in dead:
                c = e.conv
                assert c is not None
                self.fail("dead-lettered-valid", f"input {key}, message {e.index} of "
                          f"{c.describe()}, was dead-lettered: {dead[key]}", key)
        for c in ideal.convs:
            for i, want in enumerate(c.emits):
                got = (id(c), i) in answered
                if want is True and not got and not self._lenient(c, i):
                    key = (c.partition, c.msgs[i].record.offset)
                    if key not in dead:
                        self.fail("unanswered", f"message {i} (seq {c.msgs[i].seq}, offset "
                                  f"{c.msgs[i].record.offset}) of {c.describe()} has no "
                                  f"prediction", c.msgs[i].record)
                elif want is False and got and not self._lenient(c, i):
                    self.fail("emitted-but-suppressed", f"message {i} (seq {c.msgs[i].seq}) of "
                              f"{c.describe()} was emitted; emit={ideal.cfg.emit} "
                              f"min_confidence={ideal.cfg.min_confidence} suppresses it",
                              c.msgs[i].record)
        self.states()
        self.commits()
        return self.violations

    def commits(self) -> None:
        """The group's offsets never go back, but by an operator's hand (worker/loop.py:
        "Commits never move the group back")."""
        last: dict[tuple[str, int], int] = {}
        for at, tp, offset, _meta, by in self.trace.group.history:
            if tp[0] == INPUT and by != "admin" and offset < last.get(tp, -1):
                self.fail("commit-backwards", f"{by} committed {tp[0]}[{tp[1]}] at {offset} "
                          f"(t={at:.3f}), behind the {last[tp]} committed before")
            last[tp] = offset

    def _lenient(self, c: Conversation, i: int) -> bool:
        """Emit decisions after a legitimate partial rebuild follow the history the worker
        still had: not predictable here."""
        return any(self.deleted(c, k, self.trace.end) for k in range(i + 1))


def check(trace: Trace) -> list[Violation]:
    """Every violation of the invariants in a finished run (the run's own, such as a stall or
    a worker that raised, included)."""
    return list(trace.violations) + Checker(trace).check()


def lag_too_large(trace: Trace) -> str | None:
    """The workload keeps every gap between two messages of a session ``MARGIN_S`` away from
    the TTLs. If a worker got to one message much later than to the one before (or earlier),
    the stored state's expiry, measured on processing time, may disagree with the record
    timestamps: the run proves nothing then. Returns why, or None."""
    for part in trace.broker.topic(INPUT):
        last: dict[str, tuple[int, float]] = {}
        for r in part.records:
            seen = part.first_fetch.get(r.offset)
            body = _body(r.value)
            if seen is None or body is None or not isinstance(body.get("session_id"), str):
                continue
            sid = body["session_id"]
            prev = last.get(sid)
            last[sid] = ((r.timestamp_ms or 0), seen)
            if prev is None:
                continue
            skew = abs((seen - prev[1]) - ((r.timestamp_ms or 0) - prev[0]) / 1000)
            if skew > MARGIN_S - 5:
                return (f"session {sid}: record {r.partition}@{r.offset} was first read "
                        f"{skew:.1f}s later (or earlier) relative to its predecessor than "
                        f"their timestamps say")
    return None
