"""The ZeroMQ control channel over real sockets: files and modes, who may talk, garbage.

A FakePrimary runs a real ControlServer in a thread with a small dispatch loop shaped like
the primary's (poll the server's sockets, handle_ready(), answer), so every byte goes
through libzmq. Tests that start processes (clients run as `nobody`) are integration.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

import forkd
from forkd.control import (
    ControlServer,
    CurveKeys,
    Peer,
    call,
    default_home,
    endpoint_for,
    ensure_home,
    ipc_listening,
    list_primaries,
    resolve,
    zap_verdict,
)
from forkd.errors import ConfigError, ControlError, NoPrimary, ProtocolError
from forkd.protocol import COMMANDS, MAX_FRAME, PROTOCOL_VERSION, parse_scale

REPO = Path(forkd.__file__).resolve().parents[1]


def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


class FakePrimary:
    """A ControlServer in a thread, dispatching like the primary does (in miniature).

    A reload runs one step per loop turn while `hold` is clear, so a test can pause it
    and send other requests meanwhile; a second mutating request gets "busy"."""

    def __init__(self, endpoint: str, *, workers: int = 4, **server_args: Any) -> None:
        self.endpoint = endpoint
        self.workers = workers
        self.server_args = server_args
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.hold = threading.Event()
        self.reloads_done = 0
        self.progress_results: list[bool] = []
        self.mute = False  # answer nothing, and send strays with other ids instead
        self.die_now = threading.Event()  # close the server as if the primary crashed
        self.server: ControlServer | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._reload: tuple[Peer, str, int] | None = None  # peer, request id, next step
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakePrimary:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            server = ControlServer(self.endpoint, **self.server_args)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.server = server
        self.endpoint = server.endpoint
        poller = zmq.Poller()
        for sock in server.sockets():
            poller.register(sock, zmq.POLLIN)
        self._ready.set()
        last_peer: Peer | None = None
        try:
            while not self._stop.is_set() and not self.die_now.is_set():
                if poller.poll(10):
                    for peer, request in server.handle_ready():
                        last_peer = peer
                        self._dispatch(server, peer, request.id, request.command, request.args)
                if self.mute and last_peer is not None:
                    server.reply_ok(last_peer, "someone-else", {"stray": True})
                self._step_reload(server)
        finally:
            server.close()

    def _dispatch(
        self, server: ControlServer, peer: Peer, rid: str, command: str, args: dict[str, Any]
    ) -> None:
        self.received.append((command, args))
        if self.mute:
            return
        if COMMANDS[command] and self._reload is not None:
            step = self._reload[2]
            server.reply_error(peer, rid, "busy", f"reload in progress ({step}/{self.workers})")
        elif command == "status":
            server.reply_ok(peer, rid, status_doc(self.workers))
        elif command == "reload":
            self._reload = (peer, rid, 1)
        elif command == "scale":
            try:
                self.workers = parse_scale(args["count"], self.workers)
            except ProtocolError as exc:
                server.reply_error(peer, rid, exc.code, exc.message)
                return
            server.reply_ok(peer, rid, {"message": f"scaled to {self.workers} workers"})
        elif command == "stop":
            server.reply_ok(peer, rid, {"message": "stopped"})
            self._stop.set()

    def _step_reload(self, server: ControlServer) -> None:
        if self._reload is None or self.hold.is_set():
            return
        peer, rid, step = self._reload
        sent = server.progress(
            peer, rid, f"slot {step}/{self.workers}: pid {100 + step} → {200 + step}, ready"
        )
        self.progress_results.append(sent)
        if step < self.workers:
            self._reload = (peer, rid, step + 1)
            return
        server.reply_ok(peer, rid, {"message": f"reloaded {self.workers} workers"})
        self._reload = None
        self.reloads_done += 1


def status_doc(workers: int) -> dict[str, Any]:
    return {
        "name": "web", "pid": os.getpid(), "app": "sample_app.asgi:app",
        "bind": ["127.0.0.1:8000"], "started_at": 1700000000.0,
        "workers": [
            {"id": i, "pid": 1000 + i, "state": "ready", "started_at": 1700000001.0,
             "restarts": 0, "last_exit": None, "rss": 41234432, "cpu_percent": 3.5,
             "requests": 10 * i}
            for i in range(workers)
        ],
    }


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return ensure_home(tmp_path / "home")


@pytest.fixture
def primary(home: Path) -> Iterator[FakePrimary]:
    with FakePrimary(endpoint_for(home, "web")) as fake:
        yield fake


def raw_exchange(endpoint: str, frames: list[bytes], timeout: float = 5.0) -> list[bytes]:
    """Send raw frames from a DEALER and return the first reply's frames."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert sock.poll(int(timeout * 1000)), f"no reply to {frames[0][:40]!r}"
        return sock.recv_multipart()
    finally:
        sock.close()
        ctx.term()


# ------------------------------------------------------------------------ FORKD_HOME


def test_default_home_order() -> None:
    assert default_home({"FORKD_HOME": "/srv/f", "XDG_RUNTIME_DIR": "/run/user/1"}) == Path(
        "/srv/f"
    )
    assert default_home({"XDG_RUNTIME_DIR": "/run/user/1", "HOME": "/home/a"}) == Path(
        "/run/user/1/forkd"
    )
    assert default_home({"HOME": "/home/a"}) == Path("/home/a/.forkd")
    assert default_home({"FORKD_HOME": "", "HOME": "/home/a"}) == Path("/home/a/.forkd")
    assert default_home({"FORKD_HOME": "rel"}).is_absolute()


def test_home_is_created_owner_only_even_under_a_loose_umask(tmp_path: Path) -> None:
    previous = os.umask(0o000)
    try:
        home = ensure_home(tmp_path / "a" / "forkd")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert ensure_home(home) == home  # an existing private one is fine


def test_existing_loose_home_is_refused_not_chmodded(tmp_path: Path) -> None:
    loose = tmp_path / "shared"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(ConfigError, match=r"open to other users \(mode 0755\).*chmod 700"):
        ensure_home(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o755


def test_home_of_another_user_or_a_file_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        ensure_home(theirs)
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        ensure_home(afile)


def test_endpoint_for_checks_the_name_and_the_path_length(tmp_path: Path) -> None:
    assert endpoint_for(tmp_path, "web") == f"ipc://{tmp_path}/web.sock"
    for bad in ("../etc", "a/b", ".hidden", "", "-x", "x" * 65):
        with pytest.raises(ConfigError):
            endpoint_for(tmp_path, bad)
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        endpoint_for(tmp_path / ("d" * 100), "web")


# -------------------------------------------------------------- the socket file and lock


def test_socket_is_0600_and_the_umask_is_restored(home: Path) -> None:
    previous = os.umask(0o022)
    try:
        with ControlServer(endpoint_for(home, "web")):
            mode = (home / "web.sock").stat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert stat.S_IMODE((home / "web.sock.lock").stat().st_mode) == 0o600
            assert os.umask(0o022) == 0o022
    finally:
        os.umask(previous)


def test_close_removes_socket_and_lock(home: Path) -> None:
    server = ControlServer(endpoint_for(home, "web"))
    server.close()
    server.close()  # idempotent
    assert list(home.iterdir()) == []


def test_second_primary_with_the_same_name_is_refused_and_the_first_keeps_serving(
    primary: FakePrimary, home: Path
) -> None:
    before = (home / "web.sock").stat().st_ino
    with pytest.raises(ControlError) as info:
        ControlServer(endpoint_for(home, "web"))
    message = info.value.message
    assert f"a primary named 'web' is already running (pid {os.getpid()})" in message
    assert "forkd stop web" in message
    assert (home / "web.sock").stat().st_ino == before
    assert call(primary.endpoint, "ping", timeout=5)["pid"] == os.getpid()


def test_stale_socket_of_a_dead_primary_is_replaced(home: Path) -> None:
    path = home / "web.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, then closed without unlinking: what a SIGKILL leaves
    dead.close()
    (home / "web.sock.lock").write_text("999999\n")  # its lock file, no longer locked
    assert not ipc_listening(str(path))
    with pytest.raises(NoPrimary, match="stale"):
        call(endpoint_for(home, "web"), "ping", timeout=5)
    with FakePrimary(endpoint_for(home, "web")) as fake:
        assert call(fake.endpoint, "ping", timeout=5)["pid"] == os.getpid()


def test_a_socket_held_open_by_orphaned_workers_is_replaced(home: Path) -> None:
    # Workers inherit the primary's listening socket: after a SIGKILL of the primary the
    # file still accepts connections, but nothing ever answers on it.
    path = home / "web.sock"
    orphaned = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        orphaned.bind(str(path))
        orphaned.listen()
        assert ipc_listening(str(path))
        with FakePrimary(endpoint_for(home, "web")) as fake:
            assert call(fake.endpoint, "ping", timeout=5)["pid"] == os.getpid()
    finally:
        orphaned.close()


def test_a_live_primary_is_not_taken_over_even_without_its_lock_file(
    primary: FakePrimary, home: Path
) -> None:
    (home / "web.sock.lock").unlink()  # say, an over-eager cleanup script
    before = (home / "web.sock").stat().st_ino
    with pytest.raises(ControlError, match=f"a primary \\(pid {os.getpid()}\\) already answers"):
        ControlServer(endpoint_for(home, "web"))
    assert (home / "web.sock").stat().st_ino == before
    assert call(primary.endpoint, "ping", timeout=5)["pid"] == os.getpid()


def test_a_file_that_is_not_a_socket_is_not_deleted(home: Path) -> None:
    (home / "web.sock").write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(endpoint_for(home, "web"))
    assert (home / "web.sock").read_text() == "precious"


def test_a_forked_worker_closing_the_server_leaves_the_primarys_files(home: Path) -> None:
    endpoint = endpoint_for(home, "web")
    with ControlServer(endpoint) as server:
        [lock_fd] = server.child_close_fds()
        assert os.fstat(lock_fd).st_ino == (home / "web.sock.lock").stat().st_ino
        pid = os.fork()
        if pid == 0:  # the worker: must not unlink the primary's socket or keep its lock
            try:
                server.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stat.S_ISSOCK((home / "web.sock").stat().st_mode)
        with pytest.raises(ControlError, match="already running"):
            ControlServer(endpoint)


def test_tcp_without_curve_is_refused() -> None:
    with pytest.raises(ControlError, match="tcp:// .*needs CURVE keys"):
        ControlServer("tcp://127.0.0.1:0")


@pytest.mark.parametrize("endpoint", ["inproc://x", "udp://127.0.0.1:1", "ipc://"])
def test_other_transports_are_refused(endpoint: str) -> None:
    with pytest.raises(ControlError, match="unsupported control endpoint"):
        ControlServer(endpoint)


def test_tcp_with_curve_answers_only_the_key_holder() -> None:
    public, secret = zmq.curve_keypair()
    with FakePrimary(
        "tcp://127.0.0.1:0", curve_secret_key=secret, curve_public_key=public
    ) as fake:
        assert fake.endpoint.startswith("tcp://127.0.0.1:")
        keys = CurveKeys(public=public, secret=secret)
        assert call(fake.endpoint, "status", timeout=5, curve=keys)["pid"] == os.getpid()
        other_public, other_secret = zmq.curve_keypair()
        stranger = CurveKeys(public=other_public, secret=other_secret, server=public)
        with pytest.raises(ControlError) as info:
            call(fake.endpoint, "scale", {"count": "+1"}, timeout=5, curve=stranger)
        assert info.value.code == "unauthorized"
        with pytest.raises(ControlError) as info:
            call(fake.endpoint, "scale", {"count": "+1"}, timeout=2)
        assert info.value.code in ("unauthorized", "timeout")
        assert fake.received == [("status", {})]
        assert fake.server is not None and fake.server.refused >= 1


# ----------------------------------------------------------------- requests and replies


def test_ping_is_answered_by_the_server_itself(primary: FakePrimary) -> None:
    assert call(primary.endpoint, "ping", timeout=5) == {
        "pid": os.getpid(), "protocol": PROTOCOL_VERSION,
    }
    assert primary.received == []


def test_reload_streams_progress_in_order(primary: FakePrimary) -> None:
    lines: list[str] = []
    result = call(primary.endpoint, "reload", timeout=10, on_progress=lines.append)
    assert result == {"message": "reloaded 4 workers"}
    assert lines == [f"slot {i}/4: pid {100 + i} → {200 + i}, ready" for i in range(1, 5)]


def test_error_reply_raises_control_error_with_its_code(primary: FakePrimary) -> None:
    with pytest.raises(ControlError) as info:
        call(primary.endpoint, "scale", {"count": "-4"}, timeout=5)
    assert info.value.code == "bad-args"
    assert "cannot scale to 0 workers" in info.value.message
    assert primary.workers == 4


def test_second_mutating_request_during_a_reload_is_busy(primary: FakePrimary) -> None:
    primary.hold.set()
    outcome: dict[str, Any] = {}
    lines: list[str] = []
    reloader = threading.Thread(
        target=lambda: outcome.update(
            result=call(primary.endpoint, "reload", timeout=20, on_progress=lines.append)
        )
    )
    reloader.start()
    try:
        wait_until(lambda: ("reload", {}) in primary.received)
        for command, args in (("scale", {"count": "+1"}), ("reload", {}), ("stop", {})):
            with pytest.raises(ControlError) as info:
                call(primary.endpoint, command, args, timeout=5)
            assert (info.value.code, info.value.message) == ("busy", "reload in progress (1/4)")
        assert call(primary.endpoint, "status", timeout=5)["pid"] == os.getpid()
        assert primary.workers == 4
    finally:
        primary.hold.clear()
        reloader.join(20)
    assert outcome["result"] == {"message": "reloaded 4 workers"} and len(lines) == 4


def test_client_that_goes_away_mid_reload_does_not_stop_it(primary: FakePrimary) -> None:
    primary.hold.set()
    request = {"v": 1, "id": "r-gone", "command": "reload", "args": {}}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(primary.endpoint)
    sock.send(json.dumps(request).encode())
    wait_until(lambda: ("reload", {}) in primary.received)
    sock.close()
    ctx.term()
    primary.hold.clear()
    wait_until(lambda: primary.reloads_done == 1)
    assert len(primary.progress_results) == 4
    assert call(primary.endpoint, "ping", timeout=5)["pid"] == os.getpid()


def test_replies_with_other_ids_are_ignored_and_the_deadline_is_absolute(
    primary: FakePrimary,
) -> None:
    primary.mute = True  # strays with another id arrive every 10 ms
    started = time.monotonic()
    with pytest.raises(ControlError) as info:
        call(primary.endpoint, "status", timeout=0.5)
    elapsed = time.monotonic() - started
    assert info.value.code == "timeout"
    assert "no answer from the primary at" in info.value.message
    assert 0.5 <= elapsed < 2.0


def test_primary_dying_mid_reload_ends_the_wait_at_once(primary: FakePrimary) -> None:
    primary.hold.set()
    errors: list[ControlError] = []

    def reload_until_failure() -> None:
        try:
            call(primary.endpoint, "reload", timeout=60)
        except ControlError as exc:
            errors.append(exc)

    reloader = threading.Thread(target=reload_until_failure)
    reloader.start()
    wait_until(lambda: ("reload", {}) in primary.received)
    started = time.monotonic()
    primary.die_now.set()
    reloader.join(20)
    assert [e.code for e in errors] == ["disconnected"]
    assert time.monotonic() - started < 10


def test_no_primary_and_stale_endpoints_fail_fast(home: Path) -> None:
    started = time.monotonic()
    with pytest.raises(NoPrimary):
        call(endpoint_for(home, "nothing"), "status", timeout=30)
    assert time.monotonic() - started < 5


def test_replies_to_a_vanished_or_silent_client_never_block(primary: FakePrimary) -> None:
    server = primary.server
    assert server is not None
    # A client that connects, asks, and never reads: replies pile up to SNDHWM, then drop.
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    try:
        sock.connect(primary.endpoint)
        sock.send(json.dumps({"v": 1, "id": "q", "command": "reload", "args": {}}).encode())
        primary.hold.set()
        wait_until(lambda: ("reload", {}) in primary.received)
        started = time.monotonic()
        for _ in range(5000):  # from this thread: the server sends without blocking
            server.progress(Peer(b"\x00gone", "uid:0"), "q", "to nobody")
        assert time.monotonic() - started < 5
    finally:
        sock.close()
        ctx.term()
        primary.hold.clear()
    wait_until(lambda: primary.reloads_done == 1)


# ---------------------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"\xff\xfe\x00\x01garbage"], "bad-json"),
        ([b"{not json"], "bad-json"),
        ([b""], "bad-json"),
        ([b"[" * 30_000 + b"]" * 30_000], "bad-json"),
        ([b"[1, 2, 3]"], "bad-request"),
        ([b'{"v": 1, "id": "g1", "command": "format-disk", "args": {}}'], "unknown-command"),
        ([b'{"v": 7, "id": "g2", "command": "status", "args": {}}'], "bad-version"),
        ([b'{"v": 1, "id": "g3", "command": "scale", "args": {"count": "x"}}'], "bad-args"),
        ([b"one", b"two", b"three"], "bad-request"),
    ],
)
def test_garbage_gets_an_error_reply_and_the_server_keeps_serving(
    primary: FakePrimary, frames: list[bytes], code: str
) -> None:
    reply = json.loads(raw_exchange(primary.endpoint, frames)[0])
    assert reply["kind"] == "error" and reply["code"] == code
    if b'"id": "g' in frames[0]:
        assert reply["id"] == json.loads(frames[0])["id"]  # addressed to the asker
    assert primary.received == []
    assert call(primary.endpoint, "status", timeout=5)["pid"] == os.getpid()


def test_a_10_mb_frame_is_dropped_by_the_transport(primary: FakePrimary) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(primary.endpoint)
        sock.send(b'{"v": 1, "id": "big", "command": "status", "args": {"x": "'
                  + b"x" * (10 * 1024 * 1024) + b'"}}')
        # libzmq hangs up on the sender rather than handing the frame to the primary.
        assert monitor.poll(10_000), "the server did not drop the oversized sender"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        assert sock.poll(0) == 0
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close()
        ctx.term()
    assert primary.received == []
    assert call(primary.endpoint, "status", timeout=5)["pid"] == os.getpid()


def test_a_frame_just_under_the_cap_is_still_read(primary: FakePrimary) -> None:
    body = b'{"v": 1, "id": "pad", "command": "status", "args": {"x": "'
    frame = body + b"x" * (MAX_FRAME - len(body) - 3) + b'"}}'
    assert len(frame) == MAX_FRAME
    reply = json.loads(raw_exchange(primary.endpoint, [frame])[0])
    assert (reply["id"], reply["code"]) == ("pad", "bad-args")


def test_bytes_that_are_not_zmtp_do_not_disturb_the_server(
    primary: FakePrimary, home: Path
) -> None:
    for junk in (os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n", b"\xff" + b"\x00" * 8 + b"\x7f"):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            raw.connect(str(home / "web.sock"))
            raw.sendall(junk)
        except OSError as exc:  # the server may hang up before we finish: that is fine
            assert exc.errno in (errno.EPIPE, errno.ECONNRESET)
        finally:
            raw.close()
    assert call(primary.endpoint, "status", timeout=5)["pid"] == os.getpid()
    assert primary.received == [("status", {})]


def test_a_reply_json_cannot_carry_becomes_an_internal_error(home: Path) -> None:
    with ControlServer(endpoint_for(home, "web")) as server:
        peer_request: list[Any] = []

        def serve_one() -> None:
            poller = zmq.Poller()
            for sock in server.sockets():
                poller.register(sock, zmq.POLLIN)
            deadline = time.monotonic() + 10
            while not peer_request and time.monotonic() < deadline:
                poller.poll(10)
                peer_request.extend(server.handle_ready())
            peer, request = peer_request[0]
            server.reply_ok(peer, request.id, {"cpu_percent": float("nan")})

        # The client must run concurrently: the server's loop is this test's thread.
        outcome: list[BaseException] = []
        client = threading.Thread(target=lambda: _catch(outcome, server.endpoint))
        client.start()
        serve_one()
        client.join(10)
    assert isinstance(outcome[0], ControlError) and outcome[0].code == "internal"
    assert "could not encode its answer" in outcome[0].message


def _catch(into: list[BaseException], endpoint: str) -> None:
    try:
        call(endpoint, "status", timeout=10)
    except ControlError as exc:
        into.append(exc)


# --------------------------------------------------------------------- ls and resolve


def test_list_primaries_and_resolve(home: Path) -> None:
    with pytest.raises(NoPrimary, match=f"no primary running under FORKD_HOME {home}"):
        resolve(home, None)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(home / "zombie.sock"))
    dead.close()
    with FakePrimary(endpoint_for(home, "api")), FakePrimary(endpoint_for(home, "web")):
        assert list_primaries(home) == [
            ("api", endpoint_for(home, "api")), ("web", endpoint_for(home, "web")),
        ]
        with pytest.raises(NoPrimary, match="several primaries run: api, web; name one"):
            resolve(home, None)
        assert resolve(home, "web") == endpoint_for(home, "web")
        with pytest.raises(NoPrimary, match="no primary named 'zombie'"):
            resolve(home, "zombie")
    assert list_primaries(home) == []


def test_resolve_picks_the_only_primary(primary: FakePrimary, home: Path) -> None:
    assert resolve(home, None) == primary.endpoint


# ------------------------------------------------------------------------- ZAP, pure


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("localhost:1000:1000:42", True),  # the owner
        ("localhost:0:0:42", True),  # root, by rule
        ("localhost:65534:65534:42", False),
        ("localhost:1001:1000:42", False),  # same group is not enough
        ("localhost", False),  # no credentials: refused, not guessed
        ("", False),
    ],
)
def test_zap_verdict_on_ipc(address: str, allowed: bool) -> None:
    verdict = zap_verdict(b"NULL", address, [], ipc=True, euid=1000, curve_clients=None)
    assert verdict.allowed is allowed
    if allowed:
        assert verdict.user == f"uid:{address.split(':')[1]}"
    else:
        assert verdict.reason


def test_zap_verdict_curve_and_mechanisms() -> None:
    public, _ = zmq.curve_keypair()
    raw = zmq.utils.z85.decode(public)
    clients = frozenset({public})
    ok = zap_verdict(b"CURVE", "127.0.0.1", [raw], ipc=False, euid=0, curve_clients=clients)
    assert ok.allowed and ok.user == "curve:" + public[:8].decode()
    other = zmq.utils.z85.decode(zmq.curve_keypair()[0])
    assert not zap_verdict(b"CURVE", "127.0.0.1", [other], ipc=False, euid=0,
                           curve_clients=clients).allowed
    assert not zap_verdict(b"NULL", "127.0.0.1", [], ipc=False, euid=0,
                           curve_clients=clients).allowed
    assert not zap_verdict(b"NULL", "127.0.0.1", [], ipc=False, euid=0,
                           curve_clients=None).allowed
    assert not zap_verdict(b"PLAIN", "localhost:0:0:1", [b"u", b"p"], ipc=True, euid=0,
                           curve_clients=None).allowed


# ------------------------------------------------------- other users, for real (nobody)

NOBODY = 65534
needs_root_and_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or not any(p.pw_uid == NOBODY for p in pwd.getpwall()),
    reason="needs root and the user nobody",
)

# Run as root only long enough to load Python and zmq (nobody cannot read this
# interpreter's files), then become `uid` for good and ask.
CLIENT_AS = r"""
import json, os, sys
from forkd.control import call
from forkd.errors import ControlError
uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
assert os.getuid() == os.geteuid() == uid
try:
    outcome = {"result": call(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), timeout=5)}
except ControlError as exc:
    outcome = {"type": type(exc).__name__, "code": exc.code, "message": exc.message}
print(json.dumps(outcome), flush=True)
"""


def run_client_as(
    uid: int, endpoint: str, command: str, args: dict[str, Any], log: Path
) -> dict[str, Any]:
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-c", CLIENT_AS, str(uid), endpoint, command, json.dumps(args)],
            stdout=out, stderr=subprocess.STDOUT, timeout=60, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/",
        )
    text = log.read_text()
    assert proc.returncode == 0, text
    outcome: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return outcome


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others can traverse (tmp_path's parents are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="forkd-ctl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.integration
@pytest.mark.timeout(90)
@needs_root_and_nobody
def test_nobody_cannot_even_reach_a_socket_in_the_private_home(
    open_dir: Path, tmp_path: Path
) -> None:
    home = ensure_home(open_dir / "home")
    with FakePrimary(endpoint_for(home, "web")) as fake:
        outcome = run_client_as(NOBODY, fake.endpoint, "scale", {"count": "+3"},
                                tmp_path / "nobody.log")
        assert outcome["code"] == "unauthorized", outcome
        assert "permission denied" in outcome["message"]
        assert fake.received == [] and fake.workers == 4
        assert call(fake.endpoint, "status", timeout=5)["pid"] == os.getpid()


@pytest.mark.integration
@pytest.mark.timeout(90)
@needs_root_and_nobody
def test_zap_refuses_nobody_even_when_the_file_modes_let_it_connect(
    open_dir: Path, tmp_path: Path
) -> None:
    endpoint = f"ipc://{open_dir}/open.sock"
    with FakePrimary(endpoint) as fake:
        (open_dir / "open.sock").chmod(0o666)  # an operator's mistake: now anyone connects
        for command, args in (("stop", {}), ("scale", {"count": "-3"}), ("status", {})):
            outcome = run_client_as(NOBODY, endpoint, command, args, tmp_path / "nobody.log")
            assert outcome["code"] == "unauthorized", outcome
            assert "refused this user (uid 65534)" in outcome["message"]
        assert fake.received == [] and fake.workers == 4 and fake.alive
        assert fake.server is not None and fake.server.refused >= 3
        assert call(endpoint, "status", timeout=5)["pid"] == os.getpid()


# The primary as nobody: root passes by rule, a third uid does not.
SERVER_AS = r"""
import json, os, sys, zmq
from forkd.control import ControlServer
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
endpoint, log_path = sys.argv[1], sys.argv[2]
with ControlServer(endpoint) as server:
    os.chmod(endpoint[len("ipc://"):], 0o666)
    print("ready", flush=True)
    poller = zmq.Poller()
    for s in server.sockets():
        poller.register(s, zmq.POLLIN)
    while True:
        poller.poll(100)
        for peer, request in server.handle_ready():
            with open(log_path, "a") as log:
                log.write(json.dumps([peer.user, request.command]) + "\n")
            server.reply_ok(peer, request.id, {"ran": request.command})
            if request.command == "stop":
                sys.exit(0)
"""


@pytest.mark.integration
@pytest.mark.timeout(90)
@needs_root_and_nobody
def test_a_primary_run_by_nobody_answers_root_but_not_another_user(
    open_dir: Path, tmp_path: Path
) -> None:
    os.chown(open_dir, NOBODY, NOBODY)
    endpoint = f"ipc://{open_dir}/web.sock"
    requests_log = open_dir / "requests.log"
    out_path = tmp_path / "server.log"
    with out_path.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER_AS, endpoint, str(requests_log)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/",
        )
    try:
        wait_until(lambda: "ready" in out_path.read_text() or server.poll() is not None, 30)
        assert server.poll() is None, out_path.read_text()
        assert (open_dir / "web.sock").stat().st_uid == NOBODY
        refused = run_client_as(12345, endpoint, "status", {}, tmp_path / "other.log")
        assert refused["code"] == "unauthorized", refused
        assert not requests_log.exists()
        assert call(endpoint, "status", timeout=5) == {"ran": "status"}  # root, by rule
        assert call(endpoint, "stop", timeout=5) == {"ran": "stop"}
        assert server.wait(20) == 0
        assert requests_log.read_text().splitlines() == [
            '["uid:0", "status"]', '["uid:0", "stop"]',
        ]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 9)
            server.wait(10)
