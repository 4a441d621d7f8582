"""The log pipeline's parts without processes: lines, records, the ring, the writer
(rotation, reopen, a stalled output), the hub, the `logs` request's arguments."""

from __future__ import annotations

import json
import logging
import logging.config
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkd import log
from forkd.errors import ProtocolError
from forkd.logs import record
from forkd.logs.hub import LogHub
from forkd.logs.lines import LineSplitter
from forkd.logs.pipes import LineStream, RecordWriter, open_pipes
from forkd.logs.record import Entry
from forkd.logs.ring import Ring
from forkd.logs.writer import LogWriter
from forkd.protocol import validate_args

# ------------------------------------------------------------------------------ lines


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_lines_come_out_whole_however_the_pipe_cut_them(lines: list[bytes],
                                                         cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    splitter = LineSplitter(cap=1000)
    out: list[tuple[bytes, bool]] = []
    position, index = 0, 0
    while position < len(stream):
        size = cuts[index % len(cuts)]
        out += splitter.feed(stream[position:position + size])
        position += size
        index += 1
    out += splitter.close()
    assert out == [(line, False) for line in lines]


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(1, 50), min_size=1, max_size=30), st.integers(5, 60))
def test_blocks_of_whole_lines_are_the_lines_feed_gives(lines: list[bytes], cuts: list[int],
                                                        cap: int) -> None:
    """feed_block (the records' path) gives the same lines as feed; it declines only a
    read longer than the cap or where a line may be over it (feed cuts those)."""
    stream = b"".join(line + b"\n" for line in lines)
    blocks, reference = LineSplitter(cap=cap), LineSplitter(cap=cap)
    out: list[tuple[bytes, bool]] = []
    expected: list[tuple[bytes, bool]] = []
    position, index = 0, 0
    while position < len(stream):
        data = stream[position:position + cuts[index % len(cuts)]]
        block = blocks.feed_block(data)
        if block is None:
            assert len(data) > cap or any(len(line) >= cap for line in lines)
            out += blocks.feed(data)
        else:
            out += [(line, False) for line in block.split(b"\n")[:-1]]
        expected += reference.feed(data)
        position += len(data)
        index += 1
    assert out + blocks.close() == expected + reference.close()


def test_an_overlong_line_is_cut_into_marked_pieces_and_nothing_is_lost() -> None:
    splitter = LineSplitter(cap=10)
    out = splitter.feed(b"x" * 25)  # no newline yet: memory stays bounded
    assert out == [(b"x" * 10, True), (b"x" * 10, True)]
    out += splitter.feed(b"yy\nshort\n" + b"z" * 12 + b"\n")
    assert out[2:] == [(b"xxxxxyy", False), (b"short", False), (b"z" * 10, True),
                       (b"zz", False)]


def test_the_unfinished_last_line_is_kept_at_the_end_of_the_stream() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\nno newline") == [(b"a", False)]
    assert splitter.close() == [(b"no newline", False)]


# ---------------------------------------------------------------------------- records


def test_text_lines_of_forkd_and_of_the_app() -> None:
    ts = record.rfc3339(1796139097.0456)
    assert ts == "2026-12-01T15:31:37.045Z"
    own = Entry(ts=ts, level="warning", pid=7, slot=None, event="refused",
                fields={"command": "scale", "why": 'busy: "reload" runs', "none": None})
    assert record.to_text(own, "web") == (
        b'2026-12-01T15:31:37.045Z forkd[7] warning: event=refused command=scale '
        b'why="busy: \\"reload\\" runs"\n')
    worker = Entry(ts=ts, level="info", pid=9, slot=1, event="access", fields={"status": 200})
    assert record.to_text(worker, "web").startswith(b"2026-12-01T15:31:37.045Z "
                                                    b"forkd.worker.1[9] event=access status=200")
    app = Entry(ts=ts, level="info", pid=9, slot=1, stream="stderr", data=b"\xffraw")
    assert record.to_text(app, "web") == b"2026-12-01T15:31:37.045Z web.1[9] stderr: \xffraw\n"


def test_json_lines_carry_spec_fields_and_rename_what_would_collide() -> None:
    ts = "2026-12-01T15:31:37.045Z"
    about_worker = Entry(ts=ts, level="info", pid=7, slot=None, event="worker-ready",
                         fields={"slot": 0, "pid": 12, "ms": 85})
    assert json.loads(record.to_json(about_worker)) == {
        "ts": ts, "level": "info", "event": "worker-ready", "pid": 7, "slot": None,
        "worker_slot": 0, "worker_pid": 12, "ms": 85}
    same_pid = Entry(ts=ts, level="info", pid=7, slot=None, event="primary-started",
                     fields={"pid": 7})
    assert json.loads(record.to_json(same_pid))["pid"] == 7
    app = Entry(ts=ts, level="info", pid=9, slot=1, stream="stdout",
                data=b'na\xc3\xafve "quoted"\t\x01 \xff')  # the app's bytes, invalid UTF-8 too
    line = record.to_json(app)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"ts": ts, "level": "info", "stream": "stdout", "pid": 9,
                                "slot": 1, "message": 'naïve "quoted"\t\x01 \ufffd'}


def test_a_worker_record_is_passed_through_and_cannot_claim_another_slot() -> None:
    mine = Entry(ts="t", level="info", pid=9, slot=1, event="access", fields={"status": 200})
    raw = record.to_json(mine)
    entry = record.from_json(raw.rstrip(b"\n"), 1, 9)
    assert record.to_json(entry) is entry.raw == raw  # passed through, not re-encoded
    assert record.to_text(entry, "web") == b"t forkd.worker.1[9] event=access status=200\n"
    assert entry.fields == {"status": 200}  # decoded when text needed it
    forged = record.from_json(raw.rstrip(b"\n"), 0, 5)  # came through slot 0's pipe
    assert (forged.slot, forged.pid) == (0, 5)
    assert json.loads(record.to_json(forged))["slot"] == 0
    garbage = record.from_json(b"not json", 0, 5)
    assert (garbage.stream, garbage.data) == ("stderr", b"not json")


# ------------------------------------------------------------------------------- ring


def entry(slot: int | None, text: str) -> Entry:
    return Entry(ts="t", level="info", pid=1, slot=slot, stream="stdout", data=text.encode())


def test_ring_tail_cursor_and_missed_lines() -> None:
    ring = Ring(max_lines=5)
    for index in range(4):
        ring.append(entry(index % 2, f"l{index}"))
    assert [e.data for e in ring.tail(2).entries] == [b"l2", b"l3"]
    assert [e.data for e in ring.tail(5, slot=0).entries] == [b"l0", b"l2"]
    page = ring.since(2)
    assert [e.data for e in page.entries] == [b"l2", b"l3"] and page.cursor == 4
    for index in range(4, 12):
        ring.append(entry(0, f"l{index}"))
    page = ring.since(4)  # lines 5..7 left the ring before the reader came back
    assert page.missed == 3 and [e.data for e in page.entries][0] == b"l7"
    assert ring.since(12).entries == [] and ring.since(12).cursor == 12
    page = ring.since(4, limit=2)
    assert page.more and page.cursor == 9


@settings(max_examples=200, deadline=None)
@given(appends=st.lists(st.tuples(st.sampled_from([0, 1, None]), st.integers(1, 6),
                                  st.booleans()), max_size=30),
       max_lines=st.integers(1, 25), texts=st.booleans(), asks=st.lists(
           st.tuples(st.integers(0, 60), st.sampled_from([0, 1, None]), st.integers(1, 8)),
           min_size=1, max_size=5))
def test_a_ring_of_blocks_answers_as_a_ring_of_lines(
        appends: list[tuple[int | None, int, bool]], max_lines: int, texts: bool,
        asks: list[tuple[int, int | None, int]]) -> None:
    """A worker's records, or its app's output lines, kept as one block (the access
    log's and a chatty app's path) read back line by line exactly as if each line had
    been kept alone: tail, since, missed, limits."""
    blocks, lines = Ring(max_lines=max_lines), Ring(max_lines=max_lines)
    number = 0
    for slot, count, output in appends:
        if output and slot is not None:  # an app's output
            printed = [b"printed %d" % (number + index) for index in range(1, count + 1)]
            number += count
            if count > 1:
                blocks.append(Entry("t", "info", 1, slot, stream="stdout",
                                    data=b"\n".join(printed) + b"\n", count=count))
            for line in printed:
                if count == 1:
                    blocks.append(Entry("t", "info", 1, slot, stream="stdout", data=line))
                lines.append(Entry("t", "info", 1, slot, stream="stdout", data=line))
            continue
        raws, renderings = [], []
        for _ in range(count):
            number += 1
            raws.append(b'{"ts":"t","level":"info","event":"access","n":%d}\n' % number)
            renderings.append(b"t forkd.worker.0[1] access %d\n" % number if texts else None)
        if slot is None or count == 1:  # (the primary's own lines are never blocks)
            for raw, text in zip(raws, renderings, strict=True):
                blocks.append(Entry("t", "info", 1, slot, "access", raw=raw, text=text))
        else:
            block = b"".join(raw[:-1] + b"\t" + text if text else raw
                             for raw, text in zip(raws, renderings, strict=True))
            blocks.append(Entry("", "info", 1, slot, None, None, None, b"", block,
                                0, False, 0, None, count))
        for raw, text in zip(raws, renderings, strict=True):
            lines.append(Entry("t", "info", 1, slot, "access", raw=raw, text=text))
    assert blocks.lines == lines.lines and blocks.first_seq == lines.first_seq

    def seen(page):
        return ([(entry.seq, entry.slot, entry.raw, entry.text, entry.stream, entry.data)
                 for entry in page.entries], page.cursor, page.missed, page.more)

    for cursor, slot, limit in asks:
        assert seen(blocks.tail(limit, slot)) == seen(lines.tail(limit, slot))
        assert seen(blocks.since(cursor, slot, limit=limit)) == seen(
            lines.since(cursor, slot, limit=limit))


@settings(max_examples=300, deadline=None)
@given(printed=st.lists(st.binary(max_size=40).map(lambda line: line.replace(b"\n", b"")),
                        min_size=2, max_size=8),
       fmt=st.sampled_from(["text", "json"]), slot=st.integers(0, 3),
       stream=st.sampled_from(["stdout", "stderr"]))
def test_an_app_s_lines_read_together_are_rendered_as_each_alone(
        printed: list[bytes], fmt: str, slot: int, stream: str) -> None:
    """What the primary writes for a block of an app's output lines is, byte for byte,
    what it writes for each line alone (whatever bytes the app printed), and `forkd logs`
    reads the same lines back."""
    block = Entry("2026-12-01T15:31:37.045Z", "info", 77, slot, stream=stream,
                  data=b"\n".join(printed) + b"\n", count=len(printed))
    alone = [Entry(block.ts, "info", 77, slot, stream=stream, data=line) for line in printed]
    assert record.render_block(block, fmt, "web") == b"".join(
        record.render(entry, fmt, "web") for entry in alone)
    ring = Ring()
    ring.append(block)
    assert [(entry.seq, entry.ts, entry.stream, entry.data)
            for entry in ring.tail(100).entries] == [
        (seq, block.ts, stream, line) for seq, line in enumerate(printed, 1)]


def test_a_block_that_loses_some_lines_keeps_its_bytes_until_it_loses_all() -> None:
    """A full ring drops part of its oldest block: those lines are gone for readers at
    once, the block's bytes only when its last line goes (both bounds still hold)."""
    def block(first: int) -> Entry:
        return Entry("t", "info", 1, 0, stream="stdout", count=4,
                     data=b"".join(b"l%d\n" % number for number in range(first, first + 4)))

    ring = Ring(max_lines=6)
    ring.append(block(1))
    ring.append(block(5))  # lines 1 and 2 leave
    assert ring.lines == 6 and ring.first_seq == 3 and len(ring.entries) == 2
    assert [e.data for e in ring.tail(10).entries] == [b"l%d" % n for n in range(3, 9)]
    page = ring.since(1)
    assert page.missed == 1 and [e.seq for e in page.entries] == list(range(3, 9))
    first = ring.entries[0]
    assert ring.bytes == sum(e.size for e in ring.entries) <= ring.max_bytes
    ring.append(block(9))  # lines 3 to 6: the first block's last two, and two more
    assert ring.lines == 6 and ring.first_seq == 7 and len(ring.entries) == 2
    assert first not in ring.entries and ring.bytes == sum(e.size for e in ring.entries)
    assert [e.data for e in ring.tail(3).entries] == [b"l10", b"l11", b"l12"]
    assert [e.data for e in ring.since(0).entries] == [b"l%d" % n for n in range(7, 13)]


def test_ring_is_bounded_by_bytes_too() -> None:
    ring = Ring(max_lines=1000, max_bytes=10_000)
    for _ in range(100):
        ring.append(entry(0, "x" * 1000))
    assert ring.bytes <= 10_000 and len(ring.entries) < 10


# ----------------------------------------------------------------------------- writer


def lines_in(*paths: Path) -> list[bytes]:
    return [line for path in paths for line in path.read_bytes().splitlines()]


def test_rotation_keeps_whole_lines_and_n_old_files(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    writer = LogWriter(str(path), max_size=1000, keep=3)
    sent = [b"line %04d " % i + b"." * 80 + b"\n" for i in range(100)]
    for index, line in enumerate(sent):
        writer.write(line)
        if index % 7 == 0:
            writer.flush()
    writer.close()
    kept = [tmp_path / "app.log.3", tmp_path / "app.log.2", tmp_path / "app.log.1", path]
    assert not (tmp_path / "app.log.4").exists()
    for old in kept[:-1]:
        assert 900 <= old.stat().st_size <= 1000
    got = [line + b"\n" for line in lines_in(*kept)]
    assert got == sent[-len(got):]  # the newest lines, whole, in order


def test_reopen_after_the_file_was_moved(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    writer = LogWriter(str(path))
    writer.write(b"one\n")
    writer.flush()
    os.rename(path, tmp_path / "app.log.1")
    writer.write(b"two\n")
    writer.reopen()  # what was buffered goes to the old file first
    writer.write(b"three\n")
    writer.close()
    assert lines_in(tmp_path / "app.log.1") == [b"one", b"two"]
    assert lines_in(path) == [b"three"]


def test_a_stalled_pipe_buffers_then_drops_and_counts_never_cutting_a_line() -> None:
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(read_end, False)
        writer = LogWriter(stderr_fd=write_end, max_buffer=200_000)
        assert writer.output.owned  # our own non-blocking description of the pipe
        line = b"y" * 999 + b"\n"
        accepted = sum(writer.write(line) for _ in range(400))
        writer.flush()  # the pipe (64 KB) fills; the rest waits
        assert writer.pending and writer.dropped == 400 - accepted > 0
        assert writer.take_unreported() == 0  # not while the buffer is still full
        got = b""
        while writer.pending:
            try:
                got += os.read(read_end, 1 << 20)
            except BlockingIOError:
                pass
            writer.flush()
        got += os.read(read_end, 1 << 20)
        assert got == line * accepted
        assert writer.take_unreported() == 400 - accepted
        writer.close()
    finally:
        os.close(read_end)
        os.close(write_end)


# -------------------------------------------------------------------------------- hub


def test_hub_tags_worker_output_and_answers_logs_requests(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    hub = LogHub(LogWriter(str(path)), fmt="json", app_name="web")
    pipes = open_pipes()
    try:
        os.write(pipes.write["stdout"], b"hello\npart")
        os.write(pipes.write["records"], record.to_json(
            Entry(ts="t", level="info", pid=4242, slot=3, event="access",
                  fields={"status": 200})))
        readers = dict(pipes.read)
        hub.attach(pipes, slot=3, pid=4242)  # closes the worker's ends: end of file next
        for fd in readers.values():
            hub.on_readable(fd)  # the data
            hub.on_readable(fd)  # then, as the poller reports again, the end
        assert hub.readers == {}  # every pipe ended and was closed
        hub.submit(Entry(ts="t", level="info", pid=1, slot=None, event="all-ready",
                         fields={}))
        hub.flush()
        objects = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(o.get("stream") or o.get("event"), o["slot"]) for o in objects] == [
            ("stdout", 3), ("stdout", 3), ("access", 3), ("all-ready", None)]
        assert [o.get("message") for o in objects[:2]] == ["hello", "part"]
        page = hub.query(validate_args("logs", {"lines": 2, "slot": 3}))
        assert len(page["lines"]) == 2
        assert page["lines"][0].endswith(" web.3[4242] stdout: part")
        assert page["lines"][1].startswith("t forkd.worker.3[4242] event=access status=200")
        assert hub.query(validate_args("logs", {"after": page["cursor"]}))["lines"] == []
        hub.submit(Entry(ts="t", level="info", pid=1, slot=None, event="later", fields={}))
        follow = hub.query(validate_args("logs", {"after": page["cursor"], "json": True}))
        assert [json.loads(line)["event"] for line in follow["lines"]] == ["later"]
    finally:
        pipes.close_all()
        hub.close()


def test_logs_request_arguments_are_checked() -> None:
    assert validate_args("logs", {}) == {"lines": 50, "after": None, "slot": None,
                                         "json": False}
    assert validate_args("logs", {"after": 7, "slot": 1, "json": True})["after"] == 7
    for bad in ({"lines": -1}, {"lines": "5"}, {"slot": True}, {"json": 1}, {"tail": 1}):
        with pytest.raises(ProtocolError):
            validate_args("logs", bad)


# ---------------------------------------------------------------------- worker side


def test_line_stream_writes_each_thread_s_line_whole(tmp_path: Path) -> None:
    import threading

    read_end, write_end = os.pipe()
    stream = LineStream(write_end, "<stdout>")
    chunks: list[bytes] = []

    def drain() -> None:
        while data := os.read(read_end, 65536):
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()

    def spam(tag: str) -> None:
        for index in range(200):
            print(f"{tag} {index} " + tag * 3000, file=stream)

    threads = [threading.Thread(target=spam, args=(tag,)) for tag in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("no newline yet", end="", file=stream)
    stream.flush()
    os.close(write_end)
    reader.join(10)
    os.close(read_end)
    lines = b"".join(chunks).split(b"\n")
    assert lines[-1] == b"no newline yet"
    for line in lines[:-1]:
        tag, index, fill = line.decode().split(" ")
        assert fill == tag * 3000
    assert len(lines) - 1 == 800


def test_forkd_lines_survive_an_app_reconfiguring_logging() -> None:
    got: list[Entry] = []
    root = logging.getLogger()
    saved = ([(lg, lg.disabled) for lg in logging.Logger.manager.loggerDict.values()
              if isinstance(lg, logging.Logger)], list(root.handlers), root.level)
    log.setup(slot=2, sink=got.append)
    try:
        logging.config.dictConfig({
            "version": 1, "disable_existing_loggers": True,
            "handlers": {"h": {"class": "logging.NullHandler"}},
            "root": {"handlers": ["h"], "level": "CRITICAL"},
            "loggers": {"forkd": {"level": "CRITICAL", "propagate": True}},
        })
        log.guard()
        logging.getLogger("forkd.http").error("still here")
        log.event("access", status=200)
        assert [(e.event, e.level, e.slot) for e in got] == [
            ("log", "error", 2), ("access", "info", 2)]
        assert got[0].fields is not None and got[0].fields["message"] == "still here"
    finally:
        log.setup()
        logging.getLogger("forkd").propagate = True
        logging.getLogger("forkd").removeHandler(log._handler)
        for logger, disabled in saved[0]:
            logger.disabled = disabled
        root.handlers[:] = saved[1]
        root.setLevel(saved[2])


_field_bytes = st.binary(max_size=40) | st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.encode)


@settings(max_examples=300, deadline=None)
@given(path=_field_bytes, query=_field_bytes, rid=_field_bytes, referer=_field_bytes,
       agent=_field_bytes, status=st.integers(100, 599), size=st.integers(0, 10**9),
       micros=st.integers(0, 10**8), text=st.booleans())
def test_the_workers_fast_access_line_is_the_generic_line(
        path: bytes, query: bytes, rid: bytes, referer: bytes, agent: bytes, status: int,
        size: int, micros: int, text: bool) -> None:
    """What the worker renders itself (JSON, and with --log-format text its text line) is
    what the primary would render from the generic access event: same fields, same text,
    the first time these fields are seen and from the template made of them after."""
    from forkd.http import accesslog

    # three requests with the same fields (seen once, seen again: a template is made,
    # rendered from the template), each with its own id, size and duration
    fields = [accesslog.request_fields([(b"x-request-id", rid + b"%d" % sight),
                                        (b"referer", referer or b"-"),
                                        (b"user-agent", agent or b"-")])
              for sight in range(3)]
    sent: list[bytes] = []
    got: list[Entry] = []
    args = [(("10.0.0.9", 5555), "GET", b"/" + path, query, "1.1", fields[sight], status,
             size + sight, (micros + 7 * sight) / 1e6) for sight in range(3)]
    try:
        log.setup(slot=1, sink=got.append, json_sink=sent.append, access_text=text)
        for request in args:
            accesslog.log_access(*request)
        log.setup(slot=1, sink=got.append)  # no fast path: through event()
        for request in args:
            accesslog.log_access(*request)
    finally:
        log.setup()
    assert len(sent) == 3 and len(got) == 3
    for fast, generic, request_fields in zip(sent, got, fields, strict=True):
        _same_access_line(fast, generic, path, request_fields, text, query)


@pytest.mark.parametrize("text", [False, True])
def test_a_refused_request_s_line_holds_what_was_parsed_and_dashes_for_the_rest(
        text: bool) -> None:
    """A request forkd refused before its head was whole: the worker's line (first
    sight, then from its template) is the generic line, and its combined format's
    request is `-` when not even the target came (as nginx writes it); its id is the
    one it sent, else one made."""
    from forkd.http import accesslog

    client = ("10.0.0.9", 5555)
    lines = [accesslog.refused(client, None, b"", "0.0", None, None, 0.002),
             accesslog.refused(client, b"GET", b"/long?x=1", "0.0",
                               [(b"x-request-id", b"r1"), (b"user-agent", b"ua/1")], None, None),
             accesslog.refused(client, b"OPTIONS", b"*", "1.1", [], None, None)]
    sent: list[bytes] = []
    got: list[Entry] = []
    try:
        log.setup(slot=1, json_sink=sent.append, access_text=text)
        for line in lines * 2:
            accesslog.ended(line[0], 400, 12, *line[1:])
        log.setup(slot=1, sink=got.append)
        for line in lines * 2:
            accesslog.ended(line[0], 400, 12, *line[1:])
    finally:
        log.setup()
    entries = [record.from_json(line.rstrip(b"\n"), 1, os.getpid()) for line in sent]
    for entry, generic in zip(entries, got, strict=True):
        record.parse(entry)
        assert entry.fields and generic.fields
        # (the two were rendered a moment apart: their durations differ, as their times)
        generic.fields["duration_ms"] = entry.fields["duration_ms"]
        assert entry.fields == generic.fields
        assert (entry.text is not None) == text
        if entry.text is not None:
            generic.ts = entry.ts
            assert entry.text == record.to_text(generic, "app")
    assert [(fields["method"], fields["path"], fields["query"], fields["http_version"],
             fields["user_agent"])
            for fields in (entry.fields or {} for entry in entries[:3])] == [
        ("-", "-", "", "-", "-"), ("GET", "/long", "x=1", "-", "ua/1"),
        ("OPTIONS", "*", "", "1.1", "-")]
    # the request's own id, else one made (as for any request): every line has one
    made = [line[0][0].decode() for line in lines]
    assert made[1] == "r1" and made[0] != made[2]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in (made[0], made[2])), made
    assert [(entry.fields or {})["request_id"] for entry in entries[:3]] == made
    requests = [re.search(r'\] "([^"]*)" 400 12 ', record.to_text(entry, "app").decode())
                for entry in got[:3]]
    assert [match.group(1) for match in requests if match] == [
        "-", "GET /long?x=1 HTTP/-", "OPTIONS * HTTP/1.1"]


def test_long_fields_are_rendered_but_never_kept() -> None:
    """A request whose path, query, referer and agent are long together is logged as any
    other, but not remembered for a template: a scanner's long values would otherwise
    hold megabytes of every worker's memory."""
    from forkd.http import accesslog

    sent: list[bytes] = []
    long_agent = b"a" * accesslog.MAX_KEPT
    try:
        log.setup(slot=1, json_sink=sent.append)
        for _ in range(3):
            accesslog.log_access(("10.0.0.9", 5555), "GET", b"/x", b"", "1.1",
                                 (b"id1", b"-", long_agent), 200, 5, 0.001)
        assert not accesslog._seen and not accesslog._templates
        for _ in range(2):  # (short fields: remembered, then a template)
            accesslog.log_access(("10.0.0.9", 5555), "GET", b"/x", b"", "1.1",
                                 (b"id1", b"-", b"curl"), 200, 5, 0.001)
        assert len(accesslog._templates) == 1
    finally:
        log.setup()
    assert [json.loads(line)["user_agent"] for line in sent] == (
        [long_agent.decode()] * 3 + ["curl"] * 2)


def _same_access_line(fast: bytes, generic: Entry, path: bytes,
                      fields: tuple[bytes, bytes, bytes], text: bool, query: bytes) -> None:
    entry = record.from_json(fast.rstrip(b"\n"), 1, os.getpid())
    record.parse(entry)
    assert entry.fields == generic.fields
    parsed = json.loads(record.to_json(entry))
    assert parsed["path"] == ("/" + path.decode("latin-1"))
    assert parsed["request_id"] == fields[0].decode("latin-1")
    plain = all(re.fullmatch(rb"[\x20\x21\x23-\x5b\x5d-\x7e]*", value)
                for value in (path, query, *fields))
    assert (entry.text is not None) == (text and plain)
    if entry.text is not None:
        generic.ts = entry.ts  # (the two lines were made a moment apart)
        assert entry.text == record.to_text(generic, "app")


@pytest.mark.parametrize("take", ["begin", "request_fields"])
def test_request_ids_are_honoured_when_sane_else_made_and_shown_to_the_app(take: str) -> None:
    """begin (a request, a WebSocket handshake) and request_fields (forkd's refusals)
    each read the id, with the same rules; begin makes one when there is none it may
    honour (request_fields says `-`)."""
    from forkd.http import accesslog

    def fields(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, bytes]:
        got = getattr(accesslog, take)(headers)
        return got[0], got[1], got[2]

    def request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
        return fields(headers)[0]

    assert request_id([(b"x-request-id", b"abc-123")]) == b"abc-123"
    assert request_id([(b"x-request-id", b"x" * 200)]) == b"x" * 200
    # the first id counts, whatever the later ones hold
    assert request_id([(b"x-request-id", b"first"), (b"x-request-id", b"second")]) == b"first"
    # ("-" is what a line without an id shows: a client's "-" is no id either)
    for bad in ([b""], [b"-"], [b"has space"], [b"x" * 201], [b"\xffbin"], [b"caf\xc3\xa9"],
                [b"tab\there"], [b"bad id", b"good-id"]):
        headers = [(b"host", b"h"), *((b"x-request-id", value) for value in bad)]
        made = request_id(headers)
        if take == "request_fields":
            assert made == b"-" and len(headers) == len(bad) + 1, (bad, made)
            continue
        assert re.fullmatch(rb"[0-9a-f]{32}", made), (bad, made)
        assert headers[-1] == (b"x-request-id", made) and len(headers) == len(bad) + 2
    if take == "begin":
        assert len({request_id([]) for _ in range(1000)}) == 1000
    assert fields([(b"referer", b"http://r/"), (b"user-agent", b"ua/1")])[1:] == (
        b"http://r/", b"ua/1")
    assert fields([])[1:] == (b"-", b"-")


def test_a_failing_output_counts_and_reports_its_lost_lines(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    hub = LogHub(LogWriter(str(path)), fmt="text", app_name="web")
    full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    good = hub.writer.output.fd
    hub.writer.output.fd = full
    try:
        for index in range(3):
            hub.submit(Entry(ts="t", level="info", pid=1, slot=None, event="e",
                             fields={"n": index}))
        hub.writer.flush()
        assert hub.writer.dropped == 3
        hub.writer.output.fd = good  # the disk has room again
        hub.flush()
    finally:
        os.close(full)
        hub.close()
    text = path.read_text()
    assert "warning: event=log-dropped lines=3 total=3 why=\"ENOSPC: No space left on device\"" \
        in text, text


def test_the_text_access_line_is_the_combined_format_with_duration_and_id() -> None:
    entry = Entry(ts="2026-12-01T15:31:37.045Z", level="info", pid=9, slot=1, event="access",
                  fields={"remote": "10.0.0.7", "method": "GET", "path": "/session",
                          "query": "a=1", "status": 503, "bytes": 82, "duration_ms": 1.25,
                          "request_id": "abc", "http_version": "1.1", "referer": "-",
                          "user_agent": 'curl "8"'})
    assert record.to_text(entry, "web") == (
        b'2026-12-01T15:31:37.045Z forkd.worker.1[9] 10.0.0.7 - - [01/Dec/2026:15:31:37 +0000]'
        b' "GET /session?a=1 HTTP/1.1" 503 82 "-" "curl \\"8\\"" 1.25ms request_id=abc\n')


def test_records_wait_in_the_worker_when_the_pipe_is_full_and_drops_are_counted() -> None:

    class Loop:  # the calls a RecordWriter makes of an event loop, run by hand
        def __init__(self) -> None:
            self.later: list = []

        def call_later(self, delay: float, callback) -> None:
            self.later.append(callback)

    read_end, write_end = os.pipe()
    loop = Loop()
    reported: list[int] = []
    try:
        writer = RecordWriter(write_end)
        writer.MAX_HELD = 200_000
        writer.on_dropped = reported.append
        writer.attach_loop(loop)
        line = b"r" * 999 + b"\n"
        for _ in range(400):  # 400 KB: more than the pipe and the held bytes together
            writer(line)  # never blocks
        assert writer.pending and writer.dropped > 0
        got = b""
        while loop.later:
            loop.later.pop(0)()  # the retry timer fires...
            got += os.read(read_end, 1 << 20)  # ...and the primary reads
        assert not writer.pending
        assert len(reported) == 1 and reported[0] > 0  # the drop, counted and reported once
        assert got == line * (400 - reported[0])  # every line not dropped, whole, in order
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_pipe_the_kernel_would_not_grow_gets_batches_it_holds(monkeypatch) -> None:
    """A user over the pipe-buffer quota is refused F_SETPIPE_SZ and Linux gives their
    pipes two pages: the worker then writes batches that fit in what the pipe holds,
    not 128 KiB ones in dozens of partial writes, and a burst still arrives whole and
    in order."""
    import fcntl

    from forkd.logs import pipes as pipes_module

    real = fcntl.fcntl
    asked: list[int] = []

    def refusing(fd: int, command: int, arg: int = 0) -> int:
        if command == fcntl.F_SETPIPE_SZ:
            asked.append(arg)
            raise PermissionError(1, "Operation not permitted")
        return real(fd, command, arg)

    monkeypatch.setattr(pipes_module.fcntl, "fcntl", refusing)
    pipes = open_pipes()
    try:
        size = pipes_module.PIPE_SIZE  # (stdout, stderr, then records: its own, then it)
        assert asked == [size, size, pipes_module.RECORDS_PIPE_SIZE, size]
        read_end, write_end = pipes.read["records"], pipes.write["records"]
        assert pipes_module.RecordWriter(write_end).batch == min(
            pipes_module.RecordWriter.BATCH, real(write_end, fcntl.F_GETPIPE_SZ) // 2)
        real(write_end, fcntl.F_SETPIPE_SZ, 8192)  # (what Linux gives over the quota)
        writer = pipes_module.RecordWriter(write_end)
        assert writer.batch == 4096
        writer.attach_loop(type("Loop", (), {"call_later": lambda self, delay, cb: None})())
        lines = [b"%06d " % number + b"x" * (number % 300) + b"\n" for number in range(2000)]
        chunks: list[bytes] = []
        for line in lines:  # (the primary reads what each call wrote)
            writer(line)
            try:
                chunks.append(os.read(read_end, 1 << 20))
            except BlockingIOError:
                pass
        writer.flush()
        chunks.append(os.read(read_end, 1 << 20))
        assert b"".join(chunks) == b"".join(lines) and not writer.pending
        assert max(map(len, chunks)) < 4096 + 310  # (a batch: its last line took it over)
    finally:
        pipes.close_all()


def test_deferred_access_lines_keep_their_place_among_urgent_records() -> None:
    """A worker's access lines are rendered with their batch, not when the request ends;
    a warning written at once (it may precede a crash) still comes after the access
    lines before it, each access line is the one log_access renders at once, and its
    timestamp is the time its request ended."""
    from forkd.http import accesslog

    class Loop:
        def __init__(self) -> None:
            self.later: list = []

        def call_later(self, delay: float, callback) -> None:
            self.later.append(callback)

    read_end, write_end = os.pipe()
    fields = (b"rid-1", b"-", b"curl/8")
    calls = [(("10.0.0.9", 5555), "GET", b"/a/%d" % index, b"q=1", "1.1", fields, 200,
              index, 0.0025) for index in range(3)]
    try:
        writer = RecordWriter(write_end, render=accesslog.render)
        writer.attach_loop(Loop())
        log.setup(slot=2, json_sink=writer, access_sink=writer.defer)
        ended = time.time()
        for call in calls[:2]:
            accesslog.log_access(*call)
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):  # held, not rendered or written yet
            os.read(read_end, 1 << 16)
        assert writer.deferred == 2
        writer(b'{"warning":1}\n', urgent=True)  # written at once, after the two
        accesslog.log_access(*calls[2])
        real_time, real_perf = time.time, time.perf_counter
        time.time = lambda: real_time() + 5.0  # the batch is rendered 5 s after the last
        time.perf_counter = lambda: real_perf() + 5.0  # request ended
        try:
            writer.flush()
        finally:
            time.time, time.perf_counter = real_time, real_perf
        got = os.read(read_end, 1 << 20).splitlines(keepends=True)
        at_once: list[bytes] = []
        log.setup(slot=2, json_sink=at_once.append)
        for call in calls:
            accesslog.log_access(*call)
    finally:
        log.setup()
        os.close(read_end)
        os.close(write_end)
    assert len(got) == 4 and got[2] == b'{"warning":1}\n'
    access = [got[0], got[1], got[3]]
    for line, same in zip(access, at_once, strict=True):
        parsed, expected = json.loads(line), json.loads(same)
        stamp = datetime.strptime(parsed.pop("ts"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        assert ended - 0.002 <= stamp <= ended + 0.5  # when the request ended, not rendered
        expected.pop("ts")
        assert parsed == expected
    assert [json.loads(line)["path"] for line in access] == ["/a/0", "/a/1", "/a/2"]


@pytest.mark.parametrize("text", [False, True])
def test_a_batch_across_ms_and_second_boundaries_has_each_line_s_own_time(
        monkeypatch: pytest.MonkeyPatch, text: bool) -> None:
    """render keeps the batch's second and takes milliseconds from a table: each line's
    ts is still rfc3339 of its own end (as the generic line's), either side of a
    millisecond and of a second, from the first sight and from a template. The end and
    the duration are one clock reading: ts - duration is when begin took the request."""
    from types import SimpleNamespace

    from forkd.http import accesslog

    wall, perf = 1_764_603_097.25, 5_000.0  # render's clocks: offset = wall - perf
    offset = wall - perf
    monkeypatch.setattr(accesslog, "time", SimpleNamespace(time=lambda: wall,
                                                           perf_counter=lambda: perf))
    reads = iter([])

    def perf_counter() -> float:  # (a second reading in `ended` would take the next one)
        return next(reads)

    monkeypatch.setattr(accesslog, "perf_counter", perf_counter)
    second = 1_764_603_100
    walls = [second - 0.0005, second, second + 0.0005, second + 0.001, second + 0.9995,
             second + 1.0, second + 1.0005, second + 2.999]
    items: list[tuple] = []
    try:
        log.setup(slot=1, json_sink=lambda data: None, access_sink=items.append,
                  access_text=text)
        for when in walls:
            end = when - offset
            start = end - 0.0123
            reads = iter([start, end, end + 1.0])
            access = accesslog.begin([(b"x-request-id", b"r%d" % len(items))])
            accesslog.ended(access, 200, 5, ("10.0.0.9", 5555), "GET", b"/t", b"", "1.1")
            assert items[-1][0] - items[-1][1] == start  # one reading: ts - duration
        lines = accesslog.render(list(items))
    finally:
        log.setup()
    assert len(lines) == len(walls)
    for line, item in zip(lines, items, strict=True):
        json_part, _, text_part = line.partition(b"\t")
        parsed = json.loads(json_part)
        ts = record.rfc3339(item[0] + offset)
        assert parsed["ts"] == ts, (item[0] + offset, parsed["ts"])
        assert parsed["duration_ms"] == 12.3
        if text:
            assert record.clf_time(ts).encode() in text_part, text_part


def test_a_late_rendered_access_line_holds_what_its_request_had() -> None:
    """A worker renders a request's access line with its batch, after the app has had
    the request's headers (and may have changed them): the line holds the request id,
    referer and user agent the request came with (a made id: the one the app was
    shown), and the size and request line of when its response ended."""
    from forkd.http import accesslog

    class Loop:
        def call_later(self, delay: float, callback) -> None:
            pass

    read_end, write_end = os.pipe()
    made: list[bytes] = []
    try:
        writer = RecordWriter(write_end, render=accesslog.render)
        writer.attach_loop(Loop())
        log.setup(slot=2, json_sink=writer, access_sink=writer.defer)
        for sight in range(4):  # (seen once, then from the template)
            headers = [(b"host", b"example.test"), (b"referer", b"http://a.test/"),
                       (b"user-agent", b"curl/8")]
            if sight == 3:
                headers.append((b"x-request-id", b"lb-7"))
            access = accesslog.begin(headers)
            assert headers[-1][0] == b"x-request-id"  # the app sees the id
            made.append(headers[-1][1])
            headers[:] = [(b"referer", b"http://b.test/"), (b"user-agent", b"changed"),
                          (b"x-request-id", b"changed")]  # the app rewrites them
            accesslog.ended(access, 200, 10 + sight, ("10.0.0.9", 5555), "GET",
                            b"/p/%d" % sight, b"q=1", "1.1")
        assert writer.deferred == 4  # held, not rendered yet
        writer.flush()
        got = [json.loads(line) for line in os.read(read_end, 1 << 20).splitlines()]
    finally:
        log.setup()
        os.close(read_end)
        os.close(write_end)
    assert made[3] == b"lb-7" and len(set(made)) == 4
    assert [line["request_id"] for line in got] == [rid.decode() for rid in made]
    assert [(line["referer"], line["user_agent"]) for line in got] == [
        ("http://a.test/", "curl/8")] * 4
    assert [(line["path"], line["query"], line["bytes"]) for line in got] == [
        (f"/p/{sight}", "q=1", 10 + sight) for sight in range(4)]


def test_an_access_line_that_cannot_be_rendered_is_counted_and_the_rest_go_out() -> None:

    def render(items: list) -> list[bytes]:
        raise ValueError("a bug")

    read_end, write_end = os.pipe()
    try:
        writer = RecordWriter(write_end, render=render)
        reported: list[int] = []
        writer.on_dropped = reported.append
        writer.attach_loop(type("Loop", (), {"call_later": lambda self, delay, cb: None})())
        writer(b"before\n")
        writer.defer(("an", "access", "line"))
        writer(b"after\n", urgent=True)
        writer.flush()
        assert os.read(read_end, 1 << 16) == b"before\nafter\n"
        assert reported == [1] and not writer.pending
        for _ in range(3):  # a batch of access lines only, as most are
            writer.defer(("an", "access", "line"))
        writer.flush()
        assert reported == [1, 3] and not writer.pending and writer.size == 0
    finally:
        os.close(read_end)
        os.close(write_end)


def through_the_primary(path: Path, block: bytes, fmt: str
                        ) -> tuple[list[bytes], int, list[int]]:
    """`block` written into slot 2's records pipe (this process posing as its worker) and
    read by a LogHub writing `fmt` to `path`, as the primary does: the lines written, how
    many lines its ring holds, and how many lines each of the ring's entries holds."""
    hub = LogHub(LogWriter(str(path)), fmt=fmt, app_name="web")
    pipes = open_pipes()
    try:
        os.write(pipes.write["records"], block)
        fd = pipes.read["records"]
        hub.attach(pipes, slot=2, pid=os.getpid())
        hub.on_readable(fd)
        hub.flush()
        return (path.read_bytes().splitlines(), hub.ring.lines,
                [entry.count for entry in hub.ring.entries])
    finally:
        pipes.close_all()
        hub.close()


def each_alone(block: bytes, fmt: str) -> list[bytes]:
    """Each of the block's lines as the primary writes it when it comes alone."""
    return [record.render(record.from_json(line.rstrip(b"\n"), 2, os.getpid()), fmt,
                          "web").rstrip(b"\n")
            for line in block.splitlines()]


@pytest.mark.parametrize("text", [False, True])
def test_one_access_line_that_cannot_be_rendered_loses_no_other_line(text: bool) -> None:
    """A value no line can hold (a str where the path's bytes go) costs its own line,
    counted as dropped, never the other lines of its batch, before or after it."""
    from forkd.http import accesslog

    read_end, write_end = os.pipe()
    try:
        writer = RecordWriter(write_end, render=accesslog.render)
        reported: list[int] = []
        writer.on_dropped = reported.append
        writer.attach_loop(type("Loop", (), {"call_later": lambda self, delay, cb: None})())
        log.setup(slot=2, json_sink=writer, access_sink=writer.defer, access_text=text)
        for number, path in enumerate((b"/a", b"/b", "bad", b"/c", b"/d")):
            access = accesslog.begin([(b"x-request-id", b"id%d" % number)])
            accesslog.ended(access, 200, 5, ("10.0.0.9", 5555), "GET", path,  # type: ignore[arg-type]
                            b"", "1.1")
        writer.flush()
        os.set_blocking(read_end, False)  # (all there is was written: never wait)
        try:
            got = os.read(read_end, 1 << 20).splitlines()
        except BlockingIOError:
            got = []
    finally:
        log.setup()
        os.close(read_end)
        os.close(write_end)
    assert [(obj["request_id"], obj["path"]) for obj in
            (json.loads(line.split(b"\t")[0]) for line in got)] == [
        ("id0", "/a"), ("id1", "/b"), ("id3", "/c"), ("id4", "/d")]
    assert reported == [1]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_block_of_access_records_passes_through_whole_and_a_stray_line_is_caught(
        tmp_path: Path, fmt: str) -> None:
    """A worker's batch of access records reaches the output as the lines each record
    makes alone, and the ring as that many lines; a line among them that is not such a
    record (another slot's, another of the worker's own records, or no record at all)
    sends the block the line-by-line way, and comes out as it would alone."""
    from forkd.http import accesslog

    items = [(time.perf_counter(), 0.001, (b"id%d" % index, b"-", b"curl/8", 0.0), 200, index,
              ("10.0.0.9", 5555), "GET", b"/a", b"", "1.1") for index in range(6)]
    try:
        log.setup(slot=2, json_sink=lambda line: None, access_text=fmt == "text")
        lines = accesslog.render(items)
        log.setup(slot=3, json_sink=lambda line: None)
        foreign = accesslog.render(items[:1])[0]  # names slot 3
    finally:
        log.setup()
    own = record.to_json(Entry("2026-12-01T15:31:37.045Z", "warning", os.getpid(), 2,
                               "log-dropped", {"lines": 3}))  # the worker's, no access line
    blocks = [b"".join(lines), b"".join(lines[:3] + [foreign] + lines[3:]),
              b"".join(lines[:3] + [own] + lines[3:]),
              b"".join(lines[:3] + [b'{"ts":"x"}\n'] + lines[3:]),
              b"".join(lines[:3] + [b"x}\n"] + lines[3:]),
              b"".join(lines[:3] + [b"x\n"] + lines[3:])]
    for number, block in enumerate(blocks):
        written, ring_lines, entries = through_the_primary(tmp_path / f"out{number}.log",
                                                           block, fmt)
        assert len(written) == block.count(b"\n") == ring_lines
        alone = each_alone(block, fmt)
        if number in (0, 2):  # (the worker's own records: each as it is alone)
            assert written == alone
            # (access records only: the block kept whole, as one entry of all its
            # lines; with another record among them, line by line)
            assert entries == ([len(lines)] if number == 0 else [1] * len(written))
        else:  # the stray line is told apart; every access record is as alone
            assert [written[i] for i in (0, 1, 2, 4, 5, 6)] == [
                alone[i] for i in (0, 1, 2, 4, 5, 6)]
            if fmt == "json":
                assert json.loads(written[3])["slot"] == 2  # (claimed 3: not believed)


# Remote addresses a log line must escape: no proxy's node gives one now (see
# http.proxy._address), but the access log must not trust where its remote came from.
HOSTILE_REMOTES = ['fe80::1%a","pid":999,"slot":7,"y":"', "fe80::1%a\tb", "fe80::1%\u00e9\\",
                   # (the part every access record of slot 2 holds once, twice)
                   'fe80::1%' + record.access_marker(os.getpid(), 2).decode() * 2]


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("remote", HOSTILE_REMOTES)
def test_a_remote_address_is_escaped_as_any_other_field(tmp_path: Path, fmt: str,
                                                        remote: str) -> None:
    """Whatever the remote address holds, each access record is one line whose JSON
    parses to the request's fields and the worker's pid and slot, as the primary would
    render it from the generic event; through the primary, a block of them (with
    another of the worker's records among them or not) comes out as each line alone."""
    from forkd.http import accesslog

    calls = [((remote, 80), "GET", b"/a", b"n=%d" % sight, "1.1", (b"id%d" % sight, b"-",
                                                                   b"curl/8"), 200, sight, 0.001)
             for sight in range(3)]  # (three first sights)
    calls += [(calls[0][0], "GET", b"/a", b"", "1.1", (b"id%d" % sight, b"-", b"curl/8"),
               200, sight, 0.001) for sight in range(3, 6)]  # (templated, then from it)
    sent: list[bytes] = []
    got: list[Entry] = []
    try:
        log.setup(slot=2, json_sink=sent.append, access_text=fmt == "text")
        for call in calls:
            accesslog.log_access(*call)
        log.setup(slot=2, sink=got.append)
        for call in calls:
            accesslog.log_access(*call)
    finally:
        log.setup()
    for line, generic in zip(sent, got, strict=True):
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        entry = record.from_json(line.rstrip(b"\n"), 2, os.getpid())
        assert entry.text is None  # (the combined format escapes otherwise: the primary's)
        obj = json.loads(entry.raw or b"")
        assert (obj["pid"], obj["slot"], obj["remote"], obj["method"], obj["path"],
                obj["status"], "y" in obj) == (os.getpid(), 2, remote, "GET", "/a", 200, False)
        record.parse(entry)
        assert entry.fields == generic.fields
    own = record.to_json(Entry("2026-12-01T15:31:37.045Z", "warning", os.getpid(), 2,
                               "log-dropped", {"lines": 3}))
    for number, block in enumerate((b"".join(sent), b"".join(sent[:3] + [own] + sent[3:]))):
        written, ring_lines, _ = through_the_primary(tmp_path / f"out{number}.log", block,
                                                     fmt)
        alone = each_alone(block, fmt)
        assert written == alone and ring_lines == len(alone)
        if fmt == "json":
            assert [json.loads(line)["remote"] for line in written
                    if b'"event":"access"' in line] == [remote] * len(calls)


def test_a_thread_whose_batch_meets_a_detached_loop_writes_it_at_once() -> None:
    """A WSGI thread logs as the worker detaches its loop (the drain): the batch it
    would have scheduled on the loop is written by the thread, not lost to an error."""
    read_end, write_end = os.pipe()
    try:
        writer = RecordWriter(write_end)
        writer.loop_thread = threading.get_ident()  # (this thread is the loop's)
        writer.loop = None  # (what detach_loop does first, from the loop's thread)
        writer.pending.append(b"late\n")
        writer.held, writer.lines = 5, 1
        errors: list[BaseException] = []

        def schedule() -> None:
            try:
                writer._schedule()
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)

        thread = threading.Thread(target=schedule)
        thread.start()
        thread.join(10)
        assert errors == [] and os.read(read_end, 100) == b"late\n"
    finally:
        os.close(read_end)
        os.close(write_end)
