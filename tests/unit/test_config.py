"""Configuration: parsing, validation and the precedence of flags, env and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkd.config import Bind, format_size, merge, parse_bind, parse_size, parse_toml
from forkd.errors import ConfigError
from forkd.http.loader import detect_interface
from forkd.process import cgroup_cpu_limit


@pytest.mark.parametrize("text, value", [
    ("512M", 512 << 20), ("1G", 1 << 30), ("1.5G", int(1.5 * (1 << 30))), ("64k", 64 << 10),
    ("1048576", 1 << 20), ("100MiB", 100 << 20), (4096, 4096)])
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "", "-5M", "0", "5X"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_rounds_to_a_unit() -> None:
    assert format_size(612 << 20) == "612M" and format_size(3 << 30) == "3G"


@pytest.mark.parametrize("text, bind", [
    ("127.0.0.1:8000", Bind("tcp", host="127.0.0.1", port=8000)),
    ("[::1]:0", Bind("tcp", host="::1", port=0)),
    (":9000", Bind("tcp", host="0.0.0.0", port=9000)),
    ("unix:/run/app.sock", Bind("unix", path="/run/app.sock")),
    ("fd://3", Bind("fd", fd=3)),
])
def test_parse_bind(text: str, bind: Bind) -> None:
    assert parse_bind(text) == bind
    assert str(parse_bind(text)) == (text if not text.startswith(":") else "0.0.0.0:9000")


@pytest.mark.parametrize("text", ["localhost", "::1:80", "host:http", "host:70000", "unix:",
                                  "fd://x", "[::1]80"])
def test_parse_bind_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bind(text)


def test_precedence_is_flag_then_env_then_file_then_default() -> None:
    file_values = {"workers": 3, "timeout": 7, "graceful_timeout": 9, "name": "file"}
    env = {"FORKD_WORKERS": "2", "FORKD_TIMEOUT": "5", "FORKD_HOME": "/x",
           "FORKD_WORKER_ID": "1"}
    config = merge("m:app", {"workers": "4"}, env, file_values)
    assert config.workers == 4  # flag
    assert config.timeout == 5.0  # env
    assert config.graceful_timeout == 9.0  # file
    assert config.name == "file"
    assert config.max_requests == 0  # default
    assert config.bind == ("127.0.0.1:8000",)


def test_env_lists_and_booleans() -> None:
    config = merge("m:app", {}, {"FORKD_BIND": "127.0.0.1:1,unix:/tmp/a.sock",
                                 "FORKD_PRELOAD": "yes"}, {})
    assert config.bind == ("127.0.0.1:1", "unix:/tmp/a.sock") and config.preload is True


@pytest.mark.parametrize("cli, env, file_values, needle", [
    ({"workers": "0"}, {}, {}, "--workers"),
    ({"workers": "999999"}, {}, {}, "--workers: 999999 is more than 1024"),
    ({}, {"FORKD_MIN_BODY_RATE": "-1"}, {}, "FORKD_MIN_BODY_RATE"),
    ({"wsgi_body_buffer": "0"}, {}, {}, "--wsgi-body-buffer"),
    ({}, {"FORKD_MAX_MEMORY": "huge"}, {}, "FORKD_MAX_MEMORY"),
    ({}, {}, {"memory_metric": "vss"}, "memory_metric"),
    ({}, {}, {"bind": "nope"}, "bind"),
    ({"max_requests_jitter": "5"}, {}, {}, "--max-requests-jitter"),
])
def test_bad_values_name_their_key(cli: dict, env: dict, file_values: dict, needle: str
                                   ) -> None:
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        merge("m:app", cli, env, file_values)


def test_toml_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown key 'max_memmory'"):
        parse_toml('max_memmory = "1G"\n', "forkd.toml")
    assert parse_toml('max_memory = "1G"\nbind = ["127.0.0.1:1"]\n', "f")["bind"] == [
        "127.0.0.1:1"]


def test_app_is_required() -> None:
    with pytest.raises(ConfigError, match="APP is missing"):
        merge(None, {}, {}, {})


def test_cgroup_quota_is_found_along_the_path(tmp_path: Path) -> None:
    leaf = tmp_path / "system.slice" / "app.service"
    leaf.mkdir(parents=True)
    (tmp_path / "system.slice" / "cpu.max").write_text("150000 100000\n")
    (leaf / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit("0::/system.slice/app.service\n", tmp_path) == 1.5
    assert cgroup_cpu_limit("0::/\n", tmp_path) is None
    assert cgroup_cpu_limit("1:cpu:/x\n", tmp_path) is None


def test_interface_detection() -> None:
    async def asgi(scope, receive, send): ...  # noqa: ANN001

    def wsgi(environ, start_response): ...  # noqa: ANN001

    class AsgiObject:
        async def __call__(self, scope, receive, send): ...  # noqa: ANN001

    class WsgiObject:
        def __call__(self, environ, start_response): ...  # noqa: ANN001

    assert detect_interface(asgi) == "asgi" and detect_interface(AsgiObject()) == "asgi"
    assert detect_interface(wsgi) == "wsgi" and detect_interface(WsgiObject()) == "wsgi"


def test_interface_detection_ignores_optional_parameters() -> None:
    def wsgi(environ, start_response, extra=None): ...  # noqa: ANN001

    assert detect_interface(wsgi) == "wsgi"


def test_a_missing_dependency_is_not_reported_as_a_missing_app(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    from forkd.errors import AppLoadError
    from forkd.http.loader import import_app

    (tmp_path / "appx_needs_dep.py").write_text("import no_such_dependency_xyz\napp = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        import_app("appx_needs_dep:app")
    with pytest.raises(AppLoadError, match="no module named 'no_such_app_xyz'"):
        import_app("no_such_app_xyz:app")


def test_chdir_defaults_to_the_directory_as_the_shell_names_it(tmp_path, monkeypatch) -> None:
    from forkd.cli import working_directory

    release = tmp_path / "releases" / "1"
    release.mkdir(parents=True)
    current = tmp_path / "current"
    current.symlink_to(release)
    monkeypatch.chdir(current)  # the kernel reports the resolved directory ...
    assert working_directory(None, {"PWD": str(current)}) == str(current)  # ... $PWD the path
    # a stale or foreign $PWD is not believed
    assert working_directory(None, {"PWD": str(tmp_path)}) == str(release.resolve())
    assert working_directory(None, {}) == str(release.resolve())
    # an explicit --chdir is kept as typed, relative ones made absolute from there
    assert working_directory("/srv/app/current", {}) == "/srv/app/current"
    assert working_directory("../current", {"PWD": str(current)}) == str(tmp_path / "current")
