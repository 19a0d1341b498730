"""Streams and assertions the tests share. The streams come from devtools.streams (the one
generator the demo and the benchmarks use too)."""

from __future__ import annotations

from devtools.streams import Session, bbc_sessions, pairs

__all__ = ["Session", "bbc_sessions", "interleave", "last_predictions", "assert_exact"]


def interleave(sessions: list[Session], seed: int = 0, with_seq: bool = True,
               end: bool = False) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs in a random global order that keeps each session's own order."""
    return pairs(sessions, seed, with_seq=with_seq, end=end)


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
