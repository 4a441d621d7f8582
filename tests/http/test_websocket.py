"""WebSockets for ASGI apps, driven by the real `websockets` client: echo, large and
fragmented messages, the size limit, subprotocols, close codes both ways, denial,
pings, a malformed handshake; and a WSGI app that sees an upgrade as plain HTTP."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import termios
import time
from typing import Any

import psutil
import pytest
from httpkit import Served, get
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect
from wskit import handshake, read_frames

from support import raw_exchange, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(serve) -> Served:
    return serve("ws_app:app")


@pytest.fixture(scope="module")
def strict(serve) -> Served:
    """Small limits: a 64 KiB message cap and pings after half a second of silence."""
    return serve("ws_app:app", "--ws-max-size", "64K", "--ws-ping-interval", "0.5",
                 "--ws-ping-timeout", "0.5")


def url(served: Served, path: str) -> str:
    return f"ws://127.0.0.1:{served.port}{path}"


def test_echo_text_and_binary(server: Served) -> None:
    with connect(url(server, "/echo"), open_timeout=10) as ws:
        ws.send("héllo, wörld")
        assert ws.recv(timeout=5) == "héllo, wörld"
        ws.send(b"\x00\xff\x10binary")
        assert ws.recv(timeout=5) == b"\x00\xff\x10binary"


def test_scope_names_path_query_and_scheme(server: Served) -> None:
    with connect(url(server, "/scope?room=7"), subprotocols=["one", "two"],
                 open_timeout=10) as ws:
        seen = json.loads(ws.recv(timeout=5))
    assert seen["scheme"] == "ws"
    assert seen["path"] == "/scope"
    assert seen["query"] == "room=7"
    assert seen["subprotocols"] == ["one", "two"]


def test_a_trusted_proxy_sets_client_and_scheme(server: Served) -> None:
    # 127.0.0.1 is in the default --forwarded-allow-ips, as a proxy on the host would be
    headers = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    with connect(url(server, "/scope"), additional_headers=headers, open_timeout=10) as ws:
        seen = json.loads(ws.recv(timeout=5))
    assert (seen["client"], seen["scheme"]) == ("203.0.113.9", "wss")


@pytest.mark.parametrize("compression", ["deflate", None])
def test_one_mebibyte_message_round_trips(server: Served, compression: str | None) -> None:
    payload = os.urandom(1 << 20)
    with connect(url(server, "/echo"), compression=compression, max_size=2 << 20,
                 open_timeout=10) as ws:
        assert bool(ws.protocol.extensions) is (compression is not None)
        ws.send(payload)
        assert ws.recv(timeout=20) == payload
        text = "ab" * (1 << 19)  # compressible: deflate carries it in a few KiB
        ws.send(text)
        assert ws.recv(timeout=20) == text


def test_fragmented_message_is_delivered_whole(server: Served) -> None:
    with connect(url(server, "/echo"), open_timeout=10) as ws:
        ws.send(["frag", "men", "ted"])  # three frames: TEXT, CONT, CONT(fin)
        assert ws.recv(timeout=5) == "fragmented"
        ws.send([b"\x01", b"\x02\x03"])
        assert ws.recv(timeout=5) == b"\x01\x02\x03"


def test_subprotocol_and_headers_chosen_on_accept(server: Served) -> None:
    with connect(url(server, "/subprotocol"), subprotocols=["graphql-ws", "chat"],
                 open_timeout=10) as ws:
        assert ws.subprotocol == "chat"
        assert ws.response.headers["x-ws-test"] == "yes"


def test_close_code_and_reason_from_the_app(server: Served) -> None:
    with connect(url(server, "/echo"), open_timeout=10) as ws:
        ws.send("close 4000 done here")
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "done here")


def test_close_code_and_reason_from_the_client_reach_the_app(server: Served) -> None:
    with connect(url(server, "/echo"), open_timeout=10) as ws:
        ws.send("ping?")
        ws.recv(timeout=5)
        ws.close(4321, "client leaves")
    wait_until(lambda: get(server.port, "/last").json().get("reason") == "client leaves",
               5, message="the app to see the disconnect")
    assert get(server.port, "/last").json() == {"code": 4321, "reason": "client leaves",
                                                 "path": "/echo"}


def test_denial_response_reaches_the_client(server: Served) -> None:
    with pytest.raises(InvalidStatus) as denied:
        connect(url(server, "/deny"), open_timeout=10)
    response = denied.value.response
    assert response.status_code == 401
    assert response.headers["x-denied"] == "yes"
    assert bytes(response.body) == b"no entry"


def test_close_before_accept_is_403_and_failure_before_accept_500(server: Served) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(url(server, "/refuse"), open_timeout=10)
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as failed:
        connect(url(server, "/fail-before-accept"), open_timeout=10)
    assert failed.value.response.status_code == 500


def test_malformed_handshake_is_400_and_the_worker_lives(server: Served) -> None:
    pid = server.pid()
    sock, head = handshake(server.port, key=False)
    sock.close()
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"Sec-WebSocket-Key" in raw_exchange(
        server.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
    # a version this server does not speak: 426 naming the one it does (RFC 6455 4.4)
    answer = raw_exchange(server.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 426 "), answer
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in answer
    assert server.pid() == pid
    with connect(url(server, "/echo"), open_timeout=10) as ws:
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"


def test_message_over_ws_max_size_closes_1009(strict: Served) -> None:
    with connect(url(strict, "/echo"), compression=None, open_timeout=10) as ws:
        at_limit = os.urandom(64 * 1024)
        ws.send(at_limit)
        assert ws.recv(timeout=5) == at_limit
        ws.send(os.urandom(64 * 1024 + 1))
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    wait_until(lambda: get(strict.port, "/last").json().get("code") == 1009, 5,
               message="the app to be told 1009")


def test_silent_client_is_pinged_then_closed_1011(strict: Served) -> None:
    sock, head = handshake(strict.port)
    try:
        assert head.startswith(b"HTTP/1.1 101 "), head
        started = time.monotonic()
        frames, ended = read_frames(sock, started + 8)
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    opcodes = [opcode for opcode, _ in frames]
    assert opcodes[:1] == [0x9], frames  # a ping first
    assert 0x8 in opcodes, frames  # then a close
    close_payload = frames[opcodes.index(0x8)][1]
    assert struct.unpack("!H", close_payload[:2])[0] == 1011
    assert ended, "the server kept the connection after closing"
    assert elapsed < 4.0  # interval 0.5 + timeout 0.5, on a 0.5 s clock, plus load


def test_client_that_answers_pings_stays_open(strict: Served) -> None:
    with connect(url(strict, "/echo"), ping_interval=None, open_timeout=10) as ws:
        deadline = time.monotonic() + 2.5  # several ping intervals and timeouts
        while time.monotonic() < deadline:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.5)  # nothing comes but pings (answered by the client)
        ws.send("alive")
        assert ws.recv(timeout=5) == "alive"


def test_client_close_is_acknowledged_cleanly(server: Served) -> None:
    with connect(url(server, "/echo"), open_timeout=10) as ws:
        ws.close(1000, "bye")
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=5)
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
    wait_until(lambda: get(server.port, "/last").json().get("reason") == "bye", 5,
               message="the app to see the disconnect")


def test_wsgi_app_answers_an_upgrade_as_plain_http(serve) -> None:
    wsgi = serve("ws_app:wsgi_app")
    with pytest.raises(InvalidStatus) as plain:
        connect(url(wsgi, "/echo"), open_timeout=10)
    assert plain.value.response.status_code == 200
    assert json.loads(bytes(plain.value.response.body)) == {"upgrade": "websocket",
                                                            "scheme": "http"}


def _peak_rss_while(pid: int, seconds: float) -> int:
    """The worker's largest RSS seen while polling for `seconds`."""
    process = psutil.Process(pid)
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.02)
    return peak


def test_an_app_that_does_not_read_holds_back_the_client(server: Served) -> None:
    """40 MiB sent to an app that reads nothing for 2 s: the worker buffers about a MiB
    (reading pauses), the client waits, and afterwards every byte arrives."""
    pid = server.pid()
    before = psutil.Process(pid).memory_info().rss
    chunk = b"\xcd" * (256 * 1024)
    with connect(url(server, "/hold?2"), compression=None, open_timeout=10) as ws:
        sender = __import__("threading").Thread(
            target=lambda: [ws.send(chunk) for _ in range(160)], daemon=True)
        sender.start()
        peak = _peak_rss_while(pid, 1.5)
        assert sender.is_alive(), "all 40 MiB were taken while the app read nothing"
        sender.join(30)
        assert not sender.is_alive()
    assert peak - before < 16 << 20, f"the worker grew by {(peak - before) >> 20} MiB"
    wait_until(lambda: get(server.port, "/last").json().get("path") == "/hold", 10,
               message="the app to count what it received")
    assert get(server.port, "/last").json()["received"] == 160 * len(chunk)


def test_a_client_that_does_not_read_holds_back_the_app(server: Served) -> None:
    """An app sending 40 MiB to a client that reads nothing for a while: its send waits
    (the worker does not buffer the lot), then the client gets every byte."""
    pid = server.pid()
    before = psutil.Process(pid).memory_info().rss
    with connect(url(server, "/flood"), compression=None, max_size=None,
                 max_queue=1, open_timeout=10) as ws:
        peak = _peak_rss_while(pid, 1.5)
        received = 0
        with pytest.raises(ConnectionClosedOK) as closed:
            while True:
                received += len(ws.recv(timeout=10))
    assert peak - before < 16 << 20, f"the worker grew by {(peak - before) >> 20} MiB"
    assert received == 160 * 256 * 1024
    assert closed.value.rcvd is not None and closed.value.rcvd.reason == "all sent"


def test_open_websockets_count_toward_limit_concurrency(serve) -> None:
    limited = serve("ws_app:app", "--limit-concurrency", "2")
    with connect(url(limited, "/echo"), open_timeout=10) as first, \
            connect(url(limited, "/echo"), open_timeout=10):
        with pytest.raises(InvalidStatus) as refused:
            connect(url(limited, "/echo"), open_timeout=10)
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["retry-after"] == "1"
        first.close()
    # both closed: room again
    wait_until(lambda: _handshake_status(limited) == 101, 10,
               message="a handshake to succeed once the others closed")


def _handshake_status(served: Served) -> int:
    try:
        with connect(url(served, "/echo"), open_timeout=10):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def test_a_handshake_larger_than_a_parser_slice(server: Served) -> None:
    """A handshake with 6 KB of cookies arrives in one read that the worker parses in
    4 KB slices: the upgrade happens in the second slice and the WebSocket works."""
    import base64
    import socket

    key = base64.b64encode(os.urandom(16)).decode()
    cookie = "c=" + "x" * 6000
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n"
                     f"Sec-WebSocket-Key: {key}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        mask = os.urandom(4)
        payload = b"after a big handshake"
        sock.sendall(bytes([0x82, 0x80 | len(payload)]) + mask
                     + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        frames, _ = read_frames(sock, time.monotonic() + 2)
    assert frames and frames[0] == (0x2, payload), frames


def test_a_frame_in_the_same_read_as_the_handshake_is_answered(server: Served) -> None:
    """A client that sends its first message right behind the handshake (one write, so
    one read on the server): the message is handled at once, not when more data comes."""
    import socket

    payload = b"sent with the handshake"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_handshake("/echo") + _masked(0x1, payload))
        _expect_101(sock)
        # (the client sends nothing more: an echo that waited for the next read never comes)
        frames, ended = read_frames(sock, time.monotonic() + 3)
    assert frames == [(0x1, payload)], (frames, ended)


def test_frames_sent_before_the_app_accepts_wait_for_it(server: Served) -> None:
    """The app takes half a second to accept; the client's message, sent right after
    its handshake, reaches the app once it has, and the connection stays open (it was
    taken for a closing one and cut after the close timeout)."""
    import socket

    payload = b"before the accept"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_handshake("/late-accept"))
        sock.sendall(_masked(0x1, payload))
        _expect_101(sock)
        # past the 3 s close timeout: the connection must still be open
        frames, ended = read_frames(sock, time.monotonic() + 4)
    assert frames == [(0x1, payload)], (frames, ended)
    assert not ended


def _handshake(path: str) -> bytes:
    import base64

    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key}\r\n\r\n").encode()


def _expect_101(sock: Any) -> None:
    """Read the handshake's answer byte by byte (nothing after it), and check it."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    return (bytes([0x80 | opcode, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def test_a_ping_before_the_accept_does_not_come_before_the_101(server: Served) -> None:
    """The client's first bytes back are the 101, not a pong the library queued while
    the app was still deciding; then the connection works."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_handshake("/late-accept") + _masked(0x9, b"hi"))
        _expect_101(sock)
        sock.sendall(_masked(0x1, b"after the ping"))
        frames, _ = read_frames(sock, time.monotonic() + 2)
    assert (0x1, b"after the ping") in frames, frames


def test_a_close_before_the_accept_gets_no_101_and_the_app_its_disconnect(
        server: Served) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_handshake("/late-accept") + _masked(0x8, b"\x03\xe8bye"))
        received = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    assert not received.startswith(b"HTTP/1.1 101"), received

    def seen() -> dict[str, object]:
        return get(server.port, "/last").json()

    wait_until(lambda: seen().get("path") == "/late-accept", 5, message=lambda: str(seen()))
    assert seen()["code"] == 1000


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (payload under 126 bytes)."""
    mask = os.urandom(4)
    return (bytes([0x80 | opcode, 0x80 | len(payload)]) + mask
            + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def test_a_pong_that_does_not_echo_the_ping_keeps_no_silent_client(strict: Served) -> None:
    """Unsolicited pongs (RFC 6455 allows them, as a heartbeat) do not answer our
    ping: a client silent until our ping comes, that then answers each ping, and keeps
    sending, pongs of its own that never echo the ping's payload is closed 1011 once
    --ws-ping-timeout passes, as a silent one is."""
    sock, head = handshake(strict.port)
    try:
        assert head.startswith(b"HTTP/1.1 101 "), head
        frames: list[tuple[int, bytes]] = []
        ended = False
        deadline = time.monotonic() + 5
        while not ended and 0x9 not in [opcode for opcode, _ in frames]:  # (silent)
            assert time.monotonic() < deadline, "no ping came"
            more, ended = read_frames(sock, time.monotonic() + 0.05)
            frames += more
        pinged = time.monotonic()
        while not ended and time.monotonic() - pinged < 6:
            sock.sendall(client_frame(0xA, b"mine"))  # (not the ping's payload)
            more, ended = read_frames(sock, time.monotonic() + 0.1)
            frames += more
        elapsed = time.monotonic() - pinged
    finally:
        sock.close()
    opcodes = [opcode for opcode, _ in frames]
    assert b"mine" not in [payload for opcode, payload in frames if opcode == 0x9]
    assert 0x8 in opcodes, frames
    close_payload = frames[opcodes.index(0x8)][1]
    assert struct.unpack("!H", close_payload[:2])[0] == 1011
    assert elapsed < 3.0, elapsed


@pytest.fixture(scope="module")
def unpinged(serve) -> Served:
    """No pings, and a client may take none of what waits on it for 0.5 s."""
    return serve("ws_app:app", "--ws-ping-interval", "0", "--header-timeout", "0.5")


def pong_until_cut(sock: socket.socket) -> float:
    """Send pongs (which any client may) ten a second and read nothing, until the
    server resets the connection: the seconds that took (fails past 8 s)."""
    started = time.monotonic()
    while time.monotonic() - started < 8:
        try:
            sock.sendall(client_frame(0xA, b"still here"))
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
        time.sleep(0.1)  # (the client's pace; what it waits for is the cut)
    raise AssertionError("never cut")


def assert_flood_was_freed(port: int) -> None:
    """/flood's send() raised ClientDisconnected once its client was cut."""
    wait_until(lambda: get(port, "/last").json().get("path") == "/flood", 5,
               message="the app's send() was never freed")
    assert get(port, "/last").json()["send_raised"] == "ClientDisconnected"


def test_an_upgrade_after_an_unread_answer_is_cut_when_it_never_reads(unpinged: Served
                                                                      ) -> None:
    """A client leaves a large answer unread (our writing is paused), then upgrades on
    the same connection to /flood and reads nothing: the pause began under HTTP, and
    the WebSocket still knows of it, so the app's send() waits and the client is cut."""
    sock = socket.create_connection(("127.0.0.1", unpinged.port), timeout=10)
    try:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        # (the answer's first bytes are here: its 16 MiB, more than the socket takes,
        # were written at once, and the server's writing is paused)
        wait_until(lambda: int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                      bytes(4)), "little") > 16384, 5)
        sock.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        pong_until_cut(sock)
    finally:
        sock.close()
    assert_flood_was_freed(unpinged.port)


def test_a_client_that_sends_but_never_reads_is_cut(unpinged: Served) -> None:
    """/flood sends 40 MiB; the client keeps sending (pongs, which any client may send)
    but reads nothing: once the socket is full and --header-timeout passes, the
    connection is reset, as an HTTP answer's would be (the app's send() is freed)."""
    sock, head = handshake(unpinged.port, "/flood")
    try:
        assert head.startswith(b"HTTP/1.1 101 "), head
        elapsed = pong_until_cut(sock)
    finally:
        sock.close()
    assert elapsed < 5.0, elapsed
    assert_flood_was_freed(unpinged.port)
