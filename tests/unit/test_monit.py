"""`forkd monit`'s frame is a pure function of the status document: rows, totals,
and no cut cells, drawn by rich into a string."""

from __future__ import annotations

import io

from rich.console import Console

from forkd.monit import frame

DOC = {
    "name": "web", "pid": 4242, "app": "sample_app.asgi:app", "started_at": 1000.0,
    "target": 3, "rps": 812.5, "p50_ms": 1.25, "p99_ms": 9.5, "utilization": 0.42,
    "workers": [
        {"id": 1, "pid": 4251, "state": "ready", "started_at": 1001.0, "restarts": 2,
         "rss": 50 << 20, "cpu_percent": 12.5, "rps": 400.0, "p50_ms": 1.2, "p99_ms": 9.0,
         "utilization": 0.4},
        {"id": 0, "pid": 4250, "state": "ready", "started_at": 1001.0, "restarts": 0,
         "rss": 40 << 20, "cpu_percent": 10.0, "rps": 412.5, "p50_ms": 1.3, "p99_ms": 10.0,
         "utilization": 0.44},
        {"id": 2, "pid": None, "state": "starting", "started_at": None, "restarts": 5,
         "backoff": 3.2},
    ],
}


def draw(doc: dict, width: int = 120, live: bool = False) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(frame(doc, 1100.0, live=live))
    return out.getvalue()


def test_one_row_per_worker_in_slot_order_with_totals() -> None:
    text = draw(DOC)
    lines = text.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert rows[0][1:3] == ["4250", "ready"] and "412.5" in rows[0]
    assert "backoff 3s" in " ".join(rows[2]) and rows[2][1] == "-"
    total = next(line.split() for line in lines if line.split()[:1] == ["total"])
    assert total[1:4] == ["22.5", "90.0M", "812.5"] and total[-2:] == ["42", "7"]
    assert "web" in lines[0] and "2/3 ready" in lines[0]
    assert "q quits" not in text and "q quits" in draw(DOC, live=True)


def test_a_narrow_terminal_never_cuts_a_pid() -> None:
    text = draw(DOC, width=60)
    assert "4250" in text and "4251" in text and "…" not in text


def test_missing_fields_show_as_dashes() -> None:
    text = draw({"workers": [{"id": 0, "pid": 7, "state": "ready"}]})
    row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["0"])
    assert row[:3] == ["0", "7", "ready"] and set(row[3:10]) == {"-"}
