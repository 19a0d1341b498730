"""Input streams for the demo, the tests and the benchmarks, in one place.

A ``Session`` is a document cut into token chunks; ``pairs`` turns sessions into the
(key, value) records a producer sends: one contract message per chunk, numbered by ``seq``,
interleaved at random the way concurrent conversations arrive, each session's own order kept
(``worker.client.interleave``, the same generator ``python -m worker produce`` uses).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model.data import load_bbc
from model.tokenizer import tokenize
from worker.client import interleave


@dataclass
class Session:
    session_id: str
    label: str
    tokens: list[str]
    chunks: list[list[str]]


def bbc_sessions(n: int, seed: int = 0, max_chunk: int = 40, max_tokens: int | None = 300,
                 prefix: str = "s") -> list[Session]:
    """``n`` BBC articles, each cut into chunks of 1..``max_chunk`` tokens at random."""
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


def even_sessions(n: int, tokens_per_message: int, messages: int, seed: int = 0,
                  prefix: str = "s") -> list[Session]:
    """``n`` sessions of exactly ``messages`` chunks of ``tokens_per_message`` tokens each,
    from BBC articles (short ones repeated): a load of known shape for benchmarks."""
    rng = random.Random(seed)
    docs = load_bbc()
    tokenized: dict[int, list[str]] = {}
    out = []
    for i in range(n):
        j = rng.randrange(len(docs)) if i >= len(docs) else i
        d = docs[j]
        if j not in tokenized:
            tokenized[j] = tokenize(d.text) or ["the"]
        toks = tokenized[j]
        need = tokens_per_message * messages
        toks = (toks * (need // len(toks) + 1))[:need]
        out.append(Session(f"{prefix}{i}", d.label, toks,
                           [toks[j * tokens_per_message:(j + 1) * tokens_per_message]
                            for j in range(messages)]))
    return out


def mixed_sessions(chat: int, chat_messages: int, documents: int, seed: int = 0,
                   prefix: str = "m", chat_tokens: tuple[int, int] = (4, 16),
                   doc_tokens: tuple[int, int] = (1024, 4096)) -> list[Session]:
    """Chat lines and long documents: ``chat`` sessions of ``chat_messages`` chunks of
    ``chat_tokens`` tokens (uniform at random), and ``documents`` sessions of one chunk of
    ``doc_tokens`` tokens each (BBC articles back to back). A load of mixed lengths for
    benchmarks; ``documents=0`` gives the chat lines alone."""
    rng = random.Random(seed)
    docs = load_bbc()
    order = list(range(len(docs)))
    rng.shuffle(order)
    tokenized: dict[int, list[str]] = {}

    def text(j: int) -> list[str]:
        if j not in tokenized:
            tokenized[j] = tokenize(docs[j].text) or ["the"]
        return tokenized[j]

    out, at = [], 0
    for i in range(chat):
        j = order[i % len(order)]
        toks, chunks, pos = text(j), [], 0
        for _ in range(chat_messages):
            k = rng.randint(*chat_tokens)
            chunks.append([toks[(pos + t) % len(toks)] for t in range(k)])
            pos += k
        out.append(Session(f"{prefix}c{i}", docs[j].label, [t for c in chunks for t in c],
                           chunks))
    for i in range(documents):
        need, toks = rng.randint(*doc_tokens), []
        while len(toks) < need:
            toks += text(order[at % len(order)])
            at += 1
        out.append(Session(f"{prefix}d{i}", "", toks[:need], [toks[:need]]))
    return out


def pairs(sessions: Sequence[Session], seed: int = 0, with_seq: bool = True, end: bool = False,
          encode: Callable[[list[str]], list[int]] | None = None) -> list[tuple[bytes, bytes]]:
    """(key, value) records: every chunk of every session, interleaved at random, each
    session's order kept. ``encode`` sends ``token_ids`` instead of ``tokens``."""
    streams = []
    for s in sessions:
        msgs = []
        for i, chunk in enumerate(s.chunks):
            body: dict = {"session_id": s.session_id}
            if with_seq:
                body["seq"] = i
            if encode is not None:
                body["token_ids"] = encode(chunk)
            else:
                body["tokens"] = chunk
            if end and i == len(s.chunks) - 1:
                body["end"] = True
            msgs.append(body)
        streams.append(msgs)
    return [(m["session_id"].encode(), json.dumps(m, separators=(",", ":")).encode())
            for m in interleave(streams, seed)]
