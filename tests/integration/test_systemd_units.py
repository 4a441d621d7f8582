"""The shipped and rendered units, judged by systemd's own tools, offline.

`systemd-analyze verify` loads a unit the way PID 1 would and fails on a bad
setting or an ExecStart= binary that is not there. It is run with `--root` on a
scratch tree: the distribution's units (for sysinit.target and friends) copied in,
our units in its /etc/systemd/system, and an executable stub at the unit's
ExecStart= path, so the shipped file is verified exactly as it is installed.
No systemd as PID 1 is needed.

`systemd-analyze security --offline=true` scores the sandbox from 0 (locked down)
to 10 (exposed). The gate is EXPOSURE_LIMIT = 2.0 ("OK" is below 4.0 in systemd's
scale); the units score 1.2 (template) and 1.2-1.3 (rendered) today, so the gate
has room for a deliberate trade-off but not for dropping the sandbox.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from forkd.units import render_service, render_socket
from support import Forkd, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="needs systemd-analyze (Debian package systemd)")

REPO = Path(__file__).resolve().parents[2]
EXPOSURE_LIMIT = 2.0
APP = "sample_app.asgi:app"
DISTRO_UNITS = next(
    (path for path in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
     if (path / "sysinit.target").exists()),
    None,
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=45, check=False)


def make_root(tmp_path: Path, units: dict[str, str], executables: list[str]) -> Path:
    if DISTRO_UNITS is None:
        pytest.skip("no distribution unit directory with sysinit.target")
    root = tmp_path / "root"
    shutil.copytree(DISTRO_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name, text in units.items():
        (unit_dir / name).write_text(text)
    for path in executables:
        stub = root / path.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def verify(root: Path, *names: str) -> None:
    result = analyze("verify", "--man=no", f"--root={root}", *names)
    output = result.stdout + result.stderr
    # Unknown or misspelt settings are only warnings: they must fail the test too.
    complaints = [line for line in output.splitlines() if "forkd" in line]
    assert result.returncode == 0 and not complaints, output


def exposure(unit_file: Path) -> float:
    result = analyze("security", "--offline=true", f"--threshold={int(EXPOSURE_LIMIT * 10)}",
                     str(unit_file))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    assert result.returncode == 0, f"exposure {score} > {EXPOSURE_LIMIT}:\n{result.stdout}"
    return score


@needs_analyze
def test_shipped_units_verify(tmp_path: Path) -> None:
    units = {name: (REPO / "systemd" / name).read_text()
             for name in ("forkd@.service", "forkd@.socket")}
    root = make_root(tmp_path, units, ["/usr/local/bin/forkd"])
    verify(root, "forkd@web.service", "forkd@web.socket")


@needs_analyze
def test_verify_catches_a_missing_executable(tmp_path: Path) -> None:
    """The harness itself: without the stub, the same unit must fail."""
    units = {"forkd@.service": (REPO / "systemd/forkd@.service").read_text()}
    root = make_root(tmp_path, units, [])
    result = analyze("verify", "--man=no", f"--root={root}", "forkd@web.service")
    assert result.returncode != 0
    assert "/usr/local/bin/forkd" in result.stdout + result.stderr


@needs_analyze
def test_rendered_units_verify(tmp_path: Path) -> None:
    options = {"name": "shop", "bind": ["127.0.0.1:8080", "unix:/run/shop/http.sock"],
               "workers": "4", "graceful_timeout": "60", "max_memory": "512M",
               "preload": True, "root_path": "/my shop"}
    exec_path = "/opt/shop/venv/bin/forkd"
    plain = render_service(APP, options, exec_path=exec_path, working_directory="/srv/shop")
    activated = render_service(APP, options, exec_path=exec_path, socket_activated=True)
    root = make_root(tmp_path, {"forkd-shop.service": plain}, [exec_path])
    verify(root, "forkd-shop.service")
    root2 = make_root(tmp_path / "activated",
                      {"forkd-shop.service": activated,
                       "forkd-shop.socket": render_socket(APP, options)},
                      [exec_path])
    verify(root2, "forkd-shop.service", "forkd-shop.socket")


@needs_analyze
def test_shipped_service_exposure_is_low() -> None:
    assert exposure(REPO / "systemd/forkd@.service") <= EXPOSURE_LIMIT


@needs_analyze
@pytest.mark.parametrize("home", [False, True], ids=["srv", "home"])
def test_rendered_service_exposure_is_low(tmp_path: Path, home: bool) -> None:
    base = "/home/ann" if home else "/srv/shop"
    unit = tmp_path / "forkd-shop.service"
    unit.write_text(render_service(APP, {"name": "shop"}, exec_path=f"{base}/venv/bin/forkd",
                                   working_directory=base))
    assert exposure(unit) <= EXPOSURE_LIMIT


def test_rendered_exec_start_is_a_command_forkd_accepts(run_forkd: Callable[..., Forkd]) -> None:
    """The flags a unit carries are the ones `forkd start` takes: run its ExecStart=."""
    options = {"bind": ["127.0.0.1:0"], "workers": "1", "graceful-timeout": "5",
               "preload": False, "access_log": True, "max_memory": "512M"}
    text = render_service("testapp:app", options, exec_path="/usr/local/bin/forkd")
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart=").replace("$$", "$"))
    assert argv[:2] == ["/usr/local/bin/forkd", "start"]
    proc = run_forkd(*argv[2:])
    port = proc.port()
    proc.wait_ready(1)
    assert request(port)[0] == 200
    assert "name=testapp" in proc.output()
