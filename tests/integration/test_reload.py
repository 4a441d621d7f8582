"""Rolling reload, scale, status and ls against a real primary."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import zmq

from support import APPS, forkd_cli, request, wait_until

pytestmark = pytest.mark.integration

DEPLOY = (APPS / "testapp.py").read_text()


def deploy(folder: Path, version: str, broken: bool = False) -> None:
    text = DEPLOY.replace('VERSION = os.environ.get("TESTAPP_VERSION", "1")',
                          f'VERSION = "{version}"')
    if broken:
        text += "\nraise ImportError('bad deploy: missing dependency')\n"
    (folder / "deployapp.py").write_text(text)


def versions(port: int, count: int = 20) -> set[str]:
    return {request(port, path="/version")[2].decode() for _ in range(count)}


@pytest.fixture
def deployed(run_forkd, tmp_path: Path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    deploy(app_dir, "1")
    proc = run_forkd("deployapp:app", "-b", "127.0.0.1:0", "-w", "2", "--timeout", "10",
                     cwd=app_dir, env={"PYTHONDONTWRITEBYTECODE": "1"})
    port = proc.port()
    proc.wait_ready(2)
    return proc, port, app_dir


@pytest.mark.timeout(90)
def test_reload_shows_edited_code_and_replaces_every_worker(deployed) -> None:
    proc, port, app_dir = deployed
    before = set(proc.worker_pids())
    assert versions(port) == {"1"}
    deploy(app_dir, "2")
    result = forkd_cli(proc.env, "reload")
    assert result.returncode == 0, result.stderr + proc.describe()
    assert "slot 0 (1/2)" in result.stdout and "slot 1 (2/2)" in result.stdout
    assert versions(port) == {"2"}
    wait_until(lambda: len(proc.worker_pids()) == 2, 15, message=proc.describe)
    assert not before & set(proc.worker_pids())


@pytest.mark.timeout(90)
def test_bad_deploy_aborts_the_reload_and_the_old_code_keeps_answering(deployed) -> None:
    proc, port, app_dir = deployed
    before = set(proc.worker_pids())
    deploy(app_dir, "2", broken=True)
    result = forkd_cli(proc.env, "reload")
    assert result.returncode == 1
    assert "bad deploy: missing dependency" in result.stderr
    assert "reload aborted" in result.stderr
    assert versions(port) == {"1"}
    assert set(proc.worker_pids()) == before
    assert "event=reload-aborted slot=0" in proc.output()
    deploy(app_dir, "3")
    result = forkd_cli(proc.env, "reload")
    assert result.returncode == 0, result.stderr
    assert versions(port) == {"3"}


@pytest.mark.timeout(90)
def test_sighup_reloads(deployed) -> None:
    proc, port, app_dir = deployed
    deploy(app_dir, "4")
    proc.signal(signal.SIGHUP)
    wait_until(lambda: "event=reload-done" in proc.output(), 30, message=proc.describe)
    assert versions(port) == {"4"}


@pytest.mark.timeout(90)
def test_a_second_reload_while_one_runs_is_refused_as_busy(run_forkd, tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    # a slow start-up keeps the first reload running long enough to collide with
    deploy(app_dir, "1")
    text = (app_dir / "deployapp.py").read_text()
    (app_dir / "deployapp.py").write_text(
        text + "\nif os.environ.get('FORKD_WORKER_ID'):\n    time.sleep(1.5)\n")
    proc = run_forkd("deployapp:app", "-b", "127.0.0.1:0", "-w", "2", cwd=app_dir)
    proc.port()
    proc.wait_ready(2, timeout=30)
    first: dict[str, subprocess.CompletedProcess[str]] = {}
    thread = threading.Thread(target=lambda: first.update(r=forkd_cli(proc.env, "reload")))
    thread.start()
    wait_until(lambda: "event=reload-start" in proc.output(), 10, message=proc.describe)
    second = forkd_cli(proc.env, "reload")
    assert second.returncode == 1
    assert "busy: reload in progress (0/2)" in second.stderr
    scale = forkd_cli(proc.env, "scale", "3")
    assert scale.returncode == 1 and "busy" in scale.stderr
    thread.join(60)
    assert first["r"].returncode == 0, first["r"].stderr


@pytest.mark.timeout(90)
def test_scale_up_and_down_and_signals(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2", "--name", "web")
    proc.port()
    proc.wait_ready(2)
    result = forkd_cli(proc.env, "scale", "web", "+2")
    assert result.returncode == 0, result.stderr
    assert len(proc.worker_pids()) == 4
    result = forkd_cli(proc.env, "scale", "web", "-3")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(proc.worker_pids()) == 1, 15)
    doc = json.loads(forkd_cli(proc.env, "status", "--json").stdout)
    assert [w["id"] for w in doc["workers"]] == [0]
    proc.signal(signal.SIGTTIN)
    wait_until(lambda: len(proc.worker_pids()) == 2, 15, message=proc.describe)
    proc.signal(signal.SIGTTOU)
    wait_until(lambda: len(proc.worker_pids()) == 1, 15, message=proc.describe)
    bad = forkd_cli(proc.env, "scale", "web", "-5")
    assert bad.returncode in (1, 2) and bad.stderr


@pytest.mark.timeout(60)
def test_status_json_follows_the_spec(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2")
    port = proc.port()
    proc.wait_ready(2)
    for _ in range(10):
        request(port)
    wait_until(lambda: sum(w["requests"] for w in json.loads(
        forkd_cli(proc.env, "status", "--json").stdout)["workers"]) >= 10, 10)
    doc = json.loads(forkd_cli(proc.env, "status", "--json").stdout)
    assert doc["name"] == "testapp" and doc["pid"] == proc.pid and doc["app"] == "testapp:app"
    assert doc["bind"] == [f"127.0.0.1:{port}"] and isinstance(doc["started_at"], float)
    for worker in doc["workers"]:
        assert set(worker) >= {"id", "pid", "state", "started_at", "restarts", "last_exit",
                               "rss", "cpu_percent", "requests"}
        assert worker["state"] == "ready" and worker["rss"] > 1 << 20
    table = forkd_cli(proc.env, "status")
    assert table.returncode == 0 and "ready" in table.stdout


@pytest.mark.timeout(60)
def test_commands_with_no_primary_exit_2(forkd_home: Path) -> None:
    env = {"FORKD_HOME": str(forkd_home), "PATH": "/usr/bin:/bin"}
    for args in (["status"], ["reload"], ["stop"], ["scale", "2"]):
        result = forkd_cli(env, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "no primary" in result.stderr


@pytest.mark.timeout(60)
def test_ls_lists_two_primaries_and_a_name_is_needed_then(run_forkd) -> None:
    first = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--name", "alpha")
    second = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--name", "beta")
    for proc in (first, second):
        proc.port()
        proc.wait_ready(1)
    listing = forkd_cli(first.env, "ls")
    assert listing.returncode == 0
    assert "alpha" in listing.stdout and "beta" in listing.stdout
    ambiguous = forkd_cli(first.env, "status")
    assert ambiguous.returncode == 2 and "alpha" in ambiguous.stderr
    assert forkd_cli(first.env, "status", "beta").returncode == 0


@pytest.mark.timeout(60)
def test_garbage_on_the_control_socket_leaves_the_primary_serving(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--name", "g")
    port = proc.port()
    proc.wait_ready(1)
    endpoint = f"ipc://{proc.home}/g.sock"
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        dealer.send(b"\x00\xffnot json")
        dealer.send(b'{"v": 1, "id": "x", "command": "launch-missiles", "args": {}}')
        dealer.send_multipart([b"a", b"b", b"c"])
        dealer.send(b"x" * (10 << 20))
        dealer.close()
    finally:
        ctx.term()
    result = forkd_cli(proc.env, "status", "g")
    assert result.returncode == 0, result.stderr
    assert request(port)[0] == 200
    assert forkd_cli(proc.env, "stop", "g").returncode == 0
    assert proc.wait(15) == 0


@pytest.mark.timeout(60)
def test_commands_reach_a_primary_on_a_custom_control_endpoint(run_forkd, tmp_path: Path
                                                               ) -> None:
    endpoint = f"ipc://{tmp_path}/ctl/custom.sock"
    (tmp_path / "ctl").mkdir(mode=0o700)
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--control", endpoint)
    proc.port()
    proc.wait_ready(1)
    env = {**proc.env, "FORKD_CONTROL": endpoint}
    assert forkd_cli(env, "status").returncode == 0
    result = forkd_cli(proc.env, "reload", "--control", endpoint)
    assert result.returncode == 0, result.stderr
    assert forkd_cli(proc.env, "stop", "--control", endpoint).returncode == 0
    assert proc.wait(15) == 0


@pytest.mark.timeout(60)
def test_sighup_to_the_whole_process_group_reloads_without_killing_workers(deployed) -> None:
    proc, port, app_dir = deployed
    before = set(proc.worker_pids())
    deploy(app_dir, "5")
    os.killpg(proc.pid, signal.SIGHUP)  # a terminal hang-up reaches every process
    wait_until(lambda: "event=reload-done" in proc.output(), 30, message=proc.describe)
    assert versions(port) == {"5"}
    assert "killed: SIGHUP" not in proc.output() and "status=SIGHUP" not in proc.output()
    assert not before & set(proc.worker_pids())


@pytest.mark.timeout(60)
def test_tcp_control_needs_curve_keys_and_works_with_them(run_forkd, tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    endpoint = f"tcp://127.0.0.1:{port}"
    refused = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--control", endpoint)
    assert refused.wait(15) == 2
    assert "needs CURVE keys" in refused.output()
    made = forkd_cli(refused.env, "control-keys", str(tmp_path / "keys"))
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert oct(os.stat(secret).st_mode & 0o777) == "0o600"
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--control", endpoint,
                     "--control-keys", secret)
    proc.port()
    proc.wait_ready(1)
    with_keys = {**proc.env, "FORKD_CONTROL": endpoint, "FORKD_CONTROL_KEYS": secret}
    assert forkd_cli(with_keys, "status").returncode == 0
    other = forkd_cli(proc.env, "control-keys", str(tmp_path / "other"))
    wrong = {**with_keys, "FORKD_CONTROL_KEYS": other.stdout.strip()}
    denied = forkd_cli(wrong, "status", timeout=30)
    assert denied.returncode != 0
    assert forkd_cli(with_keys, "stop").returncode == 0
    assert proc.wait(15) == 0
