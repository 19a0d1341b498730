"""Streams and assertions the tests share. The streams come from devtools.streams (the one
generator the demo and the benchmarks use too)."""

from __future__ import annotations

from devtools.streams import Session, bbc_sessions, pairs

__all__ = ["Session", "bbc_sessions", "interleave", "split_stream", "last_predictions", "assert_exact"]


def interleave(sessions: list[Session], seed: int = 0, with_seq: bool = True,
               end: bool = False) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs in a random global order that keeps each session's own order."""
    return pairs(sessions, seed, with_seq=with_seq, end=end)


def split_stream(sessions: list[Session], seed: int) -> tuple[list, list]:
    """The interleaved stream (sessions ended) cut in two: each session's first half of its
    messages (at least one) in the first part, the rest in the second, as a model rollout
    between them would see it."""
    stream = interleave(sessions, seed=seed, end=True)
    counts: dict[bytes, int] = {}
    for k, _ in stream:
        counts[k] = counts.get(k, 0) + 1
    seen: dict[bytes, int] = {}
    first, rest = [], []
    for k, v in stream:
        seen[k] = seen.get(k, 0) + 1
        (first if seen[k] <= max(1, counts[k] // 2) else rest).append((k, v))
    return first, rest


def last_predictions(preds: list[dict]) -> dict[str, dict]:
    """Each session's prediction with the highest seq (consumers dedupe by (session, seq))."""
    last: dict[str, dict] = {}
    for p in preds:
        if p["seq"] >= last.get(p["session_id"], {"seq": -1})["seq"]:
            last[p["session_id"]] = p
    return last


def assert_exact(clf, sessions: list[Session], preds: list[dict], tol: float = 1e-5) -> None:
    """Every session's last prediction equals the model run offline over all its tokens."""
    last = last_predictions(preds)
    for s in sessions:
        want = clf.classify(s.tokens)
        got = last[s.session_id]
        assert got["tokens_seen"] == len(s.tokens), s.session_id
        assert max(abs(got["probs"][l] - want[l]) for l in want) <= tol, s.session_id
