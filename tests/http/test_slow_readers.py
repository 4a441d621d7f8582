"""Streamed answers (a download, server-sent events) to clients that read slowly or never:
one that takes nothing, or less than --min-body-rate, is cut (its connection, and the
app's task or thread with it, are not held for ever: a slowloris of readers), the app
learning it as a disconnect; one that reads slowly but steadily gets its whole answer."""

from __future__ import annotations

import json
import re
import select
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpkit import Conn, Response, Served, pattern

from support import APPS, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

HEADER_TIMEOUT = 0.5  # also the longest a client may take no bytes at all
MIN_RATE = 1 << 20  # --min-body-rate: bytes per second, judged over 5 s
OPTIONS = ("--header-timeout", str(HEADER_TIMEOUT), "--min-body-rate", str(MIN_RATE))


def _load_block():  # the WSGI app's blocks, to recompute its body
    import importlib.util

    spec = importlib.util.spec_from_file_location("wsgi_flow", APPS / "wsgi_flow.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.block


block = _load_block()


@pytest.fixture(scope="module")
def asgi(serve) -> Served:
    return serve("http_asgi_probe:app", *OPTIONS)


@pytest.fixture(scope="module")
def wsgi(serve) -> Served:
    # (--wsgi-inline never: every call on a thread, as a streamed result is anyway; the
    # access line of an answer cut tells when its thread is done with it)
    return serve("wsgi_flow:app", *OPTIONS, "--threads", "2", "--wsgi-inline", "never",
                 "--access-log")


UNIX_RATE = 16 * 1024  # --min-body-rate of the unix-socket server: bytes per second


@pytest.fixture(scope="module")
def unix_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="forkd-slow-") as tmp:  # (a short path)
        yield Path(tmp) / "s.sock"


@pytest.fixture(scope="module")
def asgi_unix(unix_path: Path, serve) -> Served:  # (the path first: torn down last)
    return serve("http_asgi_probe:app", "-b", f"unix:{unix_path}", "--header-timeout",
                 str(HEADER_TIMEOUT), "--min-body-rate", str(UNIX_RATE))


def connect_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # (a small window)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def read_at(sock: socket.socket, rate: int, limit: float) -> tuple[bytes, bool]:
    """Read at about `rate` bytes per second until a chunked answer's last chunk, the
    connection's end, or `limit` seconds: (what came, whether it ended in a reset)."""
    got = bytearray()
    step = rate // 20  # (each 0.05 s)
    sock.setblocking(False)
    start = time.monotonic()
    due = start
    while time.monotonic() - start < limit:
        due += 0.05
        want = step
        while want > 0:
            try:
                data = sock.recv(want)
            except BlockingIOError:
                break
            except ConnectionResetError:
                return bytes(got), True
            if not data:
                return bytes(got), False
            got += data
            want -= len(data)
        if got.endswith(b"\r\n0\r\n\r\n"):
            return bytes(got), False
        select.select([], [], [], max(0.0, due - time.monotonic()))  # (the pace)
    return bytes(got), False


def parse(raw: bytes) -> Response:
    conn = Conn(socket.socket(), bytearray(raw), eof=True)  # (only its buffer is read)
    try:
        return conn.read_response()
    finally:
        conn.close()


def cuts_logged(output: str) -> int:
    """The count of slow-reader cuts the latest summary line gives (0: none yet)."""
    counts = re.findall(r"cut \d+ more connection\(s\) whose client took its answer too "
                        r"slowly.*: (\d+) since start", output)
    return int(counts[-1]) if counts else 0


def ends_in_reset(sock: socket.socket, limit: float = 5.0) -> bool:
    """Drain what the client never read: the connection ends in a reset (a cut), not
    in the answer's end."""
    sock.settimeout(limit)
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return False
    except ConnectionResetError:
        return True
    return False


def test_a_streamed_asgi_answer_to_a_client_that_never_reads_is_cut(asgi: Served) -> None:
    """The app streams without end; the client reads nothing: within about
    --header-timeout of the socket filling, the connection is cut, and the app's send()
    raises an OSError (ASGI 2.4), after which receive() says http.disconnect."""
    before = cuts_logged(asgi.proc.output())
    with connect(asgi.port) as sock:
        sent = time.monotonic()
        sock.sendall(b"GET /endless?id=never HTTP/1.1\r\nHost: t\r\n\r\n")
        told = json.loads(asgi.marker("cut-never", timeout=10))
        took = time.monotonic() - sent
        assert told == {"error": "ClientDisconnected", "oserror": True,
                        "receive": "http.disconnect"}
        assert HEADER_TIMEOUT <= took < HEADER_TIMEOUT + 3, took
        assert ends_in_reset(sock)
    # counted, and told as a summary line (as 408s are: not one line per connection;
    # at most one per 10 s, so this cut's may come up to 10 s after one before it)
    output = wait_until(lambda: (lambda out: cuts_logged(out) > before and out)(
        asgi.proc.output()), 12, message=asgi.proc.describe)
    assert "exception in ASGI app" not in output


def test_a_streamed_asgi_answer_taken_below_the_rate_floor_is_cut(asgi: Served) -> None:
    """A client that takes some of it every tick (256 KiB/s: the kernel passes it on in
    steps of some 24 KB, each well within --header-timeout) but under --min-body-rate
    is cut once the rate is judged (over 5 s of writing waiting on it, however many
    pauses: a smaller send buffer than loopback's makes them short), not sooner."""
    with connect(asgi.port) as sock:
        sent = time.monotonic()
        sock.sendall(b"GET /endless?id=trickle&chunk=4096 HTTP/1.1\r\nHost: t\r\n\r\n")
        got, reset = read_at(sock, MIN_RATE // 4, 20)
        took = time.monotonic() - sent
        assert reset, (len(got), took)
        assert 5 <= took < 10, took
    told = json.loads(asgi.marker("cut-trickle", timeout=5))
    assert told["oserror"] and told["receive"] == "http.disconnect"


@pytest.mark.parametrize("interface", ["asgi", "wsgi"])
def test_a_slow_steady_reader_gets_a_large_streamed_answer_whole(
        interface: str, request) -> None:
    """24 MiB at 2 MiB/s (12 s; twice --min-body-rate): the socket's send buffer (up
    to 4 MiB on loopback) and the transport's fill, and writing stays paused for 10 s
    or more, a second or more at a time (until a third of that buffer is free), longer
    than --header-timeout, and over two of the 5 s windows the rate is judged in. The
    client keeps taking bytes, above the floor: nothing is cut (a rule that counted
    half of what it takes would cut it)."""
    served = request.getfixturevalue(interface)
    blocks = 24 * 16  # (64 KiB each)
    if interface == "asgi":
        size = blocks << 16
        target = f"/stream?n={size}&chunk=65536"
        expected = pattern(size)
    else:
        target = f"/blocks?n={blocks}&size=65536&id=steady"
        expected = b"".join(block(i, 65536) for i in range(blocks))
    with connect(served.port) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        raw, reset = read_at(sock, 2 * MIN_RATE, 25)
    assert not reset, len(raw)
    response = parse(raw)
    assert (response.status, len(response.body)) == (200, len(expected))
    assert response.body == expected
    assert not (served.markers / "closed-steady").exists()


def test_a_streamed_wsgi_result_to_a_client_that_never_reads_is_cut(wsgi: Served) -> None:
    """The same for a WSGI generator on a pool thread: the connection is cut, the write
    raises in the thread, the generator is closed (the thread is free again), and the
    log has the answer's access line (the status it started), not that the app failed,
    nor a line per client gone."""
    with connect(wsgi.port) as sock:
        sent = time.monotonic()
        sock.sendall(b"GET /blocks?id=never HTTP/1.1\r\nHost: t\r\n\r\n")
        yielded = int(wsgi.marker("closed-never", timeout=10))
        took = time.monotonic() - sent
        assert HEADER_TIMEOUT <= took < HEADER_TIMEOUT + 3, took
        assert yielded > 0
        assert ends_in_reset(sock)
    output = wait_until(lambda: (lambda out: '"GET /blocks?id=never HTTP/1.1" 200 ' in out
                                 and out)(wsgi.proc.output()), 5, message=wsgi.proc.describe)
    assert "exception in WSGI app" not in output
    assert "ended by" not in output
    assert "was not cut" not in output  # (the protocol's cut, not the thread's backstop)


def test_a_steady_reader_on_a_unix_socket_is_not_cut(asgi_unix: Served, unix_path: Path
                                                      ) -> None:
    """nginx on a `unix:` bind, streaming to a slow client: the reader takes 32 KiB/s,
    twice the floor, but a unix socket shows what it took only in steps of a kernel
    buffer (some 37 KB, a second apart here, longer than --header-timeout) and wakes the
    writer only when three quarters of its buffer are free: the stream goes on for
    longer than a rate window, with no cut."""
    with connect_unix(unix_path) as sock:
        sock.sendall(b"GET /endless?id=unix-steady HTTP/1.1\r\nHost: t\r\n\r\n")
        got, _ = read_at(sock, 2 * UNIX_RATE, 7)
        # (before the close, which ends the app's stream. A cut unix socket shows no
        # reset, its reader gets what the kernel held, then the end: the app's marker
        # and what came tell the cut.)
        assert not (asgi_unix.markers / "cut-unix-steady").exists()
        assert len(got) >= 2 * UNIX_RATE * 7 * 0.8, len(got)


def test_a_client_that_never_reads_on_a_unix_socket_is_cut(asgi_unix: Served,
                                                            unix_path: Path) -> None:
    """Nothing taken at all, on a unix socket: cut once 64 KiB's worth at the floor
    (4 s here) has passed without a step of progress, the app told as on TCP."""
    with connect_unix(unix_path) as sock:
        sent = time.monotonic()
        sock.sendall(b"GET /endless?id=unix-never HTTP/1.1\r\nHost: t\r\n\r\n")
        told = json.loads(asgi_unix.marker("cut-unix-never", timeout=15))
        took = time.monotonic() - sent
        assert told["oserror"] and told["receive"] == "http.disconnect"
        assert 65536 / UNIX_RATE <= took < 65536 / UNIX_RATE + 3, took


@pytest.fixture(scope="module")
def wsgi_upload(serve) -> Served:
    # (a small --wsgi-body-buffer: the call starts on a thread after 1 KiB of body, and
    # what the app leaves unread stays under the 64 KiB at which reading pauses for
    # the whole test; a floor of 512 B/s for the body and the answer)
    return serve("wsgi_flow:app", "--header-timeout", str(HEADER_TIMEOUT),
                 "--min-body-rate", "512", "--threads", "2", "--wsgi-inline", "never",
                 "--wsgi-body-buffer", "1024", "--access-log")


def test_a_wsgi_thread_answering_before_the_body_is_freed_from_a_client_trickling_it(
        wsgi_upload: Served) -> None:
    """The app streams its answer before it reads the body; the client sends its body
    at 2 KB/s (above the floor: the body alone is never cut) and reads nothing. The
    thread waits on that client: within about --header-timeout of the socket filling
    the connection is cut and the generator is closed (the thread is free), while the
    upload would have gone on for minutes."""
    with connect(wsgi_upload.port) as sock:
        sent = time.monotonic()
        sock.sendall(b"POST /blocks?id=upload HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Length: 1048576\r\n\r\n" + b"u" * 2048)
        sock.setblocking(False)
        closed = wsgi_upload.markers / "closed-upload"
        reset = False
        while not closed.exists() and time.monotonic() - sent < 10:
            try:
                sock.send(b"u" * 200)  # (each 0.1 s)
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                reset = True
                break
            time.sleep(0.1)
        yielded = int(wsgi_upload.marker("closed-upload", timeout=5))
        took = time.monotonic() - sent
        assert HEADER_TIMEOUT <= took < HEADER_TIMEOUT + 3, took
        assert yielded > 0
        assert reset or ends_in_reset(sock)
    output = wait_until(lambda: (lambda out: '"POST /blocks?id=upload HTTP/1.1" 200 ' in out
                                 and out)(wsgi_upload.proc.output()), 5,
                        message=wsgi_upload.proc.describe)
    assert "was not cut" not in output  # (the protocol's cut, not the thread's backstop)
