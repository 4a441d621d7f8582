"""Logging set-up: every line on stderr carries a UTC timestamp, the pid and, in a
worker, its slot. Lifecycle events are single `event=NAME key=value` lines so they
can be grepped."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_logger = logging.getLogger("forkd")


class _Formatter(logging.Formatter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.formatTime(record)} {self.prefix}[{record.process}] "
        if record.levelno >= logging.WARNING:
            text += f"{record.levelname.lower()}: "
        text += record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(prefix: str = "forkd", level: int = logging.INFO) -> None:
    """(Re)install the one stderr handler on the root logger; a worker calls this
    again after fork with its slot in the prefix."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prefix))
    root.addHandler(handler)
    root.setLevel(level)


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def format_event(name: str, fields: dict[str, Any]) -> str:
    parts = [f"event={name}"]
    parts += [f"{key}={_quote(value)}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


def event(_event: str, level: int = logging.INFO, **fields: Any) -> None:
    _logger.log(level, format_event(_event, fields))


def reopen() -> None:
    """SIGUSR1: reopen the log file. Every line goes to stderr until the primary
    writes a --log-file of its own, so there is nothing to reopen yet: say so."""
    event("logs-reopen", target="stderr")
