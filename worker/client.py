"""User-side tools: publish token streams (``produce``) and follow predictions (``tail``).

``produce`` turns text into contract messages: a session's tokens are cut into chunks of
``--chunk-size``, numbered by ``seq``, the last one flagged ``end``. Many sessions from a
dataset split are interleaved the way concurrent conversations would be.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple


def chunk_messages(session_id: str, tokens: list[str], chunk_size: int, seq: bool = True,
                   end: bool = True) -> list[dict]:
    chunks = [tokens[i:i + chunk_size] for i in range(0, len(tokens), chunk_size)] or [[]]
    out = []
    for i, c in enumerate(chunks):
        m: dict = {"session_id": session_id, "tokens": c}
        if seq:
            m["seq"] = i
        if end and i == len(chunks) - 1:
            m["end"] = True
        out.append(m)
    return out


def interleave(streams: list[list[dict]], seed: int = 0) -> Iterator[dict]:
    """Merge per-session message lists in random order, keeping each session's own order."""
    rng = random.Random(seed)
    cursors = [0] * len(streams)
    live = [i for i, s in enumerate(streams) if s]
    while live:
        at = rng.randrange(len(live))
        i = live[at]
        yield streams[i][cursors[i]]
        cursors[i] += 1
        if cursors[i] == len(streams[i]):  # O(1) removal: 100k sessions stay cheap
            live[at] = live[-1]
            live.pop()


def dataset_sessions(split_name: str, n: int, model_dir: Path | None, seed: int,
                     max_tokens: int | None = None) -> list[tuple[str, str, list[str]]]:
    """(session_id, true label, tokens) for ``n`` documents of a split of BBC News.
    With a model dir, its recorded split is used, so "test" is truly held out."""
    from model import data
    from model.tokenizer import tokenize
    docs = {d.doc_id: d for d in data.load_bbc()}
    ids = None
    if model_dir is not None and (model_dir / "config.json").is_file():
        ids = json.loads((model_dir / "config.json").read_text()).get("training", {}) \
            .get("split", {}).get(split_name)
    if ids is None:
        ids = data.split(list(docs.values()), seed=0).ids()[split_name]
    chosen = random.Random(seed).sample(ids, min(n, len(ids)))
    return [(f"{doc_id.replace('/', '-')}-{seed}", docs[doc_id].label,
             tokenize(docs[doc_id].text)[:max_tokens]) for doc_id in chosen]


def _producer(client_options: dict, timeout_s: float = 30.0):
    """A producer, or ``StartupError`` with one line when no broker answers in time."""
    from kafka import KafkaProducer

    from .preflight import kafka_error
    try:
        return KafkaProducer(acks="all", linger_ms=5,
                             bootstrap_timeout_ms=max(1, int(timeout_s * 1000)),
                             **client_options)
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback
        raise kafka_error(",".join(client_options["bootstrap_servers"]), e, timeout_s) from None


class SendProgress:
    """Progress of a long ``produce`` on a terminal: messages sent of all, the rate and the
    time elapsed (rich), redrawn at most ten times a second. Quiet when ``stream`` (stderr)
    is not a terminal: a pipe or a log file gets the summary line only."""

    def __init__(self, total: int, stream=None, what: str = "produce") -> None:
        self.stream = stream or sys.stderr
        self.total, self.what = total, what
        self._bar = None
        self._pending = 0
        self._next_draw = 0.0

    def __enter__(self) -> "SendProgress":
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("messages"),
                                 TextColumn("{task.fields[rate]:>8} msg/s"),
                                 TimeElapsedColumn(),
                                 console=Console(file=self.stream, force_terminal=True),
                                 transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total, rate="-")
            self._t0 = time.monotonic()
        return self

    def sent(self, n: int = 1) -> None:
        if self._bar is None:
            return
        self._pending += n
        now = time.monotonic()
        if now >= self._next_draw:
            self._draw(now)

    def _draw(self, now: float) -> None:
        task = self._bar.tasks[0]
        done = task.completed + self._pending
        rate = done / (now - self._t0) if now > self._t0 else 0.0
        self._bar.update(self._task, advance=self._pending, rate=f"{rate:,.0f}")
        self._pending = 0
        self._next_draw = now + 0.1

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._draw(time.monotonic())
            self._bar.stop()


def cmd_produce(args: argparse.Namespace, settings_from_args: Callable) -> int:
    settings = settings_from_args(args)
    k = settings.kafka
    if args.dataset:
        sessions = dataset_sessions(args.split, args.sessions, args.model_dir, args.seed,
                                    args.max_tokens)
        streams = [chunk_messages(sid, toks, args.chunk_size, args.seq, args.end)
                   for sid, _, toks in sessions]
    else:
        # Here, not at the top: the model package imports torch, which `plan` and `tail` do
        # not need.
        from model.tokenizer import tokenize
        text = Path(args.file).read_text() if args.file else sys.stdin.read()
        sid = args.session_id or "session-1"
        streams = [chunk_messages(sid, tokenize(text)[:args.max_tokens], args.chunk_size,
                                  args.seq, args.end)]
    producer = _producer(k.client_options(), settings.startup_timeout_s)
    sent, t0 = 0, time.monotonic()
    with SendProgress(sum(len(s) for s in streams)) as progress:
        for msg in interleave(streams, args.seed):
            producer.send(k.input_topic, key=msg["session_id"].encode(),
                          value=json.dumps(msg).encode())
            sent += 1
            progress.sent()
            if args.rate:
                delay = t0 + sent / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        producer.flush()
    producer.close()
    print(f"produced {sent} messages for {len(streams)} sessions to {k.input_topic} "
          f"in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


def format_prediction(p: dict) -> str:
    flag = "  [final]" if p.get("final") else ""
    return (f"{p['session_id'][:32]:<32} seq={p['seq']:<4} tokens={p['tokens_seen']:<5} "
            f"{p['label']:<14} {p['confidence']:.3f}{flag}")


class Followed(NamedTuple):
    """A prediction as read from the output topic, and when its record was stamped: the
    worker's producer sets a record's CreateTime as it sends it (the broker's append time
    instead on a topic with ``message.timestamp.type=LogAppendTime``)."""
    prediction: dict
    sent_at: float  # seconds since the epoch


def follow(topic: str, client_options: dict, from_beginning: bool = True,
           timeout_s: float | None = None) -> Iterator[dict]:
    """Yield decoded predictions from ``topic`` (all partitions, no consumer group).
    ``client_options`` carries ``bootstrap_servers`` and any security settings, and may
    override the consumer's settings. The fetch wait is 5 ms: with 20, the hop from the
    worker's send to this consumer took about 3 ms more at p50 in ``make demo``
    (docs/latency.md)."""
    return (f.prediction for f in follow_records(topic, client_options, from_beginning, timeout_s))


def follow_records(topic: str, client_options: dict, from_beginning: bool = True,
                   timeout_s: float | None = None) -> Iterator[Followed]:
    """``follow``, with each prediction's record timestamp (``Followed.sent_at``)."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition
    consumer = KafkaConsumer(**{"enable_auto_commit": False, "fetch_max_wait_ms": 5,
                                **client_options})
    try:
        deadline = time.monotonic() + timeout_s if timeout_s else None
        parts = None
        while parts is None:
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                if deadline and time.monotonic() > deadline:
                    return
                time.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        (consumer.seek_to_beginning if from_beginning else consumer.seek_to_end)(*tps)
        idle_since = time.monotonic()
        while True:
            polled = consumer.poll(timeout_ms=200)
            for recs in polled.values():
                for r in recs:
                    idle_since = time.monotonic()
                    yield Followed(json.loads(r.value), r.timestamp / 1000)
            if timeout_s and not polled and time.monotonic() - idle_since > timeout_s:
                return
    finally:
        consumer.close()


def cmd_tail(args: argparse.Namespace, settings_from_args: Callable) -> int:
    settings = settings_from_args(args)
    k = settings.kafka
    n = 0
    try:
        for p in follow(args.topic or k.output_topic, k.client_options(),
                        not args.latest, args.timeout):
            print(json.dumps(p) if args.json else format_prediction(p), flush=True)
            n += 1
            if args.max and n >= args.max:
                break
    except KeyboardInterrupt:
        pass
    return 0


def add_produce(sub, common: Callable, settings_from_args: Callable) -> None:
    p = sub.add_parser("produce", help="publish token messages from a file, stdin or a dataset")
    common(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--file", help="text file for one session [default: stdin]")
    src.add_argument("--dataset", choices=["bbc-news"], help="many sessions from a dataset "
                     "split [default: none, read --file or stdin]")
    p.add_argument("--session-id", help="session id for --file/stdin [default: session-1]")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the dataset split to draw sessions from [default: %(default)s]")
    p.add_argument("--sessions", type=int, default=20,
                   help="sessions to publish with --dataset [default: %(default)s]")
    p.add_argument("--model-dir", type=Path, default=Path("artifacts/bbc-gru"),
                   help="use this artifact's recorded split [default: %(default)s]")
    p.add_argument("--chunk-size", type=int, default=16,
                   help="tokens per message [default: %(default)s]")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cut each text to N tokens [default: no cut]")
    p.add_argument("--rate", type=float, default=0,
                   help="messages per second (0: unthrottled) [default: %(default)s]")
    p.add_argument("--seq", action=argparse.BooleanOptionalAction, default=True,
                   help="number messages with seq [default: on]")
    p.add_argument("--end", action=argparse.BooleanOptionalAction, default=True,
                   help="flag each session's last message end=true [default: on]")
    p.add_argument("--seed", type=int, default=0,
                   help="picks the sessions and their interleaving [default: %(default)s]")
    p.set_defaults(func=lambda a: cmd_produce(a, settings_from_args))


def add_tail(sub, common: Callable, settings_from_args: Callable) -> None:
    p = sub.add_parser("tail", help="follow the predictions topic")
    common(p)
    p.add_argument("--topic", help="topic to follow [default: the output topic]")
    p.add_argument("--json", action="store_true", help="print raw JSON lines [default: off]")
    p.add_argument("--latest", action="store_true",
                   help="start at the end, not the beginning [default: off]")
    p.add_argument("--max", type=int, help="stop after N predictions [default: no limit]")
    p.add_argument("--timeout", type=float,
                   help="stop after S seconds without a prediction [default: never]")
    p.set_defaults(func=lambda a: cmd_tail(a, settings_from_args))
