"""One log line, and its two renderings. Pure: no I/O, no clock (the caller passes `ts`).

Text (as forkd always wrote it)::

    2026-12-01T15:31:37.123Z forkd[4242] event=worker-ready slot=0 pid=4250
    2026-12-01T15:31:37.125Z forkd.worker.0[4250] event=access method=GET status=200 ...
    2026-12-01T15:31:37.126Z sample_app.0[4250] stdout: what the app printed

JSON: one object per line with `ts` (RFC 3339, UTC, milliseconds), `level`, `event`
(forkd's own lines) or `stream` (an app's output), `pid`, `slot` (null for the primary)
and the text line's fields. A field of an event that would collide with one of those keys
is renamed (`pid` -> `worker_pid`, `slot` -> `worker_slot`, anything else gets a trailing
underscore) unless it only repeats the same value.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from typing import Any

RESERVED = frozenset({"ts", "level", "event", "stream", "pid", "slot", "message"})
LEVELS = ("debug", "info", "warning", "error", "critical")
MESSAGE_EVENT = "log"  # the event name of a free-text forkd line (logger.warning(...))

_NEEDS_QUOTES = re.compile(r'[\s"=\\]')
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
_encode_string = json.encoder.encode_basestring  # (what _dumps does to a str)


@dataclass(slots=True)
class Entry:
    """A line: forkd's own (`event` set, `fields` its key=values) or an app's output
    (`stream` set, `data` the line's bytes without the newline)."""

    ts: str
    level: str
    pid: int
    slot: int | None
    event: str | None = None
    fields: dict[str, Any] | None = None
    stream: str | None = None
    data: bytes = b""
    raw: bytes | None = None  # its JSON rendering, when it arrived as one (no re-encoding)
    seq: int = 0  # position in the primary's ring, set there
    parsed: bool = True  # False: only `raw` is known yet (see from_json)
    size: int = 0  # what the ring counted for it
    text: bytes | None = None  # its text rendering, when the worker made it (access lines)
    count: int = 1  # lines: more than one for a block of records kept whole (see Ring)


_last_second = -1
_last_prefix = ""


def rfc3339(when: float) -> str:
    """1764603097.1234 -> `2026-12-01T15:31:37.123Z` (UTC, milliseconds)."""
    global _last_second, _last_prefix
    second = int(when)
    if second != _last_second:  # strftime once a second, not once a line
        _last_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = second
    return f"{_last_prefix}.{int((when - second) * 1000):03d}Z"


def quote(value: Any) -> str:
    """A key=value value: bare when it can be, else double-quoted with escapes."""
    text = value if isinstance(value, str) else str(value)
    if not text or _NEEDS_QUOTES.search(text):
        escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                   .replace("\r", "\\r").replace("\t", "\\t"))
        return '"' + escaped + '"'
    return text


def format_event(name: str, fields: dict[str, Any]) -> str:
    """`event=NAME key=value ...`; None values are left out."""
    parts = [f"event={name}"]
    parts += [f"{key}={quote(value)}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


def event_entry(event: str, fields: dict[str, Any], *, ts: str, level: str, pid: int,
                slot: int | None) -> Entry:
    return Entry(ts=ts, level=level, pid=pid, slot=slot, event=event, fields=fields)


def message_fields(message: str, logger: str, exception: str | None) -> dict[str, Any]:
    """The fields of a free-text forkd line (MESSAGE_EVENT)."""
    fields: dict[str, Any] = {"message": message, "logger": logger}
    if exception:
        fields["exception"] = exception
    return fields


# ------------------------------------------------------------------------------- text


def prefix(entry: Entry, app_name: str) -> str:
    """Who wrote the line: `forkd[PID]`, `forkd.worker.SLOT[PID]`, `APP.SLOT[PID]`."""
    if entry.stream is not None:
        return f"{app_name}.{entry.slot}[{entry.pid}]"
    if entry.slot is None:
        return f"forkd[{entry.pid}]"
    return f"forkd.worker.{entry.slot}[{entry.pid}]"


def to_text(entry: Entry, app_name: str) -> bytes:
    """The text line, with its newline."""
    if entry.text is not None:
        return entry.text
    if not entry.parsed:
        parse(entry)
    head = f"{entry.ts} {prefix(entry, app_name)} "
    if entry.stream is not None:
        return head.encode() + entry.stream.encode() + b": " + entry.data + b"\n"
    if entry.level in ("warning", "error", "critical"):
        head += entry.level + ": "
    fields = entry.fields or {}
    if entry.event == "access" and "method" in fields and "status" in fields:
        body = combined(fields, entry.ts)
    elif entry.event == MESSAGE_EVENT:
        body = str(fields.get("message", ""))
        if fields.get("exception"):
            body += "\n" + str(fields["exception"]).rstrip("\n")
    else:
        body = format_event(entry.event or "?", fields)
    return (head + body + "\n").encode("utf-8", "replace")


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
           "Dec")


def combined(fields: dict[str, Any], ts: str) -> str:
    """An access line in the combined log format (as nginx, Apache and gunicorn write
    it, so log analysers read it), then the duration in ms and request_id=."""
    stamp = clf_time(ts)
    method = fields.get("method", "-")
    if method == "-":  # (a refused request of which not even the target was parsed)
        request = "-"
    else:
        target = str(fields.get("path", ""))
        if fields.get("query"):
            target += "?" + str(fields["query"])
        request = f'{method} {target} HTTP/{fields.get("http_version", "1.1")}'
    return (f'{fields.get("remote", "-")} - - [{stamp}] "{request}" {fields.get("status", "-")} '
            f'{fields.get("bytes", "-")} "{_clf(fields.get("referer", "-"))}" '
            f'"{_clf(fields.get("user_agent", "-"))}" '
            f'{fields.get("duration_ms", "-")}ms '
            f'request_id={quote(fields.get("request_id", "-"))}')


def clf_time(ts: str) -> str:
    """2026-12-01T15:31:37.045Z -> 01/Dec/2026:15:31:37 +0000 (`-` if it is not one)."""
    month = int(ts[5:7]) if len(ts) >= 19 and ts[5:7].isdigit() else 0
    if not 1 <= month <= 12:
        return "-"
    return f"{ts[8:10]}/{_MONTHS[month - 1]}/{ts[0:4]}:{ts[11:19]} +0000"


def _clf(value: Any) -> str:
    """A quoted field of the combined format: its quotes and backslashes escaped."""
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"') if '"' in text or "\\" in text \
        else text


# ------------------------------------------------------------------------------- JSON


def to_json(entry: Entry) -> bytes:
    """The JSON line, with its newline."""
    if entry.raw is not None:
        return entry.raw
    obj: dict[str, Any] = {"ts": entry.ts, "level": entry.level}
    if entry.stream is not None:
        obj["stream"] = entry.stream
        obj["pid"] = entry.pid
        obj["slot"] = entry.slot
        obj["message"] = entry.data.decode("utf-8", "replace")
    else:
        obj["event"] = entry.event
        obj["pid"] = entry.pid
        obj["slot"] = entry.slot
        fields = entry.fields or {}
        if not (fields.keys() & RESERVED) and None not in fields.values():
            obj.update(fields)  # the usual case, the access line's among them
            fields = {}
        for key, value in fields.items():
            if value is None:
                continue
            if key in RESERVED and not (key == "message" and entry.event == MESSAGE_EVENT):
                if obj.get(key) == value:
                    continue  # the same pid said twice
                key = f"worker_{key}" if key in ("pid", "slot") else f"{key}_"
            obj[key] = value
    entry.raw = _dumps(obj).encode("utf-8", "replace") + b"\n"
    return entry.raw


def from_json(raw: bytes, slot: int | None, pid: int, origin: bytes | None = None) -> Entry:
    """A worker's forkd record (one JSON line, see to_json) -> Entry. The worker's claims
    of slot and pid are replaced by what the primary knows of the pipe it came through;
    anything that is not such a record is kept as the worker's stderr.

    A record that names the pipe's own pid and slot, as the worker writes them, is not
    decoded now: JSON output passes it through as it is, and text output or `forkd logs`
    decode it when they need its fields (parse). That keeps the access log cheap. An
    access record may carry its text rendering after a tab (JSON never holds a raw one):
    text output writes that as it is."""
    if slot is None:
        return _decode(raw, slot, pid)
    if raw.startswith(b'{"ts":"') and raw.find(origin or origin_marker(pid, slot), 7, 160) >= 0:
        return worker_line(pid, slot, raw)
    return _decode(raw, slot, pid)


def worker_line(pid: int, slot: int | None, line: bytes) -> Entry:
    """A worker's own record (one line, without its newline) kept undecoded; an access
    line's text rendering, after a tab (JSON never holds a raw one), split off."""
    raw, tab, text = line.partition(b"\t")
    return undecoded(pid, slot, raw + b"\n", text + b"\n" if tab else None)


def undecoded(pid: int, slot: int | None, raw: bytes, text: bytes | None = None,
              count: int = 1) -> Entry:
    """A worker's record (or a block of `count`) kept as the worker rendered it: `raw`
    its JSON line(s), `text` its text rendering when it came along; see parse."""
    return Entry("", "info", pid, slot, None, None, None, b"", raw, 0, False, 0, text, count)


@functools.lru_cache(maxsize=1024)
def access_marker(pid: int, slot: int) -> bytes:
    """What a worker's own access record (accesslog.render's, as to_json renders it) holds
    from the end of its time to its first field's value: once in each, and in no other
    line (see LogHub._records)."""
    return b'Z","level":"info","event":"access","pid":%d,"slot":%d,"remote":"' % (pid, slot)


@functools.lru_cache(maxsize=1024)
def origin_marker(pid: int, slot: int) -> bytes:
    """What a worker's own record says of its pid and slot (see from_json)."""
    return b',"pid":%d,"slot":%d,' % (pid, slot)


def parse(entry: Entry) -> None:
    """Fill in the fields of an entry that from_json left undecoded."""
    assert entry.raw is not None
    decoded = _decode(entry.raw.rstrip(b"\n"), entry.slot, entry.pid)
    entry.ts, entry.level, entry.event = decoded.ts, decoded.level, decoded.event
    entry.fields, entry.stream, entry.data = decoded.fields, decoded.stream, decoded.data
    entry.raw = decoded.raw
    entry.parsed = True


def _decode(raw: bytes, slot: int | None, pid: int) -> Entry:
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
            raise ValueError("not a record")
    except ValueError:
        return Entry(ts=rfc3339(time.time()), level="info", pid=pid, slot=slot,
                     stream="stderr", data=raw.rstrip(b"\n"))
    ts = obj.pop("ts", None)
    level = obj.pop("level", "info")
    event = obj.pop("event")
    claimed = (obj.pop("pid", None), obj.pop("slot", None))
    entry = Entry(ts=ts if isinstance(ts, str) else rfc3339(time.time()),
                  level=level if level in LEVELS else "info", pid=pid, slot=slot,
                  event=event, fields=obj)
    if claimed == (pid, slot):
        entry.raw = raw if raw.endswith(b"\n") else raw + b"\n"
    return entry


def render(entry: Entry, fmt: str, app_name: str) -> bytes:
    return to_json(entry) if fmt == "json" else to_text(entry, app_name)


def render_block(block: Entry, fmt: str, app_name: str) -> bytes:
    """A block of an app's output lines (`data`: `count` lines, each with its newline,
    all read at `ts`), rendered as render() renders each of them, per block rather than
    per line where it can: a text prefix goes in with one replace; a JSON line needs
    its message encoded, by the C encoder the JSON encoder itself uses."""
    assert block.stream is not None
    if fmt != "json":
        head = f"{block.ts} {prefix(block, app_name)} {block.stream}: ".encode()
        return head + block.data[:-1].replace(b"\n", b"\n" + head) + b"\n"
    head = _dumps({"ts": block.ts, "level": "info", "stream": block.stream,
                   "pid": block.pid, "slot": block.slot, "message": ""})[:-3].encode()
    encode = _encode_string
    return b"".join([head + encode(line.decode("utf-8", "replace")).encode() + b"}\n"
                     for line in block.data.split(b"\n")[:-1]])
