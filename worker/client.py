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


def _sink(settings):
    """The worker's acknowledged sink of the client ``kafka.client`` names: messages are
    published as the worker publishes its own (acks=all, the key hash of Java's client)."""
    if settings.client == "confluent":
        from .rdkafka_io import RdKafkaSink
        return RdKafkaSink(settings)
    from .kafka_io import KafkaSink
    return KafkaSink(settings)


def _bounded_sink(settings, timeout_s: float):
    """``_sink``, or ``StartupError`` with one line when no broker answers in time."""
    from .preflight import kafka_error
    try:
        return _sink(settings)
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback
        raise kafka_error(settings.bootstrap_servers, e, timeout_s) from None


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
    from collections import deque

    from .errors import DependencyError
    from .ports import Outgoing
    sink = _bounded_sink(k, settings.startup_timeout_s)
    in_flight: deque = deque()  # sends not yet awaited, oldest first
    chunk: list = []
    sent = failed = 0
    t0 = time.monotonic()

    def settle(keep: int) -> None:
        nonlocal failed
        while len(in_flight) > keep:
            sending = in_flight.popleft()
            try:
                refused = sink.wait(sending)
            except DependencyError as e:
                refused = e.rejected
                failed += len(e.pending or [])
            for m, why in refused:
                print(f"refused: {m.key!r}: {why}", file=sys.stderr)
            failed += len(refused)

    progress = SendProgress(sum(len(st) for st in streams)).__enter__()
    try:
        for msg in interleave(streams, args.seed):
            progress.sent()
            chunk.append(Outgoing(k.input_topic, msg["session_id"].encode(),
                                  json.dumps(msg).encode()))
            sent += 1
            if args.rate or len(chunk) >= 1000:  # paced: each message as it is due
                in_flight.append(sink.send(chunk))
                chunk = []
                settle(keep=1000 if args.rate else 10)
            if args.rate:
                delay = t0 + sent / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        if chunk:
            in_flight.append(sink.send(chunk))
        settle(keep=0)
    finally:
        progress.__exit__(None, None, None)
        sink.close()
    print(f"produced {sent - failed} messages for {len(streams)} sessions to {k.input_topic} "
          f"in {time.monotonic() - t0:.1f}s" + (f"; {failed} not acknowledged" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


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
           timeout_s: float | None = None, client: str = "kafka-python") -> Iterator[dict]:
    """Yield decoded predictions from ``topic`` (all partitions, no consumer group).
    ``client_options`` carries the bootstrap servers and any security settings in the names
    of ``client`` (kafka-python's ``bootstrap_servers``, librdkafka's ``bootstrap.servers``:
    ``KafkaSettings.client_options()`` or ``rdkafka_io.client_config``), and may override the
    consumer's settings. The fetch wait is 5 ms: with 20, the hop from the worker's send to
    this consumer took about 3 ms more at p50 in ``make demo`` (docs/latency.md)."""
    return (f.prediction for f in follow_records(topic, client_options, from_beginning,
                                                 timeout_s, client))


def follow_records(topic: str, client_options: dict, from_beginning: bool = True,
                   timeout_s: float | None = None,
                   client: str = "kafka-python") -> Iterator[Followed]:
    """``follow``, with each prediction's record timestamp (``Followed.sent_at``)."""
    if client == "confluent":
        return _follow_rdkafka(topic, client_options, from_beginning, timeout_s)
    return _follow_kafka_python(topic, client_options, from_beginning, timeout_s)


def _follow_rdkafka(topic: str, config: dict, from_beginning: bool,
                    timeout_s: float | None) -> Iterator[Followed]:
    import confluent_kafka as ck
    # A group id is required, but this consumer is assigned, never subscribed: it joins no
    # group and commits nothing.
    consumer = ck.Consumer({"group.id": "gru-tail", "enable.auto.commit": False,
                            "fetch.wait.max.ms": 5, **config})
    try:
        deadline = time.monotonic() + timeout_s if timeout_s else None
        parts = None
        while not parts:
            meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
            parts = meta.partitions if meta is not None and meta.error is None else None
            if not parts:
                if deadline and time.monotonic() > deadline:
                    return
                time.sleep(0.2)
        start = ck.OFFSET_BEGINNING if from_beginning else ck.OFFSET_END
        consumer.assign([ck.TopicPartition(topic, p, start) for p in sorted(parts)])
        idle_since = time.monotonic()
        while True:
            first = consumer.poll(0.2)  # returns at the first record; then take what is queued
            if first is None:
                if timeout_s and time.monotonic() - idle_since > timeout_s:
                    return
                continue
            for m in [first, *consumer.consume(500, 0)]:
                if m.error() is None:
                    idle_since = time.monotonic()
                    yield Followed(json.loads(m.value()), m.timestamp()[1] / 1000)
    finally:
        consumer.close()


def _follow_kafka_python(topic: str, client_options: dict, from_beginning: bool,
                         timeout_s: float | None) -> Iterator[Followed]:
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
    if k.client == "confluent":
        from .rdkafka_io import client_config
        options = client_config(k)
    else:
        options = k.client_options()
    try:
        for p in follow(args.topic or k.output_topic, options, not args.latest, args.timeout,
                        k.client):
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
