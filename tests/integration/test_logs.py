"""Logs of a real pool: every worker's output through the primary, whole lines, JSON,
rotation, SIGUSR1 reopen, `forkd logs -f`, the access line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import APPS, REPO, raw_exchange, request, wait_until

pytestmark = pytest.mark.integration

SPAM = re.compile(r"^\S+Z logapp\.(\d+)\[(\d+)\] stdout: SPAM (\d+) (\d+) (\d+) ([a-z]+)$")
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def text_of(*paths: Path) -> str:
    """The files' text; one renamed away by a rotation while this reads counts as empty."""
    parts = []
    for path in paths:
        try:
            parts.append(path.read_text(errors="replace"))
        except FileNotFoundError:
            pass
    return "".join(parts)


def port_in(text: str) -> int | None:
    match = re.search(r'listen=\"?[^ ",]*:(\d+)|"listen":"[^"]*:(\d+)', text)
    return int(match.group(1) or match.group(2)) if match else None


def access_lines(log_file: Path) -> list[dict]:
    """The access lines written so far, in order (a last line still being written is
    left for the next look)."""
    text = text_of(log_file)
    text = text[:text.rfind("\n") + 1]
    return [obj for obj in map(json.loads, text.splitlines()) if obj.get("event") == "access"]


def once_each(log_file: Path, port: int, ids: set[str], describe) -> dict[str, dict]:
    """Each of `ids`' access line, after checking no request got two: one more request
    (one worker writes its lines in order) shows every line before it is in."""
    status, headers, _ = request(port, path="/")
    assert status == 200
    barrier = headers["x-request-id"]
    wait_until(lambda: barrier in {obj["request_id"] for obj in access_lines(log_file)}, 10,
               message=describe)
    seen = [obj["request_id"] for obj in access_lines(log_file)]
    assert {rid: seen.count(rid) for rid in ids} == dict.fromkeys(ids, 1), seen
    return {obj["request_id"]: obj for obj in access_lines(log_file)}


def start_logged(run_forkd, log_file: Path, *args: str, workers: int = 2, env=None):
    proc = run_forkd(*args, "-b", "127.0.0.1:0", "-w", str(workers), "--log-file",
                     str(log_file), cwd=APPS, env=env)

    def every_file() -> str:  # rotated ones included
        return text_of(*sorted(log_file.parent.glob(log_file.name + ".*")), log_file)

    def describe() -> str:
        return f"{proc.describe()}\nlog file:\n{text_of(log_file)[-6000:]}"

    wait_until(lambda: every_file().count("worker-ready") >= workers
               or proc.proc.poll() is not None, 30, message=describe)
    assert proc.proc.poll() is None, describe()
    # (read again until found: a rotation renaming the files between the listing and
    # the reading can hide the oldest one, which holds the listen line, from one read)
    port = wait_until(lambda: port_in(every_file()), 10, message=describe)
    return proc, port, describe


def check_spam(text: str, workers: int, lines: int, size: int, threads: int) -> None:
    """Every SPAM line whole, tagged with the pid that printed it, each exactly once."""
    seen: set[tuple[int, int, int]] = set()
    bad = []
    for line in text.splitlines():
        if "SPAM" not in line:
            continue
        match = SPAM.match(line)
        if not match:
            bad.append(line[:200])
            continue
        _slot, tag_pid, pid, thread, index, fill = match.groups()
        key = (int(pid), int(thread), int(index))
        if tag_pid != pid or fill != chr(ord("a") + key[2] % 26) * size or key in seen:
            bad.append(line[:200])
        seen.add(key)
    assert not bad, f"{len(bad)} split, interleaved or repeated line(s), first: {bad[:3]}"
    assert len(seen) == workers * lines * threads
    assert len({pid for pid, _, _ in seen}) == workers


@pytest.mark.timeout(90)
def test_concurrent_long_lines_from_every_worker_are_never_split(run_forkd, tmp_path) -> None:
    workers, lines, size, threads = 2, 300, 3000, 4
    log_file = tmp_path / "forkd.log"
    proc, _port, describe = start_logged(
        run_forkd, log_file, "logapp:app", workers=workers,
        env={"LOGAPP_SPAM": f"{lines},{size},{threads}"})
    total = workers * lines * threads
    wait_until(lambda: text_of(log_file).count(" SPAM ") >= total, 60, message=describe)
    check_spam(text_of(log_file), workers, lines, size, threads)


@pytest.mark.timeout(90)
def test_rotation_under_load_loses_and_cuts_no_line(run_forkd, tmp_path) -> None:
    workers, lines, size, threads = 2, 1000, 300, 2
    log_file = tmp_path / "forkd.log"
    max_size = 100 * 1024
    proc, _port, describe = start_logged(
        run_forkd, log_file, "logapp:app", "--log-max-size", "100K", "--log-keep", "100",
        workers=workers, env={"LOGAPP_SPAM": f"{lines},{size},{threads}"})

    def files() -> list[Path]:  # oldest first
        rotated = sorted(tmp_path.glob("forkd.log.*"), key=lambda p: -int(p.suffix[1:]))
        return [*rotated, log_file]

    total = workers * lines * threads
    wait_until(lambda: text_of(*files()).count(" SPAM ") >= total, 60, message=describe)
    rotated = files()[:-1]
    assert len(rotated) >= 5, [p.name for p in rotated]
    for path in rotated:
        data = path.read_bytes()
        assert len(data) <= max_size and data.endswith(b"\n"), (path.name, len(data))
    check_spam(text_of(*files()), workers, lines, size, threads)


@pytest.mark.timeout(60)
def test_sigusr1_reopens_a_log_file_that_was_moved(run_forkd, tmp_path) -> None:
    log_file = tmp_path / "forkd.log"
    moved = tmp_path / "forkd.log.1"
    proc, port, describe = start_logged(run_forkd, log_file, "logapp:app")
    os.rename(log_file, moved)  # what logrotate does before its postrotate
    assert request(port, path="/print?text=before-reopen")[0] == 200
    wait_until(lambda: "before-reopen" in text_of(moved), 10, message=describe)
    proc.signal(signal.SIGUSR1)
    wait_until(lambda: "event=logs-reopen file=" in text_of(log_file), 10, message=describe)
    assert request(port, path="/print?text=after-reopen")[0] == 200
    wait_until(lambda: "after-reopen" in text_of(log_file), 10, message=describe)
    assert "after-reopen" not in text_of(moved)
    assert len(proc.worker_pids()) == 2  # the workers ignore a SIGUSR1 meant for the unit


@pytest.mark.timeout(60)
def test_forkd_logs_follow_sees_a_line_printed_after_it_started(run_forkd, tmp_path) -> None:
    proc = run_forkd("logapp:app", "-b", "127.0.0.1:0", "-w", "2", "--name", "followme",
                     cwd=APPS)
    port = proc.port()
    proc.wait_ready(2)
    assert request(port, path="/print?text=older-line")[0] == 200
    wait_until(lambda: "older-line" in proc.output(), 10, message=proc.describe)
    out_path = tmp_path / "follow.out"
    with open(out_path, "wb") as out:
        # (forkd's CLI as a terminal starts it: ^C raises KeyboardInterrupt. A process
        # started with SIGINT ignored (a background job of a shell without job control,
        # as a CI runner may start the suite) keeps it ignored, Python's rule and the
        # shells' own; with faulthandler on SIGUSR1: should ^C not end it, its stacks
        # say where it waits)
        follower = subprocess.Popen(
            [sys.executable, "-c", "import faulthandler, signal, sys; "
             "signal.signal(signal.SIGINT, signal.default_int_handler); "
             "faulthandler.register(signal.SIGUSR1, all_threads=True); "
             "from forkd.cli import main; sys.argv[0] = 'forkd'; main()",
             "logs", "followme", "-f", "-n", "5"],
            cwd=REPO, env=proc.env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_until(lambda: "older-line" in out_path.read_text(), 15,
                   message=lambda: out_path.read_text())
        assert request(port, path="/print?text=newer-line")[0] == 200
        wait_until(lambda: "newer-line" in out_path.read_text(), 15,
                   message=lambda: out_path.read_text())
        line = next(x for x in out_path.read_text().splitlines() if "newer-line" in x)
        assert re.match(r"^\S+Z followme\.[01]\[\d+\] stdout: newer-line$", line), line
        assert follower.poll() is None  # still following
        os.killpg(follower.pid, signal.SIGINT)
        try:
            code = follower.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(follower.pid, signal.SIGUSR1)
            wait_until(lambda: "most recent call first" in out_path.read_text(), 5,
                       message=lambda: out_path.read_text())
            raise AssertionError("forkd logs -f outlived ^C by 10 s; its stacks:\n"
                                 + out_path.read_text()[-6000:]) from None
        assert code == 0, out_path.read_text()
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait(5)
    # -n and --worker: the latest N lines of that slot only
    for index in range(8):
        assert request(port, path=f"/print?text=fill-{index}")[0] == 200
    wait_until(lambda: "fill-7" in proc.output(), 10, message=proc.describe)
    by_slot: dict[str, list[str]] = {"0": [], "1": []}
    for slot, text in re.findall(r"followme\.(\d)\[\d+\] stdout: (fill-\d)", proc.output()):
        by_slot[slot].append(text)
    slot = max(by_slot, key=lambda key: len(by_slot[key]))  # one has at least 4 of the 8
    result = subprocess.run(
        [sys.executable, "-m", "forkd", "logs", "followme", "-n", "3", "--worker", slot,
         "--json"], cwd=REPO, env=proc.env, capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [(obj["slot"], obj["message"]) for obj in objects] == [
        (int(slot), text) for text in by_slot[slot][-3:]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", ["logapp:app", "logapp:wsgi_app"])
def test_json_lines_and_the_access_line(run_forkd, tmp_path, app) -> None:
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, app, "--log-format", "json",
                                        "--access-log")
    status, headers, _ = request(port, path="/print?text=a%20%22quoted%22%20line&x=1",
                                 headers={"X-Request-ID": "req-from-lb-42"})
    assert status == 200 and headers["x-request-id"] == "req-from-lb-42"
    status, headers, _ = request(port, path="/")
    made = headers["x-request-id"]
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", made)
    # two workers batch their lines each on its own: wait for both requests' lines
    wait_until(lambda: made in (text := text_of(log_file)) and "req-from-lb-42" in text, 10,
               message=describe)
    objects = [json.loads(line) for line in text_of(log_file).splitlines()]  # each parses
    for obj in objects:
        assert RFC3339_MS.match(obj["ts"]) and obj["level"] in ("info", "warning", "error")
        assert isinstance(obj["pid"], int) and ("event" in obj) != ("stream" in obj), obj
    primary = [obj for obj in objects if obj.get("event") == "primary-started"]
    assert primary and primary[0]["slot"] is None and primary[0]["pid"] == proc.pid
    ready = [obj for obj in objects if obj.get("event") == "worker-ready"]
    assert {obj["worker_slot"] for obj in ready} == {0, 1}
    printed = [obj for obj in objects if obj.get("stream") == "stdout"]
    assert [obj["message"] for obj in printed] == ['a "quoted" line']
    assert printed[0]["slot"] in (0, 1) and printed[0]["pid"] in proc.worker_pids()
    access = {obj["request_id"]: obj for obj in objects if obj.get("event") == "access"}
    first = access["req-from-lb-42"]
    assert (first["method"], first["path"], first["query"], first["status"], first["bytes"],
            first["remote"]) == ("GET", "/print", "text=a%20%22quoted%22%20line&x=1", 200, 7,
                                 "127.0.0.1")
    assert first["slot"] in (0, 1) and first["pid"] in proc.worker_pids()
    assert isinstance(first["duration_ms"], float) and 0 <= first["duration_ms"] < 5000
    assert access[made]["path"] == "/" and access[made]["bytes"] == 13


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", ["logapp:app", "logapp:wsgi_app"])
def test_an_app_that_raises_has_its_access_line(run_forkd, tmp_path, app) -> None:
    """A 500 for an app's exception is logged as any answer (an operator counts 5xx in
    the access log), with the request's id sent back; an answer cut mid-way by the app
    is logged with the status it started and the body bytes that went out."""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, app, "--log-format", "json",
                                        "--access-log", workers=1)
    status, headers, body = request(port, path="/boom?x=1", headers={"X-Request-ID": "boom-1"})
    assert status == 500 and headers["x-request-id"] == "boom-1"
    status, headers, _ = request(port, path="/boom")
    made = headers.get("x-request-id", "")
    assert status == 500 and re.fullmatch(r"[0-9a-f]{32}", made), headers
    cut = raw_exchange(port, b"GET /cut HTTP/1.1\r\nHost: x\r\nX-Request-ID: cut-1\r\n\r\n")
    assert cut.startswith(b"HTTP/1.1 200 ") and b"partial" in cut and not cut.endswith(
        b"0\r\n\r\n"), cut

    lines = once_each(log_file, port, {"boom-1", made, "cut-1"}, describe)
    first = lines["boom-1"]
    assert (first["method"], first["path"], first["query"], first["status"], first["bytes"],
            first["remote"]) == ("GET", "/boom", "x=1", 500, len(body), "127.0.0.1")
    assert lines[made]["status"] == 500 and lines[made]["path"] == "/boom"
    assert (lines["cut-1"]["path"], lines["cut-1"]["status"], lines["cut-1"]["bytes"]) == (
        "/cut", 200, len(b"partial"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", ["logapp:app", "logapp:wsgi_app"])
def test_a_client_that_leaves_mid_answer_has_its_access_line(run_forkd, tmp_path, app) -> None:
    """As nginx logs it: the status the answer started with, the body bytes sent."""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, app, "--log-format", "json",
                                        "--access-log", workers=1)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\nX-Request-ID: left-1\r\n\r\n")
        got = b""
        while got.count(b"s") < 3000:  # (three blocks)
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk
    assert got.startswith(b"HTTP/1.1 200 ")

    wait_until(lambda: "left-1" in {obj["request_id"] for obj in access_lines(log_file)}, 10,
               message=describe)  # (the worker notices the client left at its next write)
    line = once_each(log_file, port, {"left-1"}, describe)["left-1"]
    assert (line["path"], line["status"]) == ("/stream", 200)
    assert 3000 <= line["bytes"] < 3_000_000 and line["bytes"] % 1000 == 0, line
    # a client leaving is routine: its access line tells it, no line of its own
    assert "ended by" not in text_of(log_file)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("app", "ended"), [
    ("logapp:app", "late boom raising"),
    ("logapp:wsgi_app", "RuntimeError: late boom on purpose")])
def test_an_app_raising_after_its_client_left_logs_no_answer(run_forkd, tmp_path, app,
                                                              ended) -> None:
    """Nothing was sent: no access line claims a 500 went out. (An ASGI app's error
    after its client left is that leaving, routine: no line; a WSGI app's is logged as
    its error.)"""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, app, "--log-format", "json",
                                        "--access-log", workers=1)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /late-boom?ms=300 HTTP/1.1\r\nHost: x\r\nX-Request-ID: gone-1\r\n\r\n")
    wait_until(lambda: ended in text_of(log_file), 10, message=describe)
    once_each(log_file, port, set(), describe)  # (every line before the next one is in)
    assert "gone-1" not in {obj["request_id"] for obj in access_lines(log_file)}
    assert "ended by" not in text_of(log_file)


@pytest.mark.timeout(60)
def test_an_asgi_app_rewriting_its_scope_changes_no_access_line_and_loses_no_other(
        run_forkd, tmp_path) -> None:
    """The access line holds the request as it came, whatever the app then wrote into its
    scope (logapp's /rewrite puts a str in raw_path, as a careless middleware might),
    and the request answered with it in the same batch keeps its line too."""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, "logapp:app", "--log-format",
                                        "json", "--access-log", workers=1)
    answers = raw_exchange(port, b"GET /rewrite?q=1 HTTP/1.1\r\nHost: x\r\n"
                           b"X-Request-ID: rw-1\r\n\r\n"
                           b"GET /?n=2 HTTP/1.1\r\nHost: x\r\nX-Request-ID: rw-2\r\n"
                           b"Connection: close\r\n\r\n")
    assert answers.count(b"HTTP/1.1 200 ") == 2, answers
    lines = once_each(log_file, port, {"rw-1", "rw-2"}, describe)
    assert [(lines[rid]["remote"], lines[rid]["method"], lines[rid]["path"],
             lines[rid]["query"], lines[rid]["http_version"], lines[rid]["status"],
             lines[rid]["bytes"]) for rid in ("rw-1", "rw-2")] == [
        ("127.0.0.1", "GET", "/rewrite", "q=1", "1.1", 200, len(b"rewritten")),
        ("127.0.0.1", "GET", "/", "n=2", "1.1", 200, len(b"Hello, world!"))]
    assert "log-dropped" not in text_of(log_file)


def ws_handshake(target: str, request_id: str, fields: bytes = b"", body: bytes = b"") -> bytes:
    """A WebSocket handshake for `target` sent with X-Request-ID `request_id`, then
    `fields` (whole header lines) and `body`."""
    return (b"GET %b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"X-Request-ID: %b\r\n%b\r\n%b" % (target.encode(), request_id.encode(), fields, body))


@pytest.mark.timeout(60)
def test_a_websocket_access_line_holds_what_its_handshake_came_with(run_forkd,
                                                                   tmp_path) -> None:
    """The request id and path of the handshake, as the HTTP lines, whatever the app
    then did to its scope (logapp's /ws empties the headers and changes raw_path)."""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, "logapp:app", "--log-format",
                                        "json", "--access-log", workers=1)
    answer = raw_exchange(port, ws_handshake("/ws?q=1", "ws-1"))
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    assert b"\r\nx-request-id: ws-1\r\n" in answer.lower(), answer  # (sent back)

    wait_until(lambda: access_lines(log_file), 10, message=describe)
    assert [(obj["request_id"], obj["path"], obj["query"], obj["status"])
            for obj in access_lines(log_file)] == [("ws-1", "/ws", "q=1", 101)]


@pytest.mark.timeout(60)
def test_a_websocket_handshake_without_an_id_gets_one_made_and_sent_back(run_forkd,
                                                                         tmp_path) -> None:
    """A handshake that names no X-Request-ID (a browser's never does): forkd makes one,
    as for any request; the 101 carries it back and the access line has the same. So
    does a handshake the library refuses (a version it does not speak: 426)."""
    from websockets.sync.client import connect

    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, "logapp:app", "--log-format",
                                        "json", "--access-log", workers=1)
    with connect(f"ws://127.0.0.1:{port}/ws?q=2", open_timeout=10) as ws:
        made = ws.response.headers.get("X-Request-ID", "")
    assert re.fullmatch(r"[0-9a-f]{32}", made), ws.response.headers
    answer = raw_exchange(port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 426 "), answer
    refused = re.search(rb"\r\nx-request-id: ([0-9a-f]{32})\r\n", answer, re.IGNORECASE)
    assert refused, answer
    lines = once_each(log_file, port, {made, refused.group(1).decode()}, describe)
    assert (lines[made]["path"], lines[made]["query"], lines[made]["status"]) == (
        "/ws", "q=2", 101)
    assert lines[refused.group(1).decode()]["status"] == 426


@pytest.mark.timeout(60)
def test_a_websocket_app_s_own_request_id_is_the_only_one_sent_back(run_forkd,
                                                                   tmp_path) -> None:
    """An app that accepts with an X-Request-ID of its own: its 101 carries that one
    alone (forkd adds none beside it). Without --access-log no id is made or sent."""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, "logapp:app", "--log-format",
                                        "json", "--access-log", workers=1)
    answer = raw_exchange(port, ws_handshake("/ws-own-id", "client-id"))
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert re.findall(rb"\r\nx-request-id: ([^\r]*)", head) == [b"app-given"], answer
    proc.stop()

    quiet = tmp_path / "quiet.log"
    proc, port, describe = start_logged(run_forkd, quiet, "logapp:app", workers=1)
    answer = raw_exchange(port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    assert b"x-request-id" not in answer.split(b"\r\n\r\n", 1)[0].lower(), answer


@pytest.mark.timeout(60)
def test_a_refused_websocket_handshake_logs_the_bytes_it_was_sent(run_forkd,
                                                                   tmp_path) -> None:
    """A handshake the WebSocket library cannot take (a body: chunked) is refused 400;
    its line counts the refusal's body, as any answer's."""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, "logapp:app", "--log-format",
                                        "json", "--access-log", workers=1)
    answer = raw_exchange(port, ws_handshake("/ws", "ws-400", b"Transfer-Encoding: chunked\r\n",
                                             b"0\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 400 ") and b"\r\nx-request-id: ws-400\r\n" in answer, (
        answer)
    line = once_each(log_file, port, {"ws-400"}, describe)["ws-400"]
    assert (line["path"], line["status"], line["bytes"]) == (
        "/ws", 400, len(answer.split(b"\r\n\r\n", 1)[1]))


@pytest.mark.timeout(60)
def test_app_reconfiguring_logging_leaves_forkd_lines_alone(run_forkd, tmp_path) -> None:
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, "logapp:app",
                                        env={"LOGAPP_DJANGO": "1"})
    assert request(port, path="/boom")[0] == 500
    wait_until(lambda: "RuntimeError: boom on purpose" in text_of(log_file), 10,
               message=describe)
    text = text_of(log_file)
    lines = text.splitlines()
    error = [line for line in lines if "exception in ASGI app" in line]
    assert len(error) == 1, describe()
    assert re.match(r"^\S+Z forkd\.worker\.[01]\[\d+\] error: exception in ASGI app for GET "
                    r"/boom$", error[0]), error
    assert "APPFMT ERROR forkd" not in text  # not through the app's root handler as well
    # the app's own logging keeps its own format, tagged as that worker's stderr
    assert re.search(r"Z logapp\.[01]\[\d+\] stderr: APPFMT INFO myapp configured like django",
                     text), describe()


@pytest.mark.timeout(30)
def test_a_log_file_that_cannot_be_opened_fails_the_start(tmp_path, forkd_home) -> None:
    env = {**os.environ, "FORKD_HOME": str(forkd_home), "PYTHONPATH": f"{REPO}:{APPS}"}
    result = subprocess.run(
        [sys.executable, "-m", "forkd", "start", "logapp:app", "-b", "127.0.0.1:0",
         "--log-file", str(tmp_path / "missing-dir" / "forkd.log")],
        cwd=APPS, env=env, capture_output=True, timeout=20, start_new_session=True)
    assert result.returncode == 1
    assert b"--log-file " in result.stderr and b"No such file or directory" in result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app", ["logapp:app", "logapp:wsgi_app"])
def test_the_text_access_line_is_the_combined_format_and_logs_json_has_its_fields(
        run_forkd, tmp_path, app) -> None:
    """With --log-format text the worker renders the access line itself: the file gets
    the combined log format, and `forkd logs --json` still gives every field."""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, app, "--access-log",
                                        "--name", "textlog", workers=1)
    sent = {"X-Request-ID": "lb=7", "User-Agent": "probe/1.0", "Referer": "http://r/x"}
    assert request(port, path="/print?text=hi&x=1", headers=sent)[0] == 200
    status, headers, _ = request(port, path="/", headers={"User-Agent": 'odd "agent"'})
    made = headers["x-request-id"]
    assert status == 200
    wait_until(lambda: made in text_of(log_file), 10, message=describe)
    [pid] = proc.worker_pids()
    access = [line for line in text_of(log_file).splitlines() if "request_id=" in line]
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    clf = r"\[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000\]"
    assert re.fullmatch(
        stamp + rf" forkd\.worker\.0\[{pid}\] 127\.0\.0\.1 - - {clf} "
        r'"GET /print\?text=hi&x=1 HTTP/1\.1" 200 7 "http://r/x" "probe/1\.0" '
        r'\d+\.?\d*ms request_id="lb=7"', access[0]), access
    # (a quote in the user agent: rendered by the primary, escaped as the format wants)
    assert re.fullmatch(
        stamp + rf' forkd\.worker\.0\[{pid}\] 127\.0\.0\.1 - - {clf} "GET / HTTP/1\.1" 200 13 '
        rf'"-" "odd \\"agent\\"" \d+\.?\d*ms request_id={made}', access[1]), access
    result = subprocess.run(
        [sys.executable, "-m", "forkd", "logs", "textlog", "-n", "50", "--json"],
        cwd=REPO, env=proc.env, capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.decode().splitlines()]
    fields = {obj["request_id"]: obj for obj in objects if obj.get("event") == "access"}
    assert (fields["lb=7"]["path"], fields["lb=7"]["query"], fields["lb=7"]["user_agent"],
            fields["lb=7"]["referer"], fields["lb=7"]["pid"]) == (
        "/print", "text=hi&x=1", "probe/1.0", "http://r/x", pid)
    assert fields[made]["user_agent"] == 'odd "agent"'


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["json", "text"])
def test_forkd_logs_reads_back_every_access_line_of_a_burst(run_forkd, tmp_path, fmt) -> None:
    """A burst of requests: the primary keeps a worker's access records as they came
    (blocks), and `forkd logs` still gives each line, in order, as JSON and as text."""
    import http.client

    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, "logapp:app", "--log-format",
                                        fmt, "--access-log", "--name", "burst", workers=1)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for index in range(300):
            conn.request("GET", f"/?n={index}")
            assert conn.getresponse().read() == b"Hello, world!"
    finally:
        conn.close()
    wait_until(lambda: text_of(log_file).count("n=299") == 1, 10, message=describe)
    written = [line for line in text_of(log_file).splitlines() if re.search(r'[?"]n=\d', line)]
    assert len(written) == 300  # each line once, whole, in the output's own format
    assert all(line.startswith("{") == (fmt == "json") for line in written), written[:3]

    def logs(*args: str) -> list[str]:
        result = subprocess.run([sys.executable, "-m", "forkd", "logs", "burst", *args],
                                cwd=REPO, env=proc.env, capture_output=True, timeout=20)
        assert result.returncode == 0, result.stderr
        return result.stdout.decode().splitlines()

    objects = [json.loads(line) for line in logs("-n", "1000", "--json", "--worker", "0")]
    queries = [obj["query"] for obj in objects if obj.get("event") == "access"]
    assert queries == [f"n={index}" for index in range(300)]
    assert len({obj["request_id"] for obj in objects if obj.get("event") == "access"}) == 300
    last = logs("-n", "2")
    assert [re.search(r'"GET /\?(n=\d+) HTTP/1\.1" 200 13 ', line).group(1)  # type: ignore[union-attr]
            for line in last] == ["n=298", "n=299"], last


# Forwarded `for` values whose IPv6 zone is no interface name: its quotes would end the
# JSON string of "remote" and claim another pid and slot; its tab would cut the record.
HOSTILE_FORWARDED = ('for="[fe80::1%a\\",\\"pid\\":999,\\"slot\\":7,\\"y\\":\\"]"',
                     'for="[fe80::1%a\tb]:80"')


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_forwarded_address_cannot_forge_or_cut_an_access_line(run_forkd, tmp_path,
                                                                 fmt) -> None:
    """Behind a trusted proxy (loopback is one by default) a client writes the Forwarded
    header's node itself: an address the log would have to escape is no address, the
    request is logged from its peer, once, whole, with the worker's own pid and slot."""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(run_forkd, log_file, "logapp:app", "--log-format",
                                        fmt, "--access-log", "--name", "zones", workers=1)
    ids = []
    for number, value in enumerate(HOSTILE_FORWARDED * 2):  # (twice: the template too)
        status, headers, _ = request(port, path=f"/?n={number}",
                                     headers={"Forwarded": value, "X-Request-ID": f"z{number}"})
        assert status == 200
        ids.append(f"z{number}")
    wait_until(lambda: "z3" in text_of(log_file), 10, message=describe)
    [pid] = proc.worker_pids()
    lines = text_of(log_file).splitlines()
    for number, rid in enumerate(ids):
        [line] = [line for line in lines if rid in line]  # one line, whole
        if fmt == "json":
            obj = json.loads(line)
            assert (obj["event"], obj["pid"], obj["slot"], obj["remote"], obj["method"],
                    obj["path"], obj["query"], obj["status"], obj["request_id"]) == (
                "access", pid, 0, "127.0.0.1", "GET", "/", f"n={number}", 200, rid), line
            assert "y" not in obj
        else:
            assert re.fullmatch(
                rf"\S+Z forkd\.worker\.0\[{pid}\] 127\.0\.0\.1 - - \[[^]]+\] "
                rf'"GET /\?n={number} HTTP/1\.1" 200 13 "-" "[^"]*" \S+ms request_id={rid}',
                line), line


def _header(answer: bytes, name: bytes) -> bytes | None:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key == name:
            return value.strip()
    return None


def _body_size(answer: bytes) -> int:
    return len(answer.split(b"\r\n\r\n", 1)[1])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("fmt", ["json", "text"])
def test_requests_forkd_refuses_or_sheds_have_their_access_lines(run_forkd, tmp_path,
                                                                 fmt) -> None:
    """As nginx logs its 400s: every request forkd answers itself (a refusal, the 503 of
    --limit-concurrency) has its line, with its status, the body bytes sent, its request
    line as far as it was parsed (`-` for what was not) and its request id (the one it
    sent, else one forkd made, sent back either way: every line has one). A client
    that sends nothing on an idle connection is no request: no line."""
    log_file = tmp_path / "forkd.log"
    proc, port, describe = start_logged(
        run_forkd, log_file, "logapp:app", "--log-format", fmt, "--access-log",
        "--header-timeout", "1", "--keepalive-timeout", "1", "--max-body-size", "1K",
        "--limit-concurrency", "1", "--name", f"refusals-{fmt}", workers=1)
    sent: dict[str, bytes] = {
        "400": b"GET /two-hosts?a=1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: r-400\r\n"
               b"Host: y\r\n\r\n",
        "garbage": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        "414": b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "431": b"GET /big-field HTTP/1.1\r\nHost: x\r\nX-Request-ID: r-431\r\nX-Big: "
               + b"b" * 9000 + b"\r\n\r\n",
        "505": b"GET /v2 HTTP/2.0\r\nHost: x\r\nX-Request-ID: r-505\r\n\r\n",
        "413": b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"800\r\n" + b"c" * 2048 + b"\r\n",
    }
    answers = {name: raw_exchange(port, data) for name, data in sent.items()}
    for name, status in (("400", 400), ("garbage", 400), ("414", 414), ("431", 431),
                         ("505", 505), ("413", 413)):
        assert answers[name].startswith(b"HTTP/1.1 %d " % status), (name, answers[name][:200])
    made = {name: (_header(answers[name], b"x-request-id") or b"").decode()
            for name in ("413", "garbage", "414")}
    for name, rid in made.items():
        assert re.fullmatch(r"[0-9a-f]{32}", rid), answers[name][:300]
    made_413 = made["413"]
    assert _header(answers["400"], b"x-request-id") == b"r-400"

    # a half-sent head: 408 after --header-timeout, logged; an idle connection that sent
    # nothing (after a request, or never) is closed with no answer and no line
    with socket.create_connection(("127.0.0.1", port), timeout=10) as half, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as idle, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        half.sendall(b"GET /half?h=1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: r-408\r\n"
                     b"User-Agent: half/1\r\nX-Pen")  # (the fields before the last one count)
        idle.sendall(b"GET /?idle=1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: r-idle\r\n\r\n")
        got = {"half": b"", "idle": b"", "silent": b""}
        for name, sock in (("half", half), ("idle", idle), ("silent", silent)):
            while chunk := sock.recv(65536):  # (until the server closes it)
                got[name] += chunk
    assert got["half"].startswith(b"HTTP/1.1 408 "), got["half"]
    assert got["idle"].count(b"HTTP/1.1 ") == 1 and got["silent"] == b"", got

    # the 503 of --limit-concurrency: one request in progress (a stream), one more shed
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stream:
        stream.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\nX-Request-ID: r-stream\r\n\r\n")
        assert stream.recv(65536).startswith(b"HTTP/1.1 200 ")
        shed = raw_exchange(port, b"GET /shed?s=1 HTTP/1.1\r\nHost: x\r\n"
                                  b"Connection: close\r\n\r\n")
    assert shed.startswith(b"HTTP/1.1 503 ") and b"\r\nretry-after: 1\r\n" in shed, shed
    made_503 = (_header(shed, b"x-request-id") or b"").decode()
    assert re.fullmatch(r"[0-9a-f]{32}", made_503), shed
    wait_until(lambda: "r-stream" in text_of(log_file), 10, message=describe)  # (it left)

    if fmt == "json":
        lines = once_each(log_file, port, {"r-400", "r-431", "r-505", made_413, "r-408",
                                           "r-idle", made_503, "r-stream", made["garbage"],
                                           made["414"]}, describe)
        assert [obj for obj in access_lines(log_file) if obj["request_id"] == "-"] == []

        def fields(obj: dict) -> tuple:
            return (obj["remote"], obj["method"], obj["path"][:12], obj["query"],
                    obj["http_version"], obj["status"], obj["bytes"])

        assert fields(lines[made["garbage"]]) == ("127.0.0.1", "-", "-", "", "-", 400,
                                                  _body_size(answers["garbage"]))
        assert fields(lines[made["414"]]) == ("127.0.0.1", "GET", "/uuuuuuuuuuu", "", "-", 414,
                                              _body_size(answers["414"]))
        assert fields(lines["r-400"]) == ("127.0.0.1", "GET", "/two-hosts", "a=1", "1.1", 400,
                                          _body_size(answers["400"]))
        assert fields(lines["r-431"]) == ("127.0.0.1", "GET", "/big-field", "", "1.1", 431,
                                          _body_size(answers["431"]))
        assert fields(lines["r-505"]) == ("127.0.0.1", "GET", "/v2", "", "2.0", 505,
                                          _body_size(answers["505"]))
        assert fields(lines[made_413]) == ("127.0.0.1", "POST", "/upload", "", "1.1", 413,
                                           _body_size(answers["413"]))
        assert fields(lines["r-408"]) == ("127.0.0.1", "GET", "/half", "h=1", "1.1", 408,
                                          _body_size(got["half"]))
        assert lines["r-408"]["duration_ms"] >= 900 and lines["r-408"]["user_agent"] == (
            "half/1"), lines["r-408"]
        assert fields(lines[made_503]) == ("127.0.0.1", "GET", "/shed", "s=1", "1.1", 503,
                                           _body_size(shed))
        assert len(access_lines(log_file)) == 11  # (and the barrier's: no line for the idle)
    else:
        wait_until(lambda: made_503 in text_of(log_file), 10, message=describe)
        access = [line.split("] ", 1)[1] for line in text_of(log_file).splitlines()
                  if "request_id=" in line]
        size = {name: _body_size(answer) for name, answer in answers.items()}
        expected = [
            rf'127\.0\.0\.1 - - \[[^]]+\] "GET /two-hosts\?a=1 HTTP/1\.1" 400 {size["400"]} '
            r'"-" "-" \d+\.\d+ms request_id=r-400',
            rf'127\.0\.0\.1 - - \[[^]]+\] "-" 400 {size["garbage"]} "-" "-" \d+\.\d+ms '
            rf"request_id={made['garbage']}",
            rf'127\.0\.0\.1 - - \[[^]]+\] "GET /u+ HTTP/-" 414 {size["414"]} "-" "-" '
            rf"\d+\.\d+ms request_id={made['414']}",
            rf'127\.0\.0\.1 - - \[[^]]+\] "GET /big-field HTTP/1\.1" 431 {size["431"]} "-" '
            r'"-" \d+\.\d+ms request_id=r-431',
            rf'127\.0\.0\.1 - - \[[^]]+\] "GET /v2 HTTP/2\.0" 505 {size["505"]} "-" "-" '
            r"\d+\.\d+ms request_id=r-505",
            rf'127\.0\.0\.1 - - \[[^]]+\] "POST /upload HTTP/1\.1" 413 {size["413"]} "-" "-" '
            rf"\d+\.\d+ms request_id={made_413}",
        ]
        assert len(access) >= len(expected), access
        for pattern, line in zip(expected, access, strict=False):
            assert re.fullmatch(pattern, line), (pattern, line)
        assert [re.search(r'" (\d+) ', line).group(1)  # type: ignore[union-attr]
                for line in access] == ["400", "400", "414", "431", "505", "413", "200",
                                        "408", "503", "200"], access
        assert re.search(r'"GET /half\?h=1 HTTP/1\.1" 408 \d+ "-" "half/1" '
                         r"\d{4,}\.\d+ms request_id=r-408", access[7]), access[7]
