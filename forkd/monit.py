"""`forkd monit`: a live full-screen view of one primary's workers, refreshed every
second from its status document over the control channel; `q` quits. `--once`
prints one frame and exits. The frame is a pure function of the document
(`frame`), so it is tested without a terminal; rich draws it."""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from pathlib import Path
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from forkd.ctl import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _duration, format_size

REFRESH = 1.0  # seconds between frames
STATUS_TIMEOUT = 5.0
STATE_STYLE = {"ready": "green", "starting": "yellow", "draining": "magenta"}


def _num(value: Any, digits: int = 1, unit: str = "") -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value:.{digits}f}{unit}"


def frame(doc: dict[str, Any], now: float, note: str = "", live: bool = False) -> Group:
    """One screen for a status document."""
    workers = sorted((w for w in doc.get("workers") or [] if isinstance(w, dict)),
                     key=lambda w: (w.get("id") if isinstance(w.get("id"), int) else 1 << 30,
                                    w.get("started_at") or 0))
    started = doc.get("started_at")
    uptime = _duration(now - started) if isinstance(started, int | float) else "-"
    header = Text.assemble(
        ("forkd monit ", "bold"), (str(doc.get("name", "-")), "bold cyan"),
        f"  pid {doc.get('pid', '-')}  app {doc.get('app', '-')}  up {uptime}"
        f"  workers {sum(1 for w in workers if w.get('state') == 'ready')}/"
        f"{doc.get('target', len(workers))} ready")
    table = Table(expand=live, show_footer=True, header_style="bold", footer_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    total_cpu = sum(w["cpu_percent"] for w in workers
                    if isinstance(w.get("cpu_percent"), int | float))
    total_rss = sum(w["rss"] for w in workers if isinstance(w.get("rss"), int))
    columns = [("slot", "total"), ("pid", ""), ("state", ""), ("uptime", ""),
               ("cpu %", _num(total_cpu)), ("memory", format_size(total_rss)),
               ("req/s", _num(doc.get("rps"))), ("p50 ms", _num(doc.get("p50_ms"), 2)),
               ("p99 ms", _num(doc.get("p99_ms"), 2)),
               ("util %", _num(_pct(doc.get("utilization")), 0)),
               ("restarts", str(sum(_restarts_by_slot(workers).values())))]
    rows = []
    for w in workers:
        state = str(w.get("state", "-"))
        if isinstance(w.get("backoff"), int | float):
            state = f"backoff {w['backoff']:.0f}s"
        started_at = w.get("started_at")
        rss = w.get("rss")
        rows.append((
            str(w.get("id", "-")), str(w.get("pid") or "-"),
            Text(state, style=STATE_STYLE.get(state, "red")),
            _duration(now - started_at) if isinstance(started_at, int | float) else "-",
            _num(w.get("cpu_percent")), format_size(rss) if isinstance(rss, int) else "-",
            _num(w.get("rps")), _num(w.get("p50_ms"), 2), _num(w.get("p99_ms"), 2),
            _num(_pct(w.get("utilization")), 0), str(w.get("restarts", "-"))))
    for index, (title, footer) in enumerate(columns):
        # never shorten a cell to an ellipsis (a pid cut to "99…" is no pid): a narrow
        # terminal loses the rightmost columns instead
        widest = max([len(title), len(footer), *(len(str(row[index])) for row in rows)])
        table.add_column(title, footer=footer, justify="left" if index == 2 else "right",
                         no_wrap=True, min_width=widest)
    for row in rows:
        table.add_row(*row)
    parts: list[Any] = [header, table]
    operation = doc.get("operation")
    if operation:
        parts.append(Text(f"running: {operation}", style="yellow"))
    if note:
        parts.append(Text(note, style="red"))
    if live:
        parts.append(Text("q quits", style="dim"))
    return Group(*parts)


def _restarts_by_slot(workers: list[dict[str, Any]]) -> dict[Any, int]:
    """Restarts count per slot, and a slot can show on two rows (a replacement)."""
    slots: dict[Any, int] = {}
    for w in workers:
        if isinstance(w.get("restarts"), int):
            slots[w.get("id")] = max(slots.get(w.get("id"), 0), w["restarts"])
    return slots


def _pct(value: Any) -> float | None:
    return value * 100 if isinstance(value, int | float) else None


def _fetch(endpoint: str) -> dict[str, Any]:
    from forkd.control import call, curve_from_env

    return call(endpoint, "status", {}, timeout=STATUS_TIMEOUT,
                curve=curve_from_env(os.environ))


def run(name: str | None, home: Path, endpoint: str | None, once: bool,
        out: TextIO | None = None, err: TextIO | None = None) -> int:
    from forkd.control import resolve
    from forkd.errors import ConfigError, ControlError
    from forkd.protocol import USAGE_CODES

    out, err = out or sys.stdout, err or sys.stderr
    try:
        target = endpoint or resolve(home, name)
        doc = _fetch(target)
    except ConfigError as exc:
        err.write(f"forkd monit: {exc}\n")
        return EXIT_USAGE
    except ControlError as exc:
        err.write(f"forkd monit: {exc.message}\n")
        return EXIT_USAGE if exc.code in USAGE_CODES else EXIT_FAILED
    if once:
        console = Console(file=out, width=_width(out), highlight=False,
                          force_terminal=out.isatty() or None)
        console.print(frame(doc, time.time()))
        return EXIT_OK
    if not sys.stdin.isatty():
        err.write("forkd monit: the live view needs a terminal; use --once for one frame\n")
        return EXIT_USAGE
    return _live(target, doc, out)


def _width(out: TextIO) -> int | None:
    if out.isatty() or os.environ.get("COLUMNS"):
        return None  # the terminal's (or the caller's) width
    return 120


def _live(target: str, doc: dict[str, Any], out: TextIO) -> int:
    from forkd.errors import ControlError

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    console = Console(file=out, highlight=False)
    try:
        tty.setcbreak(fd)  # keys arrive one by one, unechoed; ^C still interrupts
        with Live(frame(doc, time.time(), live=True), console=console, screen=True,
                  auto_refresh=False) as live:
            while True:
                deadline = time.monotonic() + REFRESH
                while (left := deadline - time.monotonic()) > 0:
                    readable, _, _ = select.select([fd], [], [], left)
                    if readable and b"q" in os.read(fd, 64).lower():
                        return EXIT_OK
                note = ""
                try:
                    doc = _fetch(target)
                except ControlError as exc:
                    note = f"cannot reach the primary: {exc.message} (retrying)"
                live.update(frame(doc, time.time(), note, live=True), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
