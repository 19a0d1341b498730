"""Logging for the worker and its CLI: text or one JSON object per line, our level and the
client libraries' level set apart.

kafka-python logs every connection, bootstrap and group step at INFO; at the worker's INFO
that was 49 of 52 lines of a normal run. Its loggers (and redis-py's) get their own level,
WARNING by default (``GRU_LIBRARY_LOG_LEVEL``); ``GRU_LOG_LEVEL`` governs the rest.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

LIBRARY_LOGGERS = ("kafka", "redis", "confluent_kafka")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is
# written as a field of its own.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``timestamp`` (ISO 8601, UTC, milliseconds), ``level``,
    ``logger``, ``message``, the record's ``extra`` fields, and ``exception`` (the formatted
    traceback) when there is one. Newlines stay inside the JSON string: one line per event."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"timestamp": _iso(record.created), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + \
        f".{int(created % 1 * 1000):03d}Z"


def configure_logging(level: str = "INFO", fmt: str = "text", library_level: str = "WARNING",
                      stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one on ``stream`` (stderr) in ``fmt``
    (``text`` or ``json``); the worker's loggers at ``level``, the client libraries' at
    ``library_level``. Called once, in ``__main__``, when the settings are known."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)


def json_line(level: str, message: str, logger: str = "worker", **fields) -> str:
    """A JSON log line without a configured logger (for the fatal lines printed before or
    instead of logging)."""
    return json.dumps({"timestamp": _iso(time.time()), "level": level, "logger": logger,
                       "message": message, **fields}, default=str, ensure_ascii=False)
