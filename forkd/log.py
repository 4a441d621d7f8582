"""forkd's own log lines: `event()` for lifecycle events (`event=NAME key=value`, easy to
grep or to parse as JSON), and the `forkd` logger for free text and tracebacks.

Every line becomes a logs.record.Entry handed to one sink: in the primary, its log hub
(which renders, writes and remembers it); in a worker, its records pipe to the primary;
before either exists, stderr. The `forkd` logger has its own handler and does not
propagate, and `event()` does not go through `logging` at all, so an app that reconfigures
logging (Django's LOGGING, a dictConfig with disable_existing_loggers, a root handler of
its own) changes neither the format nor the destination of forkd's lines; `guard()`
re-asserts the set-up after the app has been imported."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from forkd.logs import record
from forkd.logs.record import Entry

_logger = logging.getLogger("forkd")
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
                logging.ERROR: "error", logging.CRITICAL: "critical"}

Sink = Callable[[Entry], None]


class State:
    """How this process logs (one instance, `state`); read on hot paths directly."""

    pid: int = 0  # (os.getpid is a system call; this is set at set-up, after fork)
    slot: int | None = None
    level: int = logging.INFO
    app_name: str = "app"
    sink: Sink | None = None
    # A worker's: where a hot path (the access log) may send a JSON record it rendered
    # itself, exactly as record.to_json would have; None: lines go through event().
    json_sink: Callable[[bytes], None] | None = None
    # A worker's: where the access log hands a request's fields to be rendered with
    # its batch (RecordWriter.defer); None: it renders them at once for json_sink.
    access_sink: Callable[[tuple[Any, ...]], None] | None = None
    # --log-format text: the access line carries its text rendering too (accesslog)
    access_text: bool = False
    generation: int = 0  # counts set-ups: what was derived from the last one is stale
    reopen: Callable[[], None] | None = None  # the primary's: SIGUSR1 reopens --log-file


state = _state = State()
_stderr_lock = threading.Lock()


def _stderr_sink(entry: Entry) -> None:
    data = record.to_text(entry, _state.app_name)
    with _stderr_lock:
        try:
            os.write(2, data)
        except OSError:
            pass


def _level_name(level: int) -> str:
    return _LEVEL_NAMES.get(level) or logging.getLevelName(level).lower()


class _Handler(logging.Handler):
    """Turns the `forkd` logger's records into entries for the sink."""

    def emit(self, rec: logging.LogRecord) -> None:
        try:
            exception = None
            if rec.exc_info:
                exception = logging.Formatter().formatException(rec.exc_info)
            fields = record.message_fields(rec.getMessage(), rec.name, exception)
            entry = Entry(ts=record.rfc3339(rec.created), level=_level_name(rec.levelno),
                          pid=_state.pid or os.getpid(), slot=_state.slot,
                          event=record.MESSAGE_EVENT, fields=fields)
            (_state.sink or _stderr_sink)(entry)
        except Exception:
            self.handleError(rec)


_handler = _Handler()


def setup(prefix: str = "forkd", level: int = logging.INFO, *, slot: int | None = None,
          sink: Sink | None = None, app_name: str | None = None,
          json_sink: Callable[[bytes], None] | None = None,
          reopen: Callable[[], None] | None = None, access_text: bool = False,
          access_sink: Callable[[tuple[Any, ...]], None] | None = None) -> None:
    """(Re)install forkd's logging: in the primary (slot None) and in each worker after
    fork (its slot). `sink` receives every entry; stderr when None. (`prefix` is kept
    for callers of the first round: the text prefix now follows from the slot.)"""
    if slot is None and prefix.startswith("forkd.worker."):
        slot = int(prefix.rsplit(".", 1)[1])
    _state.generation += 1
    _state.pid = os.getpid()
    _state.slot = slot
    _state.level = level
    _state.sink = sink
    _state.json_sink = json_sink if slot is not None else None  # (a worker's only)
    _state.access_sink = access_sink if slot is not None else None
    _state.access_text = access_text
    _state.reopen = reopen
    if app_name is not None:
        _state.app_name = app_name
    guard()


def guard() -> None:
    """Re-assert forkd's logging after code we do not control may have changed it."""
    _logger.propagate = False
    _logger.setLevel(_state.level)
    _logger.disabled = False
    for handler in list(_logger.handlers):
        if handler is not _handler:
            _logger.removeHandler(handler)
    if _handler not in _logger.handlers:
        _logger.addHandler(_handler)
    for name, child in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("forkd.") and isinstance(child, logging.Logger):
            child.disabled = False  # (dictConfig's disable_existing_loggers)
            child.propagate = True  # up to `forkd`, whose handler is ours
            for handler in list(child.handlers):
                child.removeHandler(handler)


def event(_event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One `event=NAME key=value ...` line; None values are left out."""
    if level < _state.level:
        return
    entry = Entry(ts=record.rfc3339(time.time()), level=_level_name(level),
                  pid=_state.pid or os.getpid(), slot=_state.slot, event=_event, fields=fields)
    (_state.sink or _stderr_sink)(entry)


def reopen() -> None:
    """SIGUSR1: reopen the log file (the primary's hub does it, and logs the outcome)."""
    if _state.reopen is not None:
        _state.reopen()
    else:
        event("logs-reopen", target="stderr")  # nothing to reopen


def format_event(name: str, fields: dict[str, Any]) -> str:
    return record.format_event(name, fields)
