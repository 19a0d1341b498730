"""Tier 1: what the CLI prints for an operator: log lines (text or one JSON object each, the
client libraries kept at WARNING) and ``produce``'s progress on a terminal."""

from __future__ import annotations

import io
import json
import logging

import pytest

from worker.client import SendProgress
from worker.logs import configure_logging

pytestmark = pytest.mark.unit


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in ("kafka", "redis", "worker")}
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def test_json_logs_are_one_object_per_line_with_the_extra_fields(restore_logging):
    out = io.StringIO()
    configure_logging("INFO", "json", stream=out)
    log = logging.getLogger("worker.loop")
    log.info("claimed %s", "tokens[0]", extra={"topic": "tokens", "partition": 0})
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("step failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = map(json.loads, lines)
    assert first["level"] == "INFO" and first["logger"] == "worker.loop"
    assert first["message"] == "claimed tokens[0]"
    assert first["topic"] == "tokens" and first["partition"] == 0
    assert first["timestamp"].endswith("Z") and first["timestamp"][10] == "T"
    assert second["level"] == "ERROR" and "ValueError: bad\nvalue" in second["exception"]


def test_client_library_chatter_stays_below_warning_by_default(restore_logging):
    out = io.StringIO()
    configure_logging("INFO", "text", stream=out)
    logging.getLogger("kafka.net.manager").info("Bootstrap complete")
    logging.getLogger("kafka.coordinator").warning("heartbeat failed")
    logging.getLogger("worker.app").info("model loaded")
    text = out.getvalue()
    assert "Bootstrap complete" not in text
    assert "WARNING kafka.coordinator: heartbeat failed" in text
    assert "INFO worker.app: model loaded" in text
    out.truncate(0)
    configure_logging("WARNING", "text", library_level="DEBUG", stream=out)
    logging.getLogger("kafka.net.manager").info("Bootstrap complete")
    logging.getLogger("worker.app").info("model loaded")
    assert "Bootstrap complete" in out.getvalue() and "model loaded" not in out.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_produce_shows_messages_rate_and_elapsed_on_a_terminal_only():
    tty = Terminal()
    with SendProgress(120, stream=tty) as progress:
        for _ in range(120):
            progress.sent()
    shown = tty.getvalue()
    assert "120/120" in shown and "msg/s" in shown and "0:00:0" in shown
    pipe = io.StringIO()
    with SendProgress(120, stream=pipe) as progress:
        for _ in range(120):
            progress.sent()
    assert pipe.getvalue() == ""
