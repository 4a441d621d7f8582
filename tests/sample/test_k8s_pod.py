"""deploy/k8s/deployment.yaml's container, run the way a kubelet would run it, minus the
cluster: the manifest's forkd arguments and environment, as its runAsUser/runAsGroup with no
privileges, on a read-only root filesystem (a private mount namespace, remounted read-only),
with each volumeMount an emptyDir-like tmpfs owned by root with mode 0777. It must come up and
serve sessions from a real redis-server; and a FORKD_HOME at the volume's root itself must be
refused, which is why the manifest puts it one directory below.

Only the addresses change: the listeners bind free loopback ports, REDIS_URL names the test's
redis-server. Options this forkd does not know yet (see PENDING_OPTIONS in
tests/unit/test_k8s_manifests.py, strict xfails there) are left out until they exist.
Needs root (mount namespaces, setpriv) and util-linux."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from sample_harness import REPO, RedisServer, free_port, http_request, wait_until

from forkd.cli import start as start_command

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount namespaces and setpriv"),
    pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("setpriv")),
                       reason="needs unshare and setpriv (Debian: util-linux)"),
]

DEPLOYMENT = REPO / "deploy" / "k8s" / "deployment.yaml"


def _spec() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return pod, container


def _known_options() -> set[str]:
    return {o for p in start_command.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}


def _local_args(args: list[str], http_port: int) -> list[str]:
    """The manifest's args with loopback addresses, without options this forkd lacks."""
    known, out, i = _known_options(), list(args[:2]), 2
    while i < len(args):
        option, value = args[i], args[i + 1] if i + 1 < len(args) else None
        takes_value = value is not None and not value.startswith("-")
        step = 2 if takes_value else 1
        if option in known:
            if option in ("-b", "--bind"):
                value = f"127.0.0.1:{http_port}"
            elif option == "--metrics":
                value = f"127.0.0.1:{free_port()}"
            out += [option, str(value)] if takes_value else [option]
        i += step
    return out


def _blocked_ancestors(path: Path) -> list[Path]:
    """Ancestors of ``path`` that other users cannot traverse (like /root, mode 0700)."""
    return [p for p in reversed(path.parents)
            if p != Path("/") and not os.stat(p).st_mode & stat.S_IXOTH]


def _namespace_script(workdir: Path, mounts: dict[str, Path], uid: int, gid: int) -> str:
    """Shell run by `unshare -m`: the pod's filesystem view, then drop to uid/gid and exec."""
    lines = ["set -eu", "mount --make-rprivate /"]
    # The interpreter and the code must stay reachable for the unprivileged user: re-expose
    # them through a world-traversable tmpfs laid over any ancestor that hides them.
    needed = [Path(sys.base_prefix).resolve(), Path(sys.prefix), REPO]
    hidden: dict[Path, list[Path]] = {}
    for path in needed:
        blocked = _blocked_ancestors(path)
        if blocked:
            hidden.setdefault(blocked[0], []).append(path)
    for n, (ancestor, paths) in enumerate(hidden.items()):
        keep = [workdir / f"keep{n}-{i}" for i in range(len(paths))]
        for path, spot in zip(paths, keep, strict=True):
            spot.mkdir()
            lines.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(spot))}")
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(ancestor))}")
        for path, spot in zip(paths, keep, strict=True):
            lines.append(f"mkdir -p {shlex.quote(str(path))}")
            lines.append(f"mount --bind {shlex.quote(str(spot))} {shlex.quote(str(path))}")
    for target in mounts.values():
        target.mkdir()
        # What the kubelet makes of an emptyDir: a directory of root's, mode 0777.
        lines.append(f"mount -t tmpfs -o mode=0777 tmpfs {shlex.quote(str(target))}")
    lines.append("mount -o remount,bind,ro /")  # readOnlyRootFilesystem
    lines.append(f'exec setpriv --reuid {uid} --regid {gid} --clear-groups --no-new-privs "$@"')
    return "\n".join(lines)


class Pod:
    def __init__(self, workdir: Path, redis_url: str, home_below_mount: bool = True) -> None:
        pod, container = _spec()
        security = pod["securityContext"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        self.uid, self.gid = int(security["runAsUser"]), int(security["runAsGroup"])
        self.mounts = {m["mountPath"]: workdir / f"vol-{m['name']}"
                       for m in container["volumeMounts"]}
        env = {e["name"]: str(e["value"]) for e in container["env"]}
        if not home_below_mount:  # the volume's own root, as a first draft of the manifest had
            env["FORKD_HOME"] = str(Path(env["FORKD_HOME"]).parent)
            assert env["FORKD_HOME"] in self.mounts
        env = {name: self._remap(value) for name, value in env.items()}
        env["REDIS_URL"] = redis_url
        self.port = free_port()
        args = _local_args([str(a) for a in container["args"]], self.port)
        self.env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": str(REPO),
                    "PYTHONDONTWRITEBYTECODE": "1", **env}
        script = _namespace_script(workdir, self.mounts, self.uid, self.gid)
        self.log_path = workdir / "forkd.log"
        argv = ["unshare", "-m", "sh", "-c", script, "pod",
                "env", "-i", *(f"{k}={v}" for k, v in self.env.items()),
                sys.executable, "-m", "forkd", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def _remap(self, value: str) -> str:
        for path, target in self.mounts.items():
            if value == path or value.startswith(path + "/"):
                return str(target) + value[len(path):]
        return value

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are 0700, and the pod's user must reach its volumes.
    path = Path(tempfile.mkdtemp(prefix="pod-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(90)
def test_the_deployments_container_serves_as_its_user_on_a_read_only_root(
    workdir: Path, redis_server: RedisServer
) -> None:
    pod = Pod(workdir, redis_server.url)
    try:
        assert wait_until(lambda: "event=all-ready" in pod.output() or pod.proc.poll()
                          is not None, 45), pod.output()
        assert pod.proc.poll() is None, pod.output()
        primary = psutil.Process(pod.proc.pid)
        processes = [primary, *primary.children()]
        assert len(processes) >= 2, pod.output()
        for process in processes:
            assert process.uids().real == pod.uid and process.gids().real == pod.gid
        # The root filesystem really is read-only where forkd runs.
        root = next(line.split() for line in Path(f"/proc/{pod.proc.pid}/mountinfo")
                    .read_text().splitlines() if line.split()[4] == "/")
        assert "ro" in root[5].split(","), root

        first = http_request(pod.port, "GET", "/session")
        assert first.status == 200, (first, pod.output())
        cookie = first.cookie()
        assert cookie is not None
        second = http_request(pod.port, "GET", "/session", headers={"Cookie": cookie})
        assert (second.status, second.json()["count"]) == (200, 2), pod.output()
    finally:
        pod.stop()
    assert not psutil.pid_exists(pod.proc.pid) or psutil.Process(pod.proc.pid).status() == (
        psutil.STATUS_ZOMBIE)


@pytest.mark.timeout(60)
def test_a_forkd_home_at_the_volumes_root_is_refused(
    workdir: Path, redis_server: RedisServer
) -> None:
    pod = Pod(workdir, redis_server.url, home_below_mount=False)
    try:
        code = pod.proc.wait(30)
    finally:
        pod.stop()
    assert code == 2, pod.output()
    assert "belongs to uid 0" in pod.output()
