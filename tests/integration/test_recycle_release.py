"""max-requests recycling at the Nth request, and reloads that follow a deploy's
switched `current` symlink (--chdir), against a real primary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support import APPS, forkd_cli, request, wait_until

pytestmark = pytest.mark.integration

APP = (APPS / "testapp.py").read_text()


@pytest.mark.timeout(90)
def test_max_requests_recycles_workers_at_the_nth_request(run_forkd) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "2", "--max-requests", "50")
    port = proc.port()
    proc.wait_ready(2)
    pids: list[int] = []
    failures = []
    for index in range(300):  # one connection each, as a new user's curl loop does
        try:
            status, _, body = request(port, path="/pid")
        except OSError as exc:
            failures.append(f"request {index}: {exc!r}")
            continue
        if status != 200:
            failures.append(f"request {index}: {status}")
            continue
        pids.append(json.loads(body)["pid"])
    assert failures == [], proc.describe()
    # 300 requests over workers recycled every 50: at least 4 distinct workers served
    # (a recycle judged from the heartbeat alone left the first two serving them all)
    assert len(set(pids)) >= 4, (sorted(set(pids)), proc.describe())
    assert "reason=max-requests requests=50 limit=50" in proc.output()


def _release(root: Path, version: str) -> Path:
    folder = root / "releases" / version
    folder.mkdir(parents=True)
    (folder / "releaseapp.py").write_text(APP.replace(
        'VERSION = os.environ.get("TESTAPP_VERSION", "1")', f'VERSION = "{version}"'))
    return folder


def _switch(link: Path, target: Path) -> None:
    """Point `link` at `target` atomically, as deploy tools do (rename over it)."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(target)
    os.replace(new, link)


@pytest.mark.timeout(120)
def test_reload_follows_a_switched_release_symlink_and_back(run_forkd, tmp_path: Path) -> None:
    root = tmp_path / "srv"
    one, two = _release(root, "1"), _release(root, "2")
    current = root / "current"
    current.symlink_to(one)
    # `cd /srv/app/current; forkd start ...`: the shell's PWD keeps the symlink's path
    proc = run_forkd("releaseapp:app", "-b", "127.0.0.1:0", "-w", "2", cwd=current,
                     env={"PWD": str(current), "PYTHONDONTWRITEBYTECODE": "1"})
    port = proc.port()
    proc.wait_ready(2)

    def served() -> set[str]:
        return {request(port, path="/version")[2].decode() for _ in range(20)}

    def worker_dirs() -> list[str]:
        result = forkd_cli(proc.env, "status", "--json")
        assert result.returncode == 0, result.stderr
        return sorted(w["cwd"] for w in json.loads(result.stdout)["workers"])

    assert served() == {"1"}
    assert worker_dirs() == [str(one), str(one)]
    _switch(current, two)
    result = forkd_cli(proc.env, "reload")
    assert result.returncode == 0, result.stderr + proc.describe()
    assert served() == {"2"}
    wait_until(lambda: worker_dirs() == [str(two), str(two)], 15, message=proc.describe)
    text = forkd_cli(proc.env, "status").stdout
    assert str(two) in text and str(one) not in text
    _switch(current, one)
    result = forkd_cli(proc.env, "reload")
    assert result.returncode == 0, result.stderr + proc.describe()
    assert served() == {"1"}
    wait_until(lambda: worker_dirs() == [str(one), str(one)], 15, message=proc.describe)


@pytest.mark.timeout(60)
def test_chdir_names_the_release_directory_explicitly(run_forkd, tmp_path: Path) -> None:
    root = tmp_path / "srv"
    one, two = _release(root, "1"), _release(root, "2")
    current = root / "current"
    current.symlink_to(one)
    proc = run_forkd("releaseapp:app", "-b", "127.0.0.1:0", "-w", "1", "--chdir", str(current),
                     cwd=tmp_path, env={"PYTHONDONTWRITEBYTECODE": "1"})
    port = proc.port()
    proc.wait_ready(1)
    assert request(port, path="/version")[2] == b"1"
    _switch(current, two)
    result = forkd_cli(proc.env, "reload")
    assert result.returncode == 0, result.stderr + proc.describe()
    assert request(port, path="/version")[2] == b"2"


@pytest.mark.timeout(60)
def test_a_missing_chdir_names_the_directory_and_exits_1(run_forkd, tmp_path: Path) -> None:
    proc = run_forkd("testapp:app", "-b", "127.0.0.1:0", "-w", "1", "--chdir",
                     str(tmp_path / "nowhere"))
    assert proc.wait(30) == 1, proc.describe()
    assert f"--chdir {tmp_path / 'nowhere'}: No such file or directory" in proc.output()
