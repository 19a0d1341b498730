"""A seeded workload: the run's settings and the records producers send, at simulated times.

Sessions with and without ``seq``, seq gaps, records produced twice, ``end`` (sometimes with
no tokens), ids reused after an end (seq going on while the tombstone lives, or from 0 once
it has expired), states that expire and sessions that come back, long-lived sessions (alive
longer than the state TTL, each gap below it), hostile records, and, during a rollout, old
sessions sending token ids only the previous model knows.

Gaps between two messages of a session stay clear of the TTLs: a gap is either at most
``SHORT_GAP_S`` (``LONG_GAP_S`` in a long-lived session, which never ends) plus the rollout's
quiet window, or at least the TTL it crosses plus ``MARGIN_S``, a margin larger than the
processing delays the faults cause. So whether a state expired never depends on how late a
worker got to a record (``oracle.lag_too_large`` checks, and a run where it would is
reported as inconclusive, not as a failure).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

TTL_S = 200  # GRU_STATE__TTL_SECONDS
END_TTL_S = 100  # GRU_STATE__END_TTL_SECONDS
SESSION_TIMEOUT_S = 10.0  # the consumer group's session timeout
MARGIN_S = 40.0  # a gap that crosses a TTL crosses it by at least this much
SHORT_GAP_S = 12.0
LONG_GAP_S = 60.0  # a long-lived session's gaps: far below the TTL, and it never ends
QUIET_S = (10.0, 20.0)  # no records from rollout_at - 10 s to rollout_at + 20 s
OLD_VOCAB, NEW_VOCAB = 48, 40  # token ids the old (previous) and the new model know


@dataclass(frozen=True)
class Config:
    partitions: int = 2
    workers: int = 2
    max_records: int = 8
    commit_interval_ms: int = 0
    async_commits: bool = False
    emit: str = "every"
    min_confidence: float = 0.0
    assignor: str = "range"
    rollout_at: float | None = None  # the workers restart with a new model (old as previous)
    model_seed: int = 0


@dataclass(frozen=True)
class Send:
    """One record a producer sends: ``value`` is JSON text (or deliberately broken text;
    None: a record with no value)."""

    at: float
    key: str | None
    value: str | None
    session: str  # the workload session it belongs to (hostile records: their own name)
    hostile: str = ""  # which rule of the contract it breaks ("": none)


@dataclass
class _Timeline:
    """Workload time to simulated time: the rollout's quiet window is cut in."""

    rollout_at: float | None

    def real(self, t: float) -> float:
        if self.rollout_at is None or t < self.rollout_at - QUIET_S[0]:
            return t
        return t + QUIET_S[0] + QUIET_S[1]

    def before_rollout(self, t: float) -> bool:
        return self.rollout_at is None or t < self.rollout_at - QUIET_S[0]


@dataclass
class _Builder:
    rng: random.Random
    timeline: _Timeline
    sends: list[Send] = field(default_factory=list)

    def short_gap(self) -> float:
        r = self.rng.random()
        return self.rng.uniform(0.02, 1.0) if r < 0.4 else self.rng.uniform(1.0, 5.0) \
            if r < 0.85 else self.rng.uniform(5.0, SHORT_GAP_S)

    def content(self, old_session: bool, t: float) -> dict:
        rng = self.rng
        n = rng.randint(1, 5)
        kind = rng.random()
        if kind < 0.6:
            return {"tokens": [f"w{rng.randrange(0, 60)}" for _ in range(n)]}
        if kind < 0.8:
            words = [f"W{rng.randrange(0, 60)}" for _ in range(n)]
            return {"text": rng.choice([" ", ", ", "! "]).join(words) + rng.choice(["", "."])}
        if old_session and self.timeline.rollout_at is not None \
                and not self.timeline.before_rollout(t) and rng.random() < 0.6:
            lo = NEW_VOCAB  # ids only the previous model knows, for an old session
        else:
            lo = 2
        hi = OLD_VOCAB if old_session else NEW_VOCAB
        return {"token_ids": [rng.randrange(lo, hi) for _ in range(n)]}

    def add(self, t: float, sid: str, body: dict, session: str, key: str | None = "",
            hostile: str = "", raw: str | None = "") -> None:
        value = json.dumps(body) if raw == "" else raw
        self.sends.append(Send(round(self.timeline.real(t), 4), sid if key == "" else key, value,
                               session, hostile))

    def session(self, sid: str, t: float, long_lived: bool = False) -> float:
        """One session's records from workload time ``t``; returns the time of its last."""
        rng = self.rng
        numbered = long_lived or rng.random() < 0.8
        seq = rng.randint(1, 3) if numbered and rng.random() < 0.05 else 0
        conversations = 0
        while True:
            conversations += 1
            old = self.timeline.before_rollout(t)  # which model begins this conversation
            n = rng.randint(6, 10) if long_lived else rng.randint(2, 5)
            ends = not long_lived and rng.random() < 0.5
            mixed = numbered and n >= 3 and rng.random() < 0.04
            for i in range(n):
                last = i == n - 1
                body: dict = {"session_id": sid}
                if numbered:
                    body["seq"] = seq
                if last and ends and numbered and i > 0 and rng.random() < 0.01:
                    body["text"] = rng.choice(["🙂", "...", "?!"])  # an end with no tokens
                else:
                    body.update(self.content(old, t))
                if last and ends:
                    body["end"] = True
                self.add(t, sid, body, sid)
                if rng.random() < 0.06:  # produced twice
                    t += rng.uniform(0.001, 0.3)
                    self.add(t, sid, body, sid)
                if mixed and i == 1:  # a message without seq in a session numbered by seq
                    t += rng.uniform(0.01, 0.5)
                    self.add(t, sid, {"session_id": sid, "tokens": ["w5"]}, sid,
                             hostile="mixed numbering")
                if not last:
                    t += rng.uniform(25.0, LONG_GAP_S) if long_lived else self.short_gap()
                    seq += 1 if rng.random() < 0.9 else rng.randint(2, 3)
            if conversations >= 3 or long_lived or rng.random() > 0.3:
                return t
            if ends and rng.random() < 0.5:  # seq goes on while the tombstone lives
                t += self.short_gap()
                seq += 1
            elif ends:  # from 0 again once the tombstone has expired
                t += rng.uniform(END_TTL_S + MARGIN_S, END_TTL_S + MARGIN_S + 20)
                seq = 0
            else:  # the state expires; the session comes back, from 0 or going on
                t += rng.uniform(TTL_S + MARGIN_S, TTL_S + MARGIN_S + 30)
                seq = 0 if rng.random() < 0.5 else seq + 1

    def hostile(self, name: str, t: float, live: list[str]) -> None:
        rng = self.rng
        sid = rng.choice(live) if live and rng.random() < 0.5 else name
        kind = rng.choice(["bad json", "wrong key", "unknown field", "out of range",
                           "no tokens", "negative seq", "text without tokens", "no value",
                           "no key", "two token fields"])
        body: dict = {"session_id": sid, "tokens": ["w3", "w4"]}
        key: str | None = ""
        raw: str | None = ""
        if kind == "bad json":
            raw = '{"session_id": "' + sid + '", "tokens": ["w3"'
        elif kind == "wrong key":
            key = sid + "-other"
        elif kind == "unknown field":
            body["colour"] = "red"
        elif kind == "out of range":
            body = {"session_id": sid, "token_ids": [3, OLD_VOCAB + rng.randrange(0, 50)]}
        elif kind == "no tokens":
            body["tokens"] = []
        elif kind == "negative seq":
            body["seq"] = -1
        elif kind == "text without tokens":
            body = {"session_id": sid, "text": "!!"}
        elif kind == "no value":
            raw = None
        elif kind == "no key":
            key = None
        else:
            body["text"] = "w3"
        self.add(t, sid, body, name, key=key, hostile=kind, raw=raw)


def generate(rng: random.Random) -> tuple[Config, list[Send]]:
    rollout_at = round(rng.uniform(90, 200), 1) if rng.random() < 0.4 else None
    cfg = Config(
        partitions=rng.choice([1, 2, 2, 3]),
        workers=rng.choice([1, 2, 2, 3]),
        max_records=rng.choice([1, 2, 3, 5, 8, 16, 64]),
        commit_interval_ms=rng.choice([0, 0, 100, 1000]),
        async_commits=rng.random() < 0.25,
        emit=rng.choice(["every", "every", "change", "final"]),
        min_confidence=rng.choice([0.0, 0.0, 0.0, 0.45, 0.6]),
        assignor=rng.choice(["range", "roundrobin"]),
        rollout_at=rollout_at,
    )
    b = _Builder(rng, _Timeline(rollout_at))
    live: list[str] = []
    if rng.random() < 0.5:
        b.session("long0", rng.uniform(0, 40), long_lived=True)
        live.append("long0")
    for i in range(rng.randint(8, 14)):
        sid = f"s{i}"
        b.session(sid, rng.uniform(0, 230))
        live.append(sid)
    for i in range(rng.randint(1, 4)):
        b.hostile(f"h{i}", rng.uniform(0, 230), live)
    b.sends.sort(key=lambda s: s.at)
    return cfg, b.sends
