"""Build interleaved token streams from BBC articles, for tests and benchmarks."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from model.data import load_bbc
from model.tokenizer import tokenize
from worker import client


@dataclass
class Session:
    session_id: str
    label: str
    tokens: list[str]
    chunks: list[list[str]]


def bbc_sessions(n: int, seed: int = 0, max_chunk: int = 40, max_tokens: int | None = 300,
                 prefix: str = "s") -> list[Session]:
    rng = random.Random(seed)
    docs = rng.sample(load_bbc(), n)
    sessions = []
    for i, d in enumerate(docs):
        toks = tokenize(d.text)[:max_tokens]
        chunks, at = [], 0
        while at < len(toks):
            k = rng.randint(1, max_chunk)
            chunks.append(toks[at:at + k])
            at += k
        sessions.append(Session(f"{prefix}{i}-{d.doc_id}", d.label, toks, chunks))
    return sessions


def interleave(sessions: list[Session], seed: int = 0, with_seq: bool = True,
               end: bool = False) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs in a random global order that keeps each session's own order."""
    streams = []
    for s in sessions:
        msgs = []
        for i, chunk in enumerate(s.chunks):
            body: dict = {"session_id": s.session_id, "tokens": chunk}
            if with_seq:
                body["seq"] = i
            if end and i == len(s.chunks) - 1:
                body["end"] = True
            msgs.append(body)
        streams.append(msgs)
    return [(m["session_id"].encode(), json.dumps(m).encode())
            for m in client.interleave(streams, seed)]


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
