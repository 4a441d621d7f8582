"""The client side of `forkd reload|stop|status|scale|ls`: ask the primary, print, exit code.

Each function returns the command's exit code (SPEC): 0 done, 1 the operation failed,
2 bad usage or no primary to talk to. Results go to `out` (stdout), problems to `err`
(stderr), so `forkd status --json | jq` sees only the document.

What the primary's "ok" results may carry: reload, scale and stop print the result's
"message" (a str) when there is one, else a default line; status prints the SPEC's
status document, which is exactly the result.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from forkd.control import call, curve_from_env, list_primaries, resolve
from forkd.errors import ConfigError, ControlError, NoPrimary, ProtocolError
from forkd.protocol import USAGE_CODES, Code, validate_args

STATUS_TIMEOUT = 10.0
# reload, scale and stop take as long as the workers need to boot and drain; the primary
# bounds each step (--timeout, --graceful-timeout) and a primary that dies is noticed at
# once (the connection drops), so this only guards against one that hangs.
LONG_TIMEOUT = 3600.0
FOLLOW_EVERY = 0.25  # seconds between a follower's requests for new lines

# A fleet reload first checks that every host answers; a live primary answers at once.
FLEET_PING_TIMEOUT = 5.0

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
HANDOVER_TIMEOUT = 10.0  # for the new primary to bind the endpoint the old one released


def reload(
    name: str | None,
    home: Path,
    out: TextIO | None = None,
    *,
    err: TextIO | None = None,
    endpoint: str | None = None,
    timeout: float = LONG_TIMEOUT,
) -> int:
    """Rolling reload, printing each step as the primary reports it."""
    return _act(
        "reload", {}, "reload complete", name, home, out, err, endpoint=endpoint, timeout=timeout
    )


def reload_fleet(
    endpoints: Sequence[str],
    out: TextIO | None = None,
    *,
    err: TextIO | None = None,
    timeout: float = LONG_TIMEOUT,
    ping_timeout: float = FLEET_PING_TIMEOUT,
) -> int:
    """Rolling reload of several primaries (one per host), one after another, in order.

    Every endpoint must answer a ping first, so a typo or a dead host is found before any
    host is touched. Then each is reloaded in turn; the first failure stops the sequence,
    names the endpoint and the ones left as they were, and exits 1. `timeout` bounds the
    whole sequence. Progress lines are prefixed "[i/n] ENDPOINT:"."""
    out, err = out or sys.stdout, err or sys.stderr
    seen = {e for e in endpoints if endpoints.count(e) > 1}
    if seen:
        _print(err, f"forkd reload: --control {sorted(seen)[0]} is given more than once")
        return EXIT_USAGE
    try:
        curve = curve_from_env(os.environ)
    except ConfigError as exc:
        _print(err, f"forkd reload: {exc}")
        return EXIT_USAGE
    deadline = time.monotonic() + timeout
    total = len(endpoints)
    for endpoint in endpoints:
        try:
            call(endpoint, "ping", timeout=ping_timeout, curve=curve)
        except ControlError as exc:
            _print(err, f"forkd reload: {endpoint} does not answer: {exc.message}")
            _print(err, f"forkd reload: nothing was reloaded ({total} hosts)")
            return EXIT_FAILED
    for number, endpoint in enumerate(endpoints, 1):
        prefix = f"[{number}/{total}] {endpoint}:"
        _print(out, f"{prefix} reloading")

        def show(line: str, prefix: str = prefix) -> None:
            _print(out, f"{prefix} {line}")

        try:
            # Asked again right before its turn: over tcp, a host that went away since the
            # first ping would otherwise be waited for until the deadline, in silence.
            call(endpoint, "ping", timeout=ping_timeout, curve=curve)
            result = call(endpoint, "reload", timeout=max(0.0, deadline - time.monotonic()),
                          on_progress=show, curve=curve)
        except ControlError as exc:
            _print(err, _error_text("reload", exc).replace(
                "forkd reload:", f"forkd reload: {endpoint}:", 1))
            done = ", ".join(endpoints[:number - 1]) or "none"
            left = ", ".join(endpoints[number:]) or "none"
            _print(err, f"forkd reload: stopped at {endpoint} (host {number} of {total}); "
                        f"reloaded: {done}; not reloaded: {left}")
            return EXIT_FAILED
        _print(out, f"{prefix} {_message(result, 'reload complete')}")
    _print(out, f"fleet reload complete: {total} hosts")
    return EXIT_OK


def upgrade(
    name: str | None,
    home: Path,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    endpoint: str | None = None,
    timeout: float = LONG_TIMEOUT,
) -> int:
    """Replace the primary itself; done once the new primary answers on the endpoint."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        target = endpoint or resolve(home, name)
    except ConfigError as exc:
        _print(err, f"forkd upgrade: {exc}")
        return EXIT_USAGE
    except ControlError as exc:
        _print(err, _error_text("upgrade", exc))
        return EXIT_USAGE if exc.code in USAGE_CODES else EXIT_FAILED
    code, result = _request("upgrade", {}, name, home, out, err, endpoint=target,
                            timeout=timeout, progress=True)
    if result is None:
        return code
    _print(out, _message(result, "upgraded"))
    pid = result.get("pid")
    # The old primary answers, then lets go of the endpoint, which the new one takes:
    # the command ends once it is the new one that answers there.
    deadline = time.monotonic() + HANDOVER_TIMEOUT
    while time.monotonic() < deadline:
        try:
            pong = call(target, "ping", timeout=1.0)
        except ControlError:
            pong = {}
        if pong.get("pid") == pid:
            _print(out, f"new primary pid {pid} answers on {target}")
            return EXIT_OK
        time.sleep(0.05)
    _print(err, f"forkd upgrade: the new primary (pid {pid}) did not answer on {target} "
                f"within {HANDOVER_TIMEOUT:g}s")
    return EXIT_FAILED


def stop(
    name: str | None,
    home: Path,
    graceful: bool = True,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    endpoint: str | None = None,
    timeout: float = LONG_TIMEOUT,
) -> int:
    """Stop the primary (gracefully: in-flight requests finish first)."""
    return _act(
        "stop", {"graceful": graceful}, "stopped", name, home, out, err,
        endpoint=endpoint, timeout=timeout, gone_is_done=True,
    )  # fmt: skip


def scale(
    name: str | None,
    home: Path,
    count_text: str,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    endpoint: str | None = None,
    timeout: float = LONG_TIMEOUT,
) -> int:
    """Set the worker count: "N", "+N" or "-N"."""
    try:
        args = validate_args("scale", {"count": count_text})
    except ProtocolError as exc:
        _print(err or sys.stderr, f"forkd {exc.message}")  # the message starts with "scale: "
        return EXIT_USAGE
    return _act(
        "scale", args, f"scaled ({count_text})", name, home, out, err,
        endpoint=endpoint, timeout=timeout,
    )  # fmt: skip


def status(
    name: str | None,
    home: Path,
    as_json: bool = False,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    endpoint: str | None = None,
    timeout: float = STATUS_TIMEOUT,
) -> int:
    """One row per worker, or with `as_json` the SPEC's status document on one line."""
    out, err = out or sys.stdout, err or sys.stderr
    code, result = _request(
        "status", {}, name, home, out, err, endpoint=endpoint, timeout=timeout
    )
    if result is not None:
        if as_json:
            _print(out, json.dumps(result))
        else:
            out.write(format_status(result, time.time()))
            out.flush()
    return code


def ls(
    home: Path,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    endpoint: str | None = None,
    timeout: float = STATUS_TIMEOUT,
) -> int:
    """One row per primary under FORKD_HOME (name, pid, workers, app, endpoint)."""
    out, err = out or sys.stdout, err or sys.stderr
    rows = []
    for name, endpoint in list_primaries(home):
        try:
            doc = call(endpoint, "status", timeout=timeout)
        except NoPrimary:
            continue  # it stopped since it answered the ping
        except ControlError as exc:
            rows.append([name, "?", "?", f"(no status: {exc.message})", endpoint])
            continue
        workers = doc.get("workers")
        rows.append([
            name,
            _text(doc.get("pid")),
            str(len(workers)) if isinstance(workers, list) else "-",
            _text(doc.get("app")),
            endpoint,
        ])
    out.write(format_table(["name", "pid", "workers", "app", "endpoint"], rows, right={1, 2}))
    out.flush()
    return EXIT_OK


def logs(
    name: str | None,
    home: Path,
    *,
    count: int = 50,
    follow: bool = False,
    slot: int | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    endpoint: str | None = None,
    timeout: float = STATUS_TIMEOUT,
) -> int:
    """The latest `count` lines; with `follow`, then every new line until interrupted.

    Following is a series of small requests, each carrying the cursor of the last line
    seen: a lost reply costs nothing, and lines that left the primary's bounded memory
    before they could be fetched are reported as missed, never skipped silently."""
    out, err = out or sys.stdout, err or sys.stderr
    base: dict[str, Any] = {"slot": slot, "json": as_json}
    try:
        target = endpoint or resolve(home, name)
        curve = curve_from_env(os.environ)
        page = call(target, "logs", {**base, "lines": count}, timeout=timeout, curve=curve)
        _print_page(out, err, page)
        primary = page.get("pid")
        while follow:
            if not page.get("more"):
                time.sleep(FOLLOW_EVERY)
            page = call(target, "logs", {**base, "after": page.get("cursor", 0)},
                        timeout=timeout, curve=curve)
            if page.get("pid") != primary:  # restarted under the same name: from its start
                primary = page.get("pid")
                _print(err, f"forkd logs: a new primary (pid {primary}) answers")
                page = call(target, "logs", {**base, "after": 0}, timeout=timeout, curve=curve)
            _print_page(out, err, page)
    except KeyboardInterrupt:
        return EXIT_OK
    except ConfigError as exc:
        _print(err, f"forkd logs: {exc}")
        return EXIT_USAGE
    except ControlError as exc:
        _print(err, _error_text("logs", exc))
        return EXIT_USAGE if exc.code in USAGE_CODES else EXIT_FAILED
    return EXIT_OK


def _print_page(out: TextIO, err: TextIO, page: dict[str, Any]) -> None:
    missed = page.get("missed")
    if isinstance(missed, int) and missed > 0:
        _print(err, f"forkd logs: {missed} line(s) missed (they left the primary's memory "
                    "of recent lines before they could be read)")
    lines = page.get("lines")
    if isinstance(lines, list) and lines:
        out.write("".join(f"{line}\n" for line in lines if isinstance(line, str)))
        out.flush()


# ------------------------------------------------------------------------- formatting


def format_status(doc: dict[str, Any], now: float) -> str:
    """The `forkd status` text for a status document. Pure; tolerant of missing fields
    (an older or newer primary), which show as "-"."""
    started = doc.get("started_at")
    uptime = _duration(now - started) if isinstance(started, int | float) else "-"
    bind = doc.get("bind")
    header = (
        f"{_text(doc.get('name'))}  pid {_text(doc.get('pid'))}  app {_text(doc.get('app'))}"
        f"  up {uptime}"
    )
    if isinstance(bind, list) and bind:
        header += "  bind " + ", ".join(str(b) for b in bind)
    workers = [w for w in doc.get("workers") or [] if isinstance(w, dict)]
    workers.sort(key=lambda w: (_sort_number(w.get("id")), _sort_number(w.get("started_at"))))
    rows = [_worker_row(w, now) for w in workers]
    columns = ["slot", "pid", "state", "uptime", "restarts", "last exit", "cpu%", "mem",
               "requests", "dir"]
    return header + "\n" + format_table(columns, rows, right={0, 1, 3, 4, 6, 7, 8})


def _worker_row(worker: dict[str, Any], now: float) -> list[str]:
    started = worker.get("started_at")
    cpu = worker.get("cpu_percent")
    rss = worker.get("rss")
    backoff = worker.get("backoff")
    state = _text(worker.get("state"))
    if isinstance(backoff, int | float):
        state = f"backoff {backoff:.0f}s"  # a slot waiting out a crash loop
    return [
        _text(worker.get("id")),
        _text(worker.get("pid")),
        state,
        _duration(now - started) if isinstance(started, int | float) else "-",
        _text(worker.get("restarts")),
        _text(worker.get("last_exit")),
        f"{cpu:.1f}" if isinstance(cpu, int | float) else "-",
        format_size(rss) if isinstance(rss, int) else "-",
        _text(worker.get("requests")),
        _text(worker.get("cwd")),  # the release directory the worker resolved (--chdir)
    ]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right: set[int] | None = None) -> str:
    """Columns padded to their widest cell, two spaces apart; `right` aligns numbers."""
    right = right or set()
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def format_size(size: int) -> str:
    """Bytes in the units of --max-memory (binary K/M/G): 41234432 -> "39.3M"."""
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    """Uptime the way `ps`/pm2 readers scan it: 45s, 3m 12s, 2h 5m, 4d 3h."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _sort_number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else float("inf")


# ------------------------------------------------------------------------- plumbing


def _act(
    command: str,
    args: dict[str, Any],
    done: str,
    name: str | None,
    home: Path,
    out: TextIO | None,
    err: TextIO | None,
    *,
    endpoint: str | None,
    timeout: float,
    gone_is_done: bool = False,
) -> int:
    """A mutating command: progress lines as they come, then the result's message or `done`."""
    out, err = out or sys.stdout, err or sys.stderr
    code, result = _request(
        command, args, name, home, out, err,
        endpoint=endpoint, timeout=timeout, progress=True, gone_is_done=gone_is_done,
    )  # fmt: skip
    if result is not None:
        _print(out, _message(result, done))
    return code


def _request(
    command: str,
    args: dict[str, Any],
    name: str | None,
    home: Path,
    out: TextIO,
    err: TextIO,
    *,
    endpoint: str | None,
    timeout: float,
    progress: bool = False,
    gone_is_done: bool = False,
) -> tuple[int, dict[str, Any] | None]:
    """(exit code, result); the result is None when the failure was already printed."""

    def show(message: str) -> None:
        _print(out, message)

    try:
        target = endpoint or resolve(home, name)
        result = call(target, command, args, timeout=timeout,
                      on_progress=show if progress else None,
                      curve=curve_from_env(os.environ))
    except ConfigError as exc:
        _print(err, f"forkd {command}: {exc}")
        return EXIT_USAGE, None
    except ControlError as exc:
        if gone_is_done and exc.code == Code.DISCONNECTED:
            # `stop` makes the primary exit; if its final answer was lost on the way, the
            # connection dropping is that answer.
            return EXIT_OK, {"message": "stopped (the primary exited)"}
        _print(err, _error_text(command, exc))
        return (EXIT_USAGE if exc.code in USAGE_CODES else EXIT_FAILED), None
    return EXIT_OK, result


def _error_text(command: str, exc: ControlError) -> str:
    message = exc.message.rstrip("\n")
    if exc.code == Code.BUSY and not message.startswith("busy"):
        message = f"busy: {message}"
    if "\n" in message:
        # A replacement worker's traceback: keep it readable, starting on its own line.
        return f"forkd {command}: failed:\n{message}"
    return f"forkd {command}: {message}"


def _message(result: dict[str, Any], default: str) -> str:
    message = result.get("message")
    return message if isinstance(message, str) and message else default


def _print(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()  # progress must show live even when stdout is a pipe
