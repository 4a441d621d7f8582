"""forkd.units: the unit text `forkd systemd-unit` prints, and its agreement
with the shipped template."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkd.errors import ConfigError
from forkd.units import (
    HARDENING,
    SERVICE_BEHAVIOUR,
    quote_exec_arg,
    render_service,
    render_socket,
    timeout_stop_sec,
    unit_name,
)

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "systemd" / "forkd@.service"
SOCKET_TEMPLATE = REPO / "systemd" / "forkd@.socket"
APP = "sample_app.asgi:app"


def settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting line, in order; comments skipped."""
    section = ""
    found = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key, value))
    return found


def values(text: str, section: str, key: str) -> list[str]:
    return [v for s, k, v in settings(text) if s == section and k == key]


def test_exec_start_runs_the_app_with_the_options_in_order() -> None:
    text = render_service(
        APP,
        {"bind": ["127.0.0.1:8000", "[::1]:8000"], "workers": "4", "max-memory": "512M",
         "preload": True, "access_log": False},
    )
    assert values(text, "Service", "ExecStart") == [
        "/usr/local/bin/forkd start sample_app.asgi:app --name sample_app"
        " --bind 127.0.0.1:8000 --bind [::1]:8000 --workers 4 --max-memory 512M --preload"
        " --no-access-log"
    ]
    assert values(text, "Service", "ExecReload") == ["/usr/local/bin/forkd reload sample_app"]


def test_name_user_paths_and_runtime_directory() -> None:
    text = render_service(
        APP, {"name": "shop"}, user="www", exec_path="/opt/shop/venv/bin/forkd",
        working_directory="/srv/shop",
    )
    assert unit_name(APP, {"name": "shop"}) == "forkd-shop"
    assert values(text, "Service", "User") == ["www"]
    assert values(text, "Service", "WorkingDirectory") == ["/srv/shop"]
    assert values(text, "Service", "RuntimeDirectory") == ["forkd-shop"]
    assert "FORKD_HOME=%t/forkd-shop" in values(text, "Service", "Environment")
    assert values(text, "Service", "EnvironmentFile") == ["-/etc/forkd/shop.env"]
    assert values(text, "Service", "ExecStart") == [
        "/opt/shop/venv/bin/forkd start sample_app.asgi:app --name shop --chdir /srv/shop"]
    assert values(text, "Service", "ExecReload") == ["/opt/shop/venv/bin/forkd reload shop"]
    assert values(text, "Service", "ProtectHome") == ["yes"]
    assert values(text, "Install", "WantedBy") == ["multi-user.target"]


@pytest.mark.parametrize(
    ("graceful", "expected"), [(None, 45), ("30", 45), ("60", 75), ("12.5", 28), ("0.1", 16)]
)
def test_timeout_stop_sec_is_above_the_graceful_timeout(graceful: str | None,
                                                        expected: int) -> None:
    options = {} if graceful is None else {"graceful_timeout": graceful}
    text = render_service(APP, options)
    assert values(text, "Service", "TimeoutStopSec") == [str(expected)]
    if graceful is not None:
        assert expected > float(graceful) and timeout_stop_sec(float(graceful)) == expected


def test_timeout_stop_sec_leaves_room_for_the_drain_delay_too() -> None:
    text = render_service(APP, {"graceful_timeout": "30", "drain_delay": "5"})
    assert values(text, "Service", "TimeoutStopSec") == ["50"]
    assert "--drain-delay 5" in values(text, "Service", "ExecStart")[0]


def test_start_timeout_follows_the_startup_timeout() -> None:
    assert values(render_service(APP, {}), "Service", "TimeoutStartSec") == ["90"]
    text = render_service(APP, {"startup-timeout": "120"})
    assert values(text, "Service", "TimeoutStartSec") == ["150"]


def test_rendered_unit_has_the_behaviour_and_hardening_lines() -> None:
    lines = render_service(APP, {}).splitlines()
    for line in SERVICE_BEHAVIOUR + HARDENING:
        assert line in lines


def test_shipped_template_has_the_same_behaviour_and_hardening() -> None:
    lines = TEMPLATE.read_text().splitlines()
    missing = [line for line in SERVICE_BEHAVIOUR + HARDENING if line not in lines]
    assert missing == []
    assert "ProtectHome=yes" in lines


def test_shipped_template_contract() -> None:
    text = TEMPLATE.read_text()
    assert values(text, "Service", "Type") == ["notify"]
    assert values(text, "Service", "ExecStart") == [
        "/usr/local/bin/forkd start --name %i ${FORKD_APP}"]
    assert values(text, "Service", "ExecReload") == ["/usr/local/bin/forkd reload %i"]
    assert values(text, "Service", "EnvironmentFile") == ["/etc/forkd/%i.env"]
    assert values(text, "Service", "RuntimeDirectory") == ["forkd-%i"]
    assert "FORKD_HOME=%t/forkd-%i" in values(text, "Service", "Environment")
    assert values(text, "Service", "KillMode") == ["mixed"]
    # forkd upgrade: the new primary says MAINPID=; the listeners live in the fd store
    assert values(text, "Service", "NotifyAccess") == ["all"]
    assert int(values(text, "Service", "FileDescriptorStoreMax")[0]) >= 8
    assert values(text, "Service", "Restart") == ["on-failure"]
    assert values(text, "Service", "User") == ["forkd"]
    # The default graceful timeout (30 s) with its margin.
    assert values(text, "Service", "TimeoutStopSec") == [str(timeout_stop_sec(30.0))]
    # The ZeroMQ control socket is AF_UNIX: `forkd reload` needs it.
    assert "AF_UNIX" in values(text, "Service", "RestrictAddressFamilies")[0].split()


def test_shipped_socket_template_feeds_the_service() -> None:
    text = SOCKET_TEMPLATE.read_text()
    assert values(text, "Socket", "Service") == ["forkd@%i.service"]
    assert values(text, "Socket", "FileDescriptorName") == ["%i"]
    assert values(text, "Socket", "ListenStream")


def test_code_under_a_home_directory_stays_readable() -> None:
    text = render_service(APP, {}, exec_path="/home/ann/.venv/bin/forkd",
                          working_directory="/home/ann/shop")
    assert values(text, "Service", "ProtectHome") == ["read-only"]


def test_socket_activated_service_leaves_binding_to_the_socket_unit() -> None:
    options = {"name": "web", "bind": ["127.0.0.1:8080", "unix:/run/web.sock"], "workers": 2}
    service = render_service(APP, options, socket_activated=True)
    assert "--bind" not in values(service, "Service", "ExecStart")[0]
    assert "forkd-web.socket" in values(service, "Unit", "Requires")
    assert "forkd-web.socket" in values(service, "Unit", "After")
    socket_text = render_socket(APP, options)
    assert values(socket_text, "Socket", "ListenStream") == ["127.0.0.1:8080", "/run/web.sock"]
    assert values(socket_text, "Socket", "Service") == ["forkd-web.service"]
    assert values(socket_text, "Socket", "FileDescriptorName") == ["web"]
    assert values(socket_text, "Socket", "SocketMode") == ["0660"]


@pytest.mark.parametrize(("bind", "message"),
                         [("fd://3", "inherited fd"), ("localhost:8000", "IP address")])
def test_socket_unit_refuses_what_systemd_cannot_listen_on(bind: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        render_socket(APP, {"bind": [bind]})


def test_unix_listener_directory_is_writable() -> None:
    """ProtectSystem=strict makes /run read-only; the socket's directory is opened up."""
    options = {"bind": ["unix:/run/shop/http.sock", "unix:/run/shop/admin.sock", "[::1]:80"]}
    text = render_service(APP, options)
    assert values(text, "Service", "ReadWritePaths") == ["-/run/shop"]
    activated = render_service(APP, options, socket_activated=True)
    assert values(activated, "Service", "ReadWritePaths") == []


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("sample_app.asgi:app", "sample_app.asgi:app"),
        ("/srv/my app", '"/srv/my app"'),
        ("$HOME", '"$$HOME"'),
        ("50%", "50%%"),
        ('say "hi"', '"say \\"hi\\""'),
        ("a\\b", '"a\\\\b"'),
        ("", '""'),
        (";", '";"'),
    ],
)
def test_quote_exec_arg(arg: str, expected: str) -> None:
    assert quote_exec_arg(arg) == expected


def test_arguments_are_quoted_in_exec_start() -> None:
    text = render_service(APP, {"root_path": "/my app$x"})
    assert values(text, "Service", "ExecStart")[0].endswith('--root-path "/my app$$x"')


@pytest.mark.parametrize(
    ("options", "kwargs", "message"),
    [
        ({"colour": "blue"}, {}, "colour"),
        ({"workers": "many"}, {}, "workers"),
        ({"max_memory": "lots"}, {}, "max-memory"),
        ({"name": "../etc"}, {}, "--name"),
        ({}, {"exec_path": "forkd"}, "absolute"),
        ({}, {"working_directory": "srv/app"}, "absolute"),
        ({}, {"user": "bad user"}, "user"),
        ({"root_path": "a\nb"}, {}, "control characters"),
    ],
)
def test_bad_input_is_refused_with_the_culprit_named(
    options: dict[str, str], kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        render_service(APP, options, **kwargs)  # type: ignore[arg-type]


def test_an_explicit_chdir_is_kept_and_not_repeated() -> None:
    text = render_service(APP, {"name": "shop", "chdir": "/srv/shop/current"},
                          working_directory="/srv/shop/current")
    (exec_start,) = values(text, "Service", "ExecStart")
    assert exec_start.count("--chdir") == 1
    assert exec_start.endswith("--chdir /srv/shop/current")
