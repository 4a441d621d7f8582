"""`forkd upgrade` and SIGUSR2: a new primary takes the listening sockets over while
load runs, and the old one drains and exits; a new primary that cannot start leaves
the old one serving. Load comes from `hey` (Debian package hey), with and without
keep-alive: a closed listener or a dropped connection shows as an error there."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from support import Forkd, forkd_cli, request, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FORKD_SCRIPT = Path(sys.executable).parent / "forkd"  # the console script of this venv


def primaries(proc: Forkd) -> list[list[str]]:
    """The rows of `forkd ls` (name, pid, workers, app, endpoint)."""
    result = forkd_cli(proc.env, "ls", timeout=30)
    assert result.returncode == 0, result.stderr
    return [line.split() for line in result.stdout.splitlines()[1:]]


def unix_get(path: Path, target: str) -> bytes:
    """One HTTP/1.0 exchange over a unix socket: the raw answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def served(proc: Forkd) -> int:
    """Requests the workers have counted so far (their beats carry the counts)."""
    result = forkd_cli(proc.env, "status", "--json", timeout=30)
    if result.returncode != 0:
        return 0
    return sum(worker["requests"] for worker in json.loads(result.stdout)["workers"])


def start_hey(port: int, keepalive: bool, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    argv = ["hey", "-z", f"{seconds}s", "-c", "8", "-t", "10"]
    if not keepalive:
        argv.append("-disable-keepalive")
    with open(out, "wb") as sink:
        return subprocess.Popen([*argv, f"http://127.0.0.1:{port}/"], stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def hey_counts(text: str) -> tuple[dict[str, int], str]:
    """(status code -> responses, the error section) of a hey report."""
    codes = {code: int(count) for code, count
             in re.findall(r"\[(\d{3})\]\s+(\d+) responses", text)}
    errors = text.partition("Error distribution:")[2].strip()
    return codes, errors


def stop_group(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        try:
            popen.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait(5)


@pytest.mark.skipif(shutil.which("hey") is None, reason="needs hey (Debian package hey)")
@pytest.mark.parametrize("how", ["forkd-script+command+keepalive",
                                 "python-m+sigusr2+no-keepalive"])
def test_upgrade_under_load_drops_nothing_and_leaves_one_new_primary(
        run_forkd, tmp_path: Path, how: str) -> None:
    script = how.startswith("forkd-script")
    keepalive = how.endswith("+keepalive")
    unix_path = tmp_path / "web.sock"
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-b", f"unix:{unix_path}", "-w", "2",
                     "--name", "up", launcher=[str(FORKD_SCRIPT)] if script else None)
    port = proc.port()
    proc.wait_ready(2)
    old_workers = set(proc.worker_pids())
    report = tmp_path / "hey.txt"
    hey = start_hey(port, keepalive, 5, report)
    try:
        wait_until(lambda: served(proc) > 0, 15, message=proc.describe)  # load is on
        if how.startswith("python-m"):
            proc.signal(signal.SIGUSR2)
            wait_until(lambda: "event=took-over" in proc.output(), 60, message=proc.describe)
        else:
            result = forkd_cli(proc.env, "upgrade", timeout=90)
            assert result.returncode == 0, result.stdout + result.stderr + proc.describe()
            assert "new primary pid" in result.stdout
        assert proc.wait(60) == 0, proc.describe()  # the old primary drained and left
        hey.wait(30)
    finally:
        stop_group(hey)
    codes, errors = hey_counts(report.read_text())
    assert not errors and set(codes) == {"200"} and codes["200"] > 100, (
        report.read_text() + proc.describe())

    rows = primaries(proc)
    assert len(rows) == 1 and rows[0][0] == "up", rows
    new_pid = int(rows[0][1])
    assert new_pid != proc.pid
    new = psutil.Process(new_pid)
    # started again as `python -m forkd` by this virtualenv's Python, with the same
    # words, whatever started the first
    command = new.cmdline()
    assert Path(command[0]).parent == Path(sys.executable).parent
    assert command[1:] == ["-m", "forkd", "start", "testapp:app", "-b", "127.0.0.1:0",
                           "-b", f"unix:{unix_path}", "-w", "2", "--name", "up"]
    new_workers = {child.pid for child in new.children()}
    assert len(new_workers) == 2 and not new_workers & old_workers
    assert json.loads(request(port, path="/pid")[2])["pid"] in new_workers
    # the unix listener too: its file was left in place by the old primary, not unlinked
    answer = unix_get(unix_path, "/pid")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["pid"] in new_workers
    new.terminate()  # (it is not the fixture's child: stop it by its pid)
    psutil.wait_procs([new], timeout=30)


@pytest.mark.timeout(150)
def test_a_release_through_a_symlink_is_loaded_anew_and_a_broken_one_is_refused(
        run_forkd, tmp_path: Path) -> None:
    """--preload: the new primary imports the code now behind `current`; when that
    does not import, the upgrade fails with the reason and the old primary serves on."""
    def release(name: str, body: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "preloaded.py").write_text(body)
        return folder

    one = release("r1", GOOD_RELEASE.replace("NAME", "one"))
    broken = release("r2", "import no_such_module_here\n")
    three = release("r3", GOOD_RELEASE.replace("NAME", "three"))
    current = tmp_path / "current"
    current.symlink_to(one)
    proc = run_forkd("preloaded:app", "--preload", "-b", "127.0.0.1:0", "-w", "1",
                     "--name", "rel", "--chdir", str(current),
                     env={"PYTHONDONTWRITEBYTECODE": "1"})
    port = proc.port()
    proc.wait_ready(1)
    assert request(port)[2] == b"one"

    current.unlink()
    current.symlink_to(broken)
    result = forkd_cli(proc.env, "upgrade", timeout=90)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "upgrade failed, the old primary goes on serving" in result.stderr
    assert "No module named 'no_such_module_here'" in result.stderr
    assert proc.proc.poll() is None and request(port)[2] == b"one"
    assert [row[1] for row in primaries(proc)] == [str(proc.pid)]
    wait_until(lambda: "event=successor-exited" in proc.output(), 30, message=proc.describe)

    current.unlink()
    current.symlink_to(three)
    upgrade_then_stop(proc, port, b"three")


def upgrade_then_stop(proc, port: int, body: bytes) -> None:
    """`forkd upgrade` succeeds, the new release answers, the old primary exits; then the
    new primary (no child of the test's) is stopped by its pid."""
    result = forkd_cli(proc.env, "upgrade", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr + proc.describe()
    assert request(port)[2] == body
    assert proc.wait(60) == 0, proc.describe()
    (row,) = primaries(proc)
    new = psutil.Process(int(row[1]))
    new.terminate()
    psutil.wait_procs([new], timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_hits(metrics_port: int) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "probe_hits_total":
                return float(sample.value)
    return None


def test_upgrade_hands_over_the_metrics_address_and_the_app_counters(
        run_forkd, tmp_path: Path) -> None:
    """With --metrics the new primary serves /metrics on the same address once it took
    over, and the app's prometheus_client counters go on from where they were."""
    mport = free_port()
    proc = run_forkd("metrics_probe:app", "-b", "127.0.0.1:0", "-w", "1", "--name", "met",
                     "--metrics", f"127.0.0.1:{mport}")
    port = proc.port()
    proc.wait_ready(1)
    app_dir = Path(re.search(r"app_dir=(\S+)", proc.output()).group(1))  # type: ignore[union-attr]
    for _ in range(7):
        assert request(port)[0] == 200
    wait_until(lambda: app_hits(mport) == 7, 15, message=proc.describe)
    result = forkd_cli(proc.env, "upgrade", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr + proc.describe()
    assert proc.wait(60) == 0, proc.describe()
    (row,) = primaries(proc)
    new = psutil.Process(int(row[1]))
    try:
        for _ in range(3):
            assert request(port)[0] == 200
        wait_until(lambda: app_hits(mport) == 10, 15,
                   message=lambda: f"probe_hits_total {app_hits(mport)}\n{proc.describe()}")
        assert app_dir.is_dir()  # the old primary left it to the new one
    finally:
        new.terminate()
        psutil.wait_procs([new], timeout=30)
    assert not app_dir.exists()  # ... which removed it when it stopped


def test_sigusr2_to_every_process_of_the_unit_upgrades_without_killing_a_worker(
        run_forkd) -> None:
    """`systemctl kill -s USR2` signals every process of the unit: the workers ignore it
    (before, its default action ended them all) and the primary upgrades."""
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2", "--name", "grp")
    port = proc.port()
    proc.wait_ready(2)
    os.killpg(os.getpgid(proc.pid), signal.SIGUSR2)
    wait_until(lambda: "event=took-over" in proc.output(), 60, message=proc.describe)
    assert proc.wait(60) == 0, proc.describe()
    out = proc.output()
    assert "SIGUSR2" not in out.split("event=handed-over")[0].replace("name=SIGUSR2", "")
    assert "worker-exited" not in out.split("event=handed-over")[0], out
    (row,) = primaries(proc)
    new = psutil.Process(int(row[1]))
    try:
        assert request(port)[0] == 200
    finally:
        new.terminate()
        psutil.wait_procs([new], timeout=30)


GOOD_RELEASE = (
    "RELEASE = 'NAME'\n\n"
    "async def app(scope, receive, send):\n"
    "    if scope['type'] == 'lifespan':\n"
    "        while True:\n"
    "            message = await receive()\n"
    "            await send({'type': message['type'] + '.complete'})\n"
    "            if message['type'] == 'lifespan.shutdown':\n"
    "                return\n"
    "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
    "    await send({'type': 'http.response.body', 'body': RELEASE.encode()})\n")

# A release whose new primary is slow to go, as one that timed out (which takes
# --startup-timeout + 30 s to come about): it fails to import, keeps its descriptors
# (the upgrade's handshake among them) open, and ignores SIGTERM for 4 s on its way out.
LINGERING_BROKEN_RELEASE = (
    "import atexit, os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "_held = []\n"
    "for fd in range(3, 256):\n"
    "    try:\n"
    "        _held.append(os.dup(fd))\n"
    "    except OSError:\n"
    "        pass\n"
    "atexit.register(time.sleep, 4)\n"
    "raise ImportError('this release is broken')\n")

# A release whose new primary dies right after it said ready (killed by the OOM
# killer, say) and before the old primary read the word: the old primary is stopped
# (SIGSTOP) while the new one says ready and kills itself, and continued (by a helper
# process) only once the new one is a zombie.
READY_THEN_DEAD_RELEASE = (
    "import os, signal, time\n"
    "from forkd import handoff\n"
    "def _state(pid):\n"
    "    with open(f'/proc/{pid}/stat') as stat:\n"
    "        return stat.read().rpartition(')')[2].split()[0]\n"
    "def _wait_state(pid, states):\n"
    "    deadline = time.monotonic() + 10\n"
    "    while _state(pid) not in states and time.monotonic() < deadline:\n"
    "        time.sleep(0.002)\n"
    "_ready = handoff.Predecessor.ready\n"
    "def _ready_then_die(self):\n"
    "    old, me = os.getppid(), os.getpid()\n"
    "    os.kill(old, signal.SIGSTOP)\n"
    "    _wait_state(old, ('T', 't'))\n"
    "    if os.fork() == 0:\n"
    "        try:\n"
    "            _wait_state(me, ('Z', 'X'))\n"
    "        finally:\n"
    "            os.kill(old, signal.SIGCONT)\n"
    "            os._exit(0)\n"
    "    _ready(self)\n"
    "    os.kill(me, signal.SIGKILL)\n"
    "handoff.Predecessor.ready = _ready_then_die\n"
    + GOOD_RELEASE.replace("NAME", "never"))


def start_releases(run_forkd, tmp_path: Path, name: str) -> tuple[Forkd, int, Path]:
    """forkd --preload of `current` -> release r1 (answers "one"), one worker."""
    folder = tmp_path / "r1"
    folder.mkdir()
    (folder / "preloaded.py").write_text(GOOD_RELEASE.replace("NAME", "one"))
    current = tmp_path / "current"
    current.symlink_to(folder)
    proc = run_forkd("preloaded:app", "--preload", "-b", "127.0.0.1:0", "-w", "1",
                     "--name", name, "--chdir", str(current),
                     env={"PYTHONDONTWRITEBYTECODE": "1"})
    port = proc.port()
    proc.wait_ready(1)
    assert request(port)[2] == b"one"
    return proc, port, current


def switch_release(tmp_path: Path, current: Path, name: str, body: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "preloaded.py").write_text(body)
    current.unlink()
    current.symlink_to(folder)


def successor_pids(proc: Forkd) -> list[int]:
    return [int(pid) for pid in re.findall(r"event=upgrade-successor pid=(\d+)", proc.output())]


def test_a_second_upgrade_while_the_failed_new_primary_still_stops_is_refused(
        run_forkd, tmp_path: Path) -> None:
    """The first upgrade fails and its new primary takes seconds to exit. A second
    upgrade meanwhile is refused, naming it; the old primary serves on without spinning
    on the first one's handshake, and once it is gone the next upgrade works."""
    proc, port, current = start_releases(run_forkd, tmp_path, "linger")
    switch_release(tmp_path, current, "r2", LINGERING_BROKEN_RELEASE)
    first = forkd_cli(proc.env, "upgrade", timeout=90)
    assert first.returncode == 1 and "this release is broken" in first.stderr, first.stderr
    second = forkd_cli(proc.env, "upgrade", timeout=90)
    (lingering, *_) = successor_pids(proc)
    assert psutil.pid_exists(lingering)  # (it lingers 4 s: the second came meanwhile)

    wait_until(lambda: not psutil.pid_exists(lingering), 20, message=proc.describe)
    primary = psutil.Process(proc.pid)
    before = primary.cpu_times()
    time.sleep(2.0)  # a window to measure the idle primary's CPU time over
    after = primary.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    assert used < 0.2, f"the primary used {used:.2f}s of CPU in 2s idle\n{proc.describe()}"

    assert second.returncode == 1, second.stdout + second.stderr
    assert (f"busy: the new primary of the last upgrade (pid {lingering}) is still "
            "stopping; try again once it has exited") in second.stderr
    assert successor_pids(proc) == [lingering]  # no second new primary was started
    assert request(port)[2] == b"one"

    switch_release(tmp_path, current, "r3", GOOD_RELEASE.replace("NAME", "three"))
    upgrade_then_stop(proc, port, b"three")


def test_a_new_primary_that_dies_after_saying_ready_is_not_handed_over_to(
        run_forkd, tmp_path: Path) -> None:
    proc, port, current = start_releases(run_forkd, tmp_path, "rtd")
    switch_release(tmp_path, current, "r2", READY_THEN_DEAD_RELEASE)
    result = forkd_cli(proc.env, "upgrade", timeout=90)
    (successor,) = successor_pids(proc)
    assert result.returncode == 1, result.stdout + result.stderr + proc.describe()
    assert (f"upgrade failed, the old primary goes on serving: the new primary (pid "
            f"{successor}) said it was ready, then exited (SIGKILL) before it took over"
            ) in result.stderr
    assert proc.proc.poll() is None and "event=handed-over" not in proc.output()
    assert request(port)[2] == b"one"
    assert [row[1] for row in primaries(proc)] == [str(proc.pid)]
