"""`forkd reload|stop|status|scale|ls` as a user sees them: output and exit codes."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from forkd import ctl
from forkd.control import (
    ControlServer,
    create_curve_keys,
    endpoint_for,
    ensure_home,
    load_curve_keys,
)
from forkd.errors import ProtocolError
from forkd.protocol import COMMANDS, parse_scale

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/app/web.py", line 3, in <module>\n'
    "    import missing_module\n"
    "ModuleNotFoundError: No module named 'missing_module'\n"
)


class Primary:
    """A ControlServer in a thread answering like a primary would (in miniature)."""

    def __init__(self, home: Path, name: str, workers: int = 2, endpoint: str | None = None,
                 keys: Any = None) -> None:
        self.name = name
        self.endpoint = endpoint or endpoint_for(home, name)
        self.keys = keys  # CurveKeys for a tcp:// endpoint
        self.workers = workers
        self.received: list[str] = []
        self.reload_fails = False
        self.busy: str | None = None  # when set, mutating commands answer "busy" with it
        self.exit_without_answer = False
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Primary:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        keys = self.keys
        with ControlServer(self.endpoint, curve_secret_key=keys and keys.secret,
                           curve_public_key=keys and keys.public) as server:
            poller = zmq.Poller()
            for sock in server.sockets():
                poller.register(sock, zmq.POLLIN)
            self._ready.set()
            while not self._stop.is_set():
                poller.poll(10)
                for peer, request in server.handle_ready():
                    self.received.append(request.command)
                    result = self._answer(request.command, request.args, COMMANDS[request.command],
                                          lambda m, p=peer, r=request.id: server.progress(p, r, m))
                    if self._stop.is_set() and self.exit_without_answer:
                        return
                    if isinstance(result, tuple):
                        server.reply_error(peer, request.id, *result)
                    else:
                        server.reply_ok(peer, request.id, result)

    def _answer(
        self, command: str, args: dict[str, Any], mutates: bool, progress: Any
    ) -> dict[str, Any] | tuple[str, str]:
        if mutates and self.busy:
            return ("busy", self.busy)
        if command == "status":
            return status_doc(self.name, self.workers)
        if command == "reload":
            for slot in range(self.workers):
                progress(f"slot {slot + 1}/{self.workers}: pid {slot + 10} → {slot + 20}, "
                         "ready in 180 ms")
                if self.reload_fails:
                    return ("failed", TRACEBACK)
            return {"message": f"reloaded {self.workers} workers"}
        if command == "scale":
            try:
                self.workers = parse_scale(args["count"], self.workers)
            except ProtocolError as exc:
                return (exc.code, exc.message)
            return {"message": f"scaled to {self.workers} workers"}
        if command == "stop":
            self._stop.set()
            return {"message": "stopped" + ("" if args["graceful"] else " (immediately)")}
        raise AssertionError(command)


def status_doc(name: str, workers: int) -> dict[str, Any]:
    return {
        "name": name, "pid": os.getpid(), "app": f"{name}.asgi:app",
        "bind": ["127.0.0.1:8000"], "started_at": 1700000000.0,
        "workers": [
            {"id": i, "pid": 4250 + i, "state": "ready", "started_at": 1700000001.2,
             "restarts": i, "last_exit": "crashed: exit 1" if i else None,
             "rss": 41234432, "cpu_percent": 3.5, "requests": 1234}
            for i in range(workers)
        ],
    }


class Streams:
    def __init__(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return ensure_home(tmp_path / "home")


@pytest.fixture
def web(home: Path) -> Iterator[Primary]:
    with Primary(home, "web") as primary:
        yield primary


@pytest.fixture
def io_() -> Streams:
    return Streams()


# ------------------------------------------------------------------------------ status


def test_status_prints_one_row_per_worker(web: Primary, home: Path, io_: Streams) -> None:
    assert ctl.status(None, home, out=io_.out, err=io_.err) == 0
    lines = io_.out.getvalue().splitlines()
    assert lines[0].startswith(f"web  pid {os.getpid()}  app web.asgi:app  up ")
    assert lines[0].endswith("bind 127.0.0.1:8000")
    assert lines[1].split() == ["slot", "pid", "state", "uptime", "restarts", "last",
                                "exit", "cpu%", "mem", "requests", "dir"]
    assert lines[2].split()[:3] == ["0", "4250", "ready"]
    assert lines[2].split()[-6:] == ["0", "-", "3.5", "39.3M", "1234", "-"]
    assert "crashed: exit 1" in lines[3]
    assert len(lines) == 4 and io_.err.getvalue() == ""


def test_status_json_is_the_document(web: Primary, home: Path, io_: Streams) -> None:
    assert ctl.status("web", home, True, out=io_.out, err=io_.err) == 0
    assert json.loads(io_.out.getvalue()) == status_doc("web", 2)


def test_status_with_no_primary_exits_2(home: Path, io_: Streams) -> None:
    assert ctl.status(None, home, out=io_.out, err=io_.err) == 2
    assert io_.out.getvalue() == ""
    assert f"no primary running under FORKD_HOME {home}" in io_.err.getvalue()


def test_status_of_a_missing_home_or_unknown_name_exits_2(
    web: Primary, home: Path, tmp_path: Path, io_: Streams
) -> None:
    assert ctl.status(None, tmp_path / "nowhere", out=io_.out, err=io_.err) == 2
    assert ctl.status("api", home, out=io_.out, err=io_.err) == 2
    assert "no primary named 'api'" in io_.err.getvalue()
    assert ctl.status("../x", home, out=io_.out, err=io_.err) == 2


def test_several_primaries_need_a_name(home: Path, io_: Streams) -> None:
    with Primary(home, "api"), Primary(home, "web"):
        assert ctl.status(None, home, out=io_.out, err=io_.err) == 2
        assert "several primaries run: api, web; name one" in io_.err.getvalue()
        assert ctl.status("api", home, True, out=io_.out, err=io_.err) == 0
        assert json.loads(io_.out.getvalue())["name"] == "api"


def test_format_status_tolerates_missing_and_extra_fields() -> None:
    doc = {"name": "x", "workers": [
        {"id": 1, "state": "starting", "future_field": [1, 2]},
        {"id": 0, "pid": 7, "state": "draining", "started_at": 100.0, "rss": 3 * 1024 ** 3,
         "cpu_percent": None, "last_exit": "memory: 612M > 512M",
         "cwd": "/srv/app/releases/7"},
    ]}
    lines = ctl.format_status(doc, now=100.0 + 2 * 86400 + 3 * 3600).splitlines()
    assert lines[0] == "x  pid -  app -  up -"
    assert lines[2].split() == ["0", "7", "draining", "2d", "3h", "-", "memory:", "612M", ">",
                                "512M", "-", "3.0G", "-", "/srv/app/releases/7"]
    assert lines[3].split() == ["1", "-", "starting", "-", "-", "-", "-", "-", "-", "-"]


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0B"), (1023, "1023B"), (1536, "1.5K"), (41234432, "39.3M"),
                       (5 * 1024 ** 4, "5120.0G")],
)
def test_format_size(size: int, text: str) -> None:
    assert ctl.format_size(size) == text


# -------------------------------------------------------------------------------- ls


def test_ls_lists_every_primary(home: Path, io_: Streams) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(home / "old.sock"))  # a stale socket: not listed
    dead.close()
    with Primary(home, "api", workers=3), Primary(home, "web", workers=2):
        assert ctl.ls(home, out=io_.out, err=io_.err) == 0
    rows = [line.split() for line in io_.out.getvalue().splitlines()]
    pid = str(os.getpid())
    assert rows == [
        ["name", "pid", "workers", "app", "endpoint"],
        ["api", pid, "3", "api.asgi:app", endpoint_for(home, "api")],
        ["web", pid, "2", "web.asgi:app", endpoint_for(home, "web")],
    ]


def test_ls_with_none_prints_only_the_header(home: Path, io_: Streams) -> None:
    assert ctl.ls(home, out=io_.out, err=io_.err) == 0
    assert io_.out.getvalue().split() == ["name", "pid", "workers", "app", "endpoint"]


# ---------------------------------------------------------------------------- reload


def test_reload_prints_each_step_then_exits_0(web: Primary, home: Path, io_: Streams) -> None:
    assert ctl.reload(None, home, io_.out, err=io_.err) == 0
    assert io_.out.getvalue().splitlines() == [
        "slot 1/2: pid 10 → 20, ready in 180 ms",
        "slot 2/2: pid 11 → 21, ready in 180 ms",
        "reloaded 2 workers",
    ]


def test_failed_reload_prints_the_traceback_and_exits_1(
    web: Primary, home: Path, io_: Streams
) -> None:
    web.reload_fails = True
    assert ctl.reload("web", home, io_.out, err=io_.err) == 1
    assert io_.out.getvalue() == "slot 1/2: pid 10 → 20, ready in 180 ms\n"
    assert io_.err.getvalue() == "forkd reload: failed:\n" + TRACEBACK


def test_busy_is_reported_and_exits_1(web: Primary, home: Path, io_: Streams) -> None:
    web.busy = "reload in progress (3/8)"
    assert ctl.scale("web", home, "+1", out=io_.out, err=io_.err) == 1
    assert io_.err.getvalue() == "forkd scale: busy: reload in progress (3/8)\n"
    assert web.workers == 2


# ----------------------------------------------------------------------------- scale


@pytest.mark.parametrize(("text", "workers"), [("+2", 4), ("-1", 1), ("5", 5)])
def test_scale(web: Primary, home: Path, io_: Streams, text: str, workers: int) -> None:
    assert ctl.scale(None, home, text, out=io_.out, err=io_.err) == 0
    assert web.workers == workers
    assert io_.out.getvalue() == f"scaled to {workers} workers\n"


def test_scale_with_a_bad_count_exits_2_without_asking(
    web: Primary, home: Path, io_: Streams
) -> None:
    assert ctl.scale("web", home, "lots", out=io_.out, err=io_.err) == 2
    assert "count must be N, +N or -N" in io_.err.getvalue()
    assert web.received == []


def test_scale_below_one_worker_is_refused_by_the_primary_with_2(
    web: Primary, home: Path, io_: Streams
) -> None:
    assert ctl.scale("web", home, "-2", out=io_.out, err=io_.err) == 2
    assert "cannot scale to 0 workers (now 2)" in io_.err.getvalue()
    assert web.workers == 2


# ------------------------------------------------------------------------------ stop


def test_stop(web: Primary, home: Path, io_: Streams) -> None:
    assert ctl.stop(None, home, out=io_.out, err=io_.err) == 0
    assert io_.out.getvalue() == "stopped\n" and web.stopped


def test_stop_not_graceful(web: Primary, home: Path, io_: Streams) -> None:
    assert ctl.stop("web", home, graceful=False, out=io_.out, err=io_.err) == 0
    assert io_.out.getvalue() == "stopped (immediately)\n"


def test_stop_of_a_primary_that_exits_before_answering_is_done(
    web: Primary, home: Path, io_: Streams
) -> None:
    web.exit_without_answer = True
    assert ctl.stop("web", home, out=io_.out, err=io_.err) == 0
    assert io_.out.getvalue() == "stopped (the primary exited)\n"


def test_stop_with_no_primary_exits_2(home: Path, io_: Streams) -> None:
    assert ctl.stop("web", home, out=io_.out, err=io_.err) == 2
    assert "no primary named 'web'" in io_.err.getvalue()


# ---------------------------------------------------------------------- fleet reload


@pytest.fixture
def fleet(home: Path) -> Iterator[list[Primary]]:
    with Primary(home, "web1") as a, Primary(home, "web2") as b, Primary(home, "web3") as c:
        yield [a, b, c]


def test_fleet_reload_goes_host_by_host_in_order(
    fleet: list[Primary], io_: Streams
) -> None:
    endpoints = [p.endpoint for p in fleet]
    assert ctl.reload_fleet(endpoints, io_.out, err=io_.err) == 0
    lines = io_.out.getvalue().splitlines()
    assert lines[0] == f"[1/3] {endpoints[0]}: reloading"
    assert lines[1] == f"[1/3] {endpoints[0]}: slot 1/2: pid 10 → 20, ready in 180 ms"
    assert lines[3] == f"[1/3] {endpoints[0]}: reloaded 2 workers"
    assert lines[4] == f"[2/3] {endpoints[1]}: reloading"
    assert lines[-1] == "fleet reload complete: 3 hosts"
    assert [p.received for p in fleet] == [["reload"]] * 3
    assert io_.err.getvalue() == ""


def test_fleet_reload_stops_at_the_first_failure_and_names_it(
    fleet: list[Primary], io_: Streams
) -> None:
    fleet[1].reload_fails = True
    endpoints = [p.endpoint for p in fleet]
    assert ctl.reload_fleet(endpoints, io_.out, err=io_.err) == 1
    assert fleet[2].received == []  # only pinged (the control server answers that itself)
    assert io_.err.getvalue() == (
        f"forkd reload: {endpoints[1]}: failed:\n{TRACEBACK}"
        f"forkd reload: stopped at {endpoints[1]} (host 2 of 3); reloaded: {endpoints[0]}; "
        f"not reloaded: {endpoints[2]}\n"
    )
    assert "fleet reload complete" not in io_.out.getvalue()


def test_fleet_reload_touches_nothing_when_a_host_does_not_answer(
    fleet: list[Primary], home: Path, io_: Streams
) -> None:
    missing = endpoint_for(home, "web9")
    endpoints = [fleet[0].endpoint, missing, fleet[2].endpoint]
    assert ctl.reload_fleet(endpoints, io_.out, err=io_.err) == 1
    assert [p.received for p in fleet] == [[], [], []]
    assert io_.err.getvalue() == (
        f"forkd reload: {missing} does not answer: no primary at {missing}\n"
        "forkd reload: nothing was reloaded (3 hosts)\n"
    )


def test_fleet_reload_of_an_unreachable_tcp_host_fails_within_the_ping_timeout(
    fleet: list[Primary], io_: Streams
) -> None:
    with socket.socket() as silent:  # accepts TCP, never speaks ZMTP
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        code = ctl.reload_fleet([fleet[0].endpoint, endpoint], io_.out, err=io_.err,
                                ping_timeout=0.3)
    assert code == 1
    assert fleet[0].received == []
    assert io_.err.getvalue().startswith(f"forkd reload: {endpoint} does not answer: ")


def test_fleet_reload_refuses_an_endpoint_given_twice(fleet: list[Primary], io_: Streams) -> None:
    endpoints = [fleet[0].endpoint, fleet[1].endpoint, fleet[0].endpoint]
    assert ctl.reload_fleet(endpoints, io_.out, err=io_.err) == 2
    assert io_.err.getvalue() == (
        f"forkd reload: --control {fleet[0].endpoint} is given more than once\n"
    )
    assert [p.received for p in fleet] == [[], [], []]



def test_fleet_reload_asks_each_tcp_host_again_right_before_its_turn(
    home: Path, tmp_path: Path, io_: Streams, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over tcp nothing says that a host went away: without a fresh ping the reload of
    # web2 would wait, silent, for the whole deadline.
    secret = create_curve_keys(tmp_path / "keys")
    monkeypatch.setenv("FORKD_CONTROL_KEYS", str(secret))
    keys = load_curve_keys(str(secret))
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    endpoints = [f"tcp://127.0.0.1:{port}" for port in ports]
    with Primary(home, "web1", endpoint=endpoints[0], keys=keys) as web1:
        web2 = Primary(home, "web2", endpoint=endpoints[1], keys=keys).__enter__()

        class Out(io.StringIO):
            def write(self, text: str) -> int:  # web2 goes away while web1 reloads
                if text.startswith(f"[1/2] {endpoints[0]}: reloaded"):
                    web2.__exit__()
                return super().write(text)

        code = ctl.reload_fleet(endpoints, Out(), err=io_.err, timeout=30, ping_timeout=0.5)
    assert code == 1
    assert web1.received == ["reload"] and web2.received == []
    assert io_.err.getvalue().startswith(
        f"forkd reload: {endpoints[1]}: no answer from the primary at {endpoints[1]} "
        "within 0.5s")
