"""`forkd start`: real primary, real workers, real sockets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from support import raw_exchange, request, responds, wait_until

pytestmark = pytest.mark.integration


def pid_of_slot(port: int, slot: int, attempts: int = 200) -> int:
    for _ in range(attempts):
        status, _, body = request(port, path="/pid")
        data = json.loads(body)
        if status == 200 and data["worker_id"] == str(slot):
            return int(data["pid"])
    raise AssertionError(f"slot {slot} never answered")


@pytest.mark.timeout(60)
def test_start_serve_and_graceful_stop(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2")
    port = proc.port()
    proc.wait_ready(2)
    status, headers, body = request(port)
    assert (status, body) == (200, b"Hello, world!")
    assert len(proc.worker_pids()) == 2
    seen = {json.loads(request(port, path="/pid")[2])["workers"] for _ in range(5)}
    assert seen == {"2"}
    try:
        import setproctitle  # noqa: F401
    except ImportError:
        pass
    else:
        titles = sorted(" ".join(psutil.Process(pid).cmdline()) for pid in proc.worker_pids())
        assert titles[0].startswith("forkd: worker 0 [testapp] testapp:app"), titles
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.describe()
    out = proc.output()
    assert "event=stopping" in out and "event=stopped code=0" in out
    assert not responds(port)


@pytest.mark.timeout(60)
def test_killed_worker_is_replaced_in_the_same_slot(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2")
    port = proc.port()
    proc.wait_ready(2)
    victim = pid_of_slot(port, 1)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in proc.worker_pids() and len(proc.worker_pids()) == 2,
               10, message=proc.describe)
    new = pid_of_slot(port, 1)
    assert new != victim
    out = proc.output()
    assert f"event=worker-exited slot=1 pid={victim} status=SIGKILL" in out
    result = subprocess.run([sys.executable, "-m", "forkd", "status", "--json"],
                            env=proc.env, capture_output=True, text=True, timeout=10)
    doc = json.loads(result.stdout)
    slot1 = [w for w in doc["workers"] if w["id"] == 1 and w["pid"] == new][0]
    assert slot1["restarts"] == 1 and slot1["last_exit"] == "killed: SIGKILL"


@pytest.mark.timeout(60)
def test_crash_looping_slot_backs_off(run_forkd) -> None:
    proc = run_forkd("crashloop:app", "-b", "127.0.0.1:0", "-w", "1")
    proc.port()
    wait_until(lambda: "event=slot-backoff" in proc.output(), 20, message=proc.describe)
    # back-off means far fewer starts than a tight loop would make in the same time
    time_window_start = time.monotonic()
    starts_before = proc.output().count("event=worker-started")
    wait_until(lambda: time.monotonic() - time_window_start > 3, 5)
    starts_after = proc.output().count("event=worker-started")
    assert starts_after - starts_before <= 4, proc.describe()
    assert proc.proc.poll() is None  # the primary itself lives on


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app, needle", [
    ("broken_import:app", "RuntimeError: this app cannot be imported (on purpose)"),
    ("no_such_module:app", "no module named 'no_such_module'"),
    ("lifespan_fail:app", "database unreachable"),
])
def test_app_that_cannot_load_exits_fast_with_the_reason_and_leaves_nothing(
        run_forkd, app: str, needle: str) -> None:
    started = time.monotonic()
    proc = run_forkd(app, "-b", "127.0.0.1:0", "-w", "2")
    code = proc.wait(20)
    assert code == 1, proc.describe()
    assert time.monotonic() - started < 10
    assert needle in proc.output()
    assert "Traceback" in proc.output() or app != "broken_import:app"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of that group is left


@pytest.mark.timeout(60)
def test_sigkill_of_the_primary_leaves_no_worker(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2")
    proc.port()
    proc.wait_ready(2)
    workers = proc.worker_pids()
    assert len(workers) == 2
    proc.signal(signal.SIGKILL)
    proc.wait(5)
    killed_at = time.monotonic()
    wait_until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status()
                               != psutil.STATUS_ZOMBIE for pid in workers), 5)
    assert time.monotonic() - killed_at < 2.0


@pytest.mark.timeout(60)
def test_in_flight_request_finishes_during_graceful_stop(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1")
    port = proc.port()
    proc.wait_ready(1)
    result: dict[str, object] = {}

    def slow() -> None:
        result["response"] = request(port, path="/slow?ms=1500")

    thread = threading.Thread(target=slow)
    thread.start()
    wait_until(lambda: len(psutil.Process(proc.worker_pids()[0]).net_connections("tcp")) > 1,
               5, message="the slow request to be accepted")
    proc.signal(signal.SIGTERM)
    # new connections are refused or not served by a draining worker; the slow one finishes
    thread.join(15)
    status, headers, body = result["response"]  # type: ignore[misc]
    assert status == 200 and body == b"slow done"
    assert headers.get("connection") == "close"
    assert proc.wait(15) == 0


@pytest.mark.timeout(60)
def test_graceful_timeout_cuts_a_request_that_outlives_it(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--graceful-timeout", "1")
    port = proc.port()
    proc.wait_ready(1)
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            request(port, path="/slow?ms=20000", timeout=20)
        except BaseException as exc:  # the cut is what we expect
            errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    wait_until(lambda: len(psutil.Process(proc.worker_pids()[0]).net_connections("tcp")) > 1, 5)
    stopped_at = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert time.monotonic() - stopped_at < 5
    thread.join(10)
    assert errors


@pytest.mark.timeout(60)
def test_unix_socket_bind_with_mode_and_stale_file(run_forkd, tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file nobody listens on: stale
    stale.close()
    proc = run_forkd("testapp:app", "-b", f"unix:{path}", "-w", "1", "--unix-mode", "600")
    proc.wait_ready(1)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"Hello, world!")
    # a live socket is never taken over
    second = run_forkd("testapp:app", "-b", f"unix:{path}", "-w", "1", "--name", "other")
    assert second.wait(15) == 1
    assert "a process is listening on it" in second.output()
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert not path.exists()


@pytest.mark.timeout(60)
def test_ipv6_bind(run_forkd) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    proc = run_forkd("testapp:app", "-b", "[::1]:0", "-w", "1")
    port = proc.port()
    proc.wait_ready(1)
    reply = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                         host="::1", family=socket.AF_INET6)
    assert reply.startswith(b"HTTP/1.1 200")


@pytest.mark.timeout(60)
def test_fd_bind_serves_an_inherited_socket(run_forkd) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    proc = run_forkd("testapp:app", "-b", f"fd://{fd}", "-w", "1", pass_fds=(fd,))
    listener.close()  # only forkd holds it now
    proc.wait_ready(1)
    assert request(port)[0] == 200


@pytest.mark.timeout(60)
def test_default_worker_count_follows_the_cpu_affinity_mask(run_forkd) -> None:
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed")
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", wrap=["taskset", "-c", "0"])
    proc.port()
    proc.wait_ready(1)
    assert "workers=1 " in proc.output()
    assert len(proc.worker_pids()) == 1


@pytest.mark.timeout(30)
def test_bind_error_names_the_address_and_exits_1(run_forkd) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        proc = run_forkd("testapp:app", "-b", f"127.0.0.1:{port}")
        assert proc.wait(15) == 1
        assert f"cannot bind 127.0.0.1:{port}: Address already in use" in proc.output()
    finally:
        taken.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args, needle", [
    (["--workers", "zero"], "--workers"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--bind", "nohostport"], "--bind"),
    (["--interface", "cgi"], "--interface"),
])
def test_bad_flag_names_the_flag_and_exits_2(run_forkd, args: list[str], needle: str) -> None:
    proc = run_forkd("testapp:app", *args)
    assert proc.wait(15) == 2
    assert needle in proc.output()


@pytest.mark.timeout(30)
def test_env_and_file_settings_and_their_precedence(run_forkd, tmp_path: Path) -> None:
    config = tmp_path / "forkd.toml"
    config.write_text('workers = 3\nbind = ["127.0.0.1:0"]\nname = "fromfile"\n')
    proc = run_forkd("testapp:app", "--config", str(config), env={"FORKD_WORKERS": "2"})
    proc.port()
    proc.wait_ready(2)
    assert "name=fromfile" in proc.output() and "workers=2 " in proc.output()
    bad = tmp_path / "bad.toml"
    bad.write_text("wokers = 3\n")
    proc2 = run_forkd("testapp:app", "--config", str(bad))
    assert proc2.wait(15) == 2
    assert "unknown key 'wokers'" in proc2.output()


@pytest.mark.timeout(30)
def test_second_primary_with_the_same_name_is_refused(run_forkd) -> None:
    first = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1")
    first.port()
    first.wait_ready(1)
    second = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1")
    assert second.wait(15) == 1
    assert "testapp" in second.output() and "already" in second.output()
    assert first.proc.poll() is None


@pytest.mark.timeout(30)
def test_idle_primary_uses_almost_no_cpu(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2")
    proc.port()
    proc.wait_ready(2)
    primary = psutil.Process(proc.pid)
    before = primary.cpu_times()
    started = time.monotonic()
    wait_until(lambda: time.monotonic() - started >= 3, 5)
    after = primary.cpu_times()
    used = (after.user + after.system) - (before.user + before.system)
    assert used / (time.monotonic() - started) < 0.01


@pytest.mark.timeout(60)
def test_sigusr1_does_not_end_the_primary(run_forkd) -> None:
    """It used to kill the primary (and every worker) by its default action. (SIGUSR2
    upgrades the primary: tests/integration/test_upgrade.py.)"""
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1")
    port = proc.port()
    proc.wait_ready(1)
    proc.signal(signal.SIGUSR1)
    wait_until(lambda: "event=logs-reopen" in proc.output(), 10, message=proc.describe)
    assert proc.proc.poll() is None and request(port)[0] == 200


@pytest.mark.timeout(60)
def test_the_open_files_limit_is_raised_to_the_hard_limit(run_forkd) -> None:
    """Started with a soft limit of 256 (hard 4096), the primary raises it as nginx does,
    says so, and every worker inherits 4096: an idle flood meets the hard limit only."""
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2",
                     wrap=["prlimit", "--nofile=256:4096", "--"])
    proc.port()
    proc.wait_ready(2)
    assert "event=fd-limit-raised soft=4096 was=256" in proc.output(), proc.describe()
    limits = {psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE) for pid in proc.worker_pids()}
    assert limits == {(4096, 4096)}, limits
