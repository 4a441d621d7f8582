"""Pure: the text of systemd units for one forkd app (`forkd systemd-unit`).

The shipped template `systemd/forkd@.service` and a rendered unit share the lines
below (SERVICE_BEHAVIOUR and HARDENING); the tests check that the template holds
every one of them, so the two cannot drift apart.

A rendered unit is meant to be saved as `/etc/systemd/system/forkd-NAME.service`
(and, with socket activation, `forkd-NAME.socket` from render_socket).
"""

from __future__ import annotations

import ipaddress
import math
import os.path
import re
from collections.abc import Mapping, Sequence

from forkd.config import OPTION_NAMES, Config, default_name, merge, option_flag
from forkd.errors import ConfigError

# A bool (an int to the type checker) gives --flag when True, --no-flag when False.
OptionValue = str | int | float | Sequence[str]

# TimeoutStopSec = drain delay + graceful timeout + this: after the drain deadline the
# primary still has to SIGKILL stragglers, reap them and exit before systemd's SIGKILL.
STOP_MARGIN_SECONDS = 15
# TimeoutStartSec (which also bounds ExecReload=) = startup timeout + this, for the
# import of the app and the fork of every worker before the slowest one is ready.
START_MARGIN_SECONDS = 30
WATCHDOG_SECONDS = 30
FD_STORE_MAX = 16

# How the service runs: the behaviour forkd relies on.
SERVICE_BEHAVIOUR: tuple[str, ...] = (
    "Type=notify",
    # `forkd upgrade` starts a new primary that then tells systemd MAINPID=itself: only
    # "all" lets a process other than the main one say so. Workers never see
    # NOTIFY_SOCKET (the primary removes it from their environment).
    "NotifyAccess=all",
    # the listeners, kept by systemd across restarts (FDSTORE=1): no closed port even
    # on `systemctl restart`; a few more than any bind list needs
    f"FileDescriptorStoreMax={FD_STORE_MAX}",
    # SIGTERM to the primary alone: it drains the workers itself. SIGKILL to all at the deadline.
    "KillMode=mixed",
    "Restart=on-failure",
    "RestartSec=2",
    # The kernel OOM-killing one worker is the primary's to handle (it respawns the slot);
    # the default policy would stop the whole service.
    "OOMPolicy=continue",
    f"WatchdogSec={WATCHDOG_SECONDS}",
    "LimitNOFILE=65536",
    "Environment=PYTHONUNBUFFERED=1",
)

# The sandbox. forkd needs: TCP/UDP and unix sockets (the listeners and the ZeroMQ
# ipc control socket in FORKD_HOME), /proc/PID of its own workers and /proc/stat
# (psutil; hence no ProcSubset=pid), fork, signals. Nothing else.
HARDENING: tuple[str, ...] = (
    "NoNewPrivileges=yes",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "PrivateUsers=yes",
    "PrivateMounts=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "ProtectProc=invisible",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    # Turn off for apps that generate machine code at run time (a JIT).
    "MemoryDenyWriteExecute=yes",
    "RemoveIPC=yes",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged",
    "SystemCallErrorNumber=EPERM",
    "UMask=0077",
)

# Code under these is hidden by ProtectHome=yes; a unit for it gets read-only instead.
_HOME_PREFIXES = ("/home/", "/root/", "/run/user/")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*\$?$")
_SAFE_ARG_RE = re.compile(r"^[][A-Za-z0-9_@%+=:,./-]+$")


def unit_name(app: str, options: Mapping[str, OptionValue]) -> str:
    """`forkd-NAME`: the base name of the .service (and .socket) files."""
    return "forkd-" + _app_name(app, _normalise(options))


def timeout_stop_sec(graceful_timeout: float, drain_delay: float = 0.0) -> int:
    """A graceful stop serves on for --drain-delay, then drains for --graceful-timeout."""
    return math.ceil(drain_delay + graceful_timeout) + STOP_MARGIN_SECONDS


def timeout_start_sec(startup_timeout: float) -> int:
    return math.ceil(startup_timeout) + START_MARGIN_SECONDS


def quote_exec_arg(arg: str) -> str:
    """One ExecStart= word that systemd reads back as exactly `arg`.

    `$` and `%` are doubled so systemd neither expands a variable nor a specifier;
    quotes and backslashes are C-escaped inside double quotes."""
    if any(ord(char) < 0x20 or char == "\x7f" for char in arg):
        raise ConfigError(f"{arg!r}: control characters cannot go into a unit file")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _SAFE_ARG_RE.match(arg):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def render_service(
    app: str,
    options: Mapping[str, OptionValue],
    *,
    user: str = "forkd",
    exec_path: str = "/usr/local/bin/forkd",
    working_directory: str | None = None,
    socket_activated: bool = False,
) -> str:
    """A complete `forkd-NAME.service` running `forkd start APP` with `options`.

    `options` holds `forkd start` options by name (`graceful_timeout` or
    `graceful-timeout`), as typed: a list repeats the flag, True gives `--preload`,
    False `--no-preload`; options left out are left to forkd's defaults. With
    `socket_activated`, the binds go to the .socket unit (render_socket) instead
    of the command line."""
    normalised = _normalise(options)
    config = _validated(app, normalised)
    name = _app_name(app, normalised)
    if not exec_path.startswith("/"):
        raise ConfigError(f"exec path {exec_path!r}: systemd needs an absolute path")
    if not _USER_RE.match(user):
        raise ConfigError(f"user {user!r} is not a user name")
    if working_directory is not None and not working_directory.startswith("/"):
        raise ConfigError(f"working directory {working_directory!r} is not an absolute path")

    start_args = [exec_path, "start", app, "--name", name]
    for key, value in normalised.items():
        if key == "name" or (socket_activated and key == "bind"):
            continue
        start_args += _flag_args(key, value)
    if working_directory and "chdir" not in normalised:
        # systemd sets no $PWD: without --chdir, forkd would resolve a `current` symlink
        # once at start and every reload would serve the release it found then
        start_args += ["--chdir", working_directory]
    paths = [exec_path] + ([working_directory] if working_directory else [])
    hidden_home = any(path.startswith(_HOME_PREFIXES) for path in paths)

    unit = [
        "[Unit]",
        f"Description=forkd {name} ({_setting_value(app)})",
        "After=network-online.target",
        "Wants=network-online.target",
    ]
    if socket_activated:
        unit += [f"Requires=forkd-{name}.socket", f"After=forkd-{name}.socket"]
    service = [
        "",
        "[Service]",
        *SERVICE_BEHAVIOUR,
        f"User={user}",
        f"RuntimeDirectory=forkd-{name}",
        "RuntimeDirectoryMode=0700",
        f"Environment=FORKD_HOME=%t/forkd-{name}",
        # Optional: the app's own settings and secrets (REDIS_URL=...), kept out of the unit.
        f"EnvironmentFile=-/etc/forkd/{name}.env",
    ]
    if working_directory:
        service.append("WorkingDirectory=" + _setting_value(working_directory))
    if not socket_activated:
        # ProtectSystem=strict leaves only FORKD_HOME writable: a unix: listener elsewhere
        # needs its directory opened ("-": a missing one fails at bind, with its name).
        for directory in dict.fromkeys(os.path.dirname(b.path) for b in config.binds
                                       if b.kind == "unix"):
            service.append("ReadWritePaths=-" + _setting_value(directory))
    service += [
        "ExecStart=" + " ".join(quote_exec_arg(arg) for arg in start_args),
        "ExecReload=" + " ".join(quote_exec_arg(a) for a in (exec_path, "reload", name)),
        f"TimeoutStartSec={timeout_start_sec(config.startup_timeout)}",
        f"TimeoutStopSec={timeout_stop_sec(config.graceful_timeout, config.drain_delay)}",
        "",
        *HARDENING,
    ]
    # ProtectHome=yes would make code under a home directory unreachable (exit 203/EXEC).
    service.append("ProtectHome=read-only" if hidden_home else "ProtectHome=yes")
    install = ["", "[Install]", "WantedBy=multi-user.target"]
    header = [
        f"# forkd-{name}.service: written by `forkd systemd-unit`.",
        f"# Save as /etc/systemd/system/forkd-{name}.service, then",
        f"#   systemctl daemon-reload && systemctl enable --now forkd-{name}",
        "",
    ]
    return "\n".join(header + unit + service + install) + "\n"


def render_socket(app: str, options: Mapping[str, OptionValue]) -> str:
    """`forkd-NAME.socket`: systemd binds the `bind` addresses and passes them in."""
    normalised = _normalise(options)
    config = _validated(app, normalised)
    name = _app_name(app, normalised)
    listens = []
    for bind in config.binds:
        if bind.kind == "fd":
            raise ConfigError(f"--bind {bind}: a socket unit cannot listen on an inherited fd")
        if bind.kind == "unix":
            listens.append("ListenStream=" + _setting_value(bind.path))
            continue
        try:
            ipaddress.ip_address(bind.host)
        except ValueError:
            raise ConfigError(f"--bind {bind}: a socket unit takes an IP address, "
                              "not a host name") from None
        listens.append(f"ListenStream={bind}")
    lines = [
        f"# forkd-{name}.socket: written by `forkd systemd-unit --socket`.",
        f"# Save beside forkd-{name}.service, then systemctl enable --now forkd-{name}.socket",
        "",
        "[Unit]",
        f"Description=forkd {name} listeners",
        "",
        "[Socket]",
        *listens,
        f"FileDescriptorName={name}",
        f"Service=forkd-{name}.service",
        f"Backlog={config.backlog}",
    ]
    if any(bind.kind == "unix" for bind in config.binds):
        lines.append(f"SocketMode={config.unix_mode:04o}")
    lines += ["", "[Install]", "WantedBy=sockets.target"]
    return "\n".join(lines) + "\n"


def _normalise(options: Mapping[str, OptionValue]) -> dict[str, OptionValue]:
    normalised: dict[str, OptionValue] = {}
    for key, value in options.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in OPTION_NAMES:
            raise ConfigError(f"unknown option {key!r}")
        normalised[name] = value
    return normalised


def _validated(app: str, options: Mapping[str, OptionValue]) -> Config:
    """Every value checked as `forkd start` would check it, so a unit never
    carries an option that makes the service fail at its first start."""
    return merge(app, options, env={}, file_values={}, file_path="forkd systemd-unit")


def _app_name(app: str, options: Mapping[str, OptionValue]) -> str:
    name = options.get("name") or default_name(app)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"--name {name!r}: a unit name takes letters, digits, '_', '.' and '-' only")
    return name


def _flag_args(key: str, value: OptionValue) -> list[str]:
    flag = option_flag(key)
    if isinstance(value, bool):
        # Explicit either way: the unit's optional env file may set FORKD_<FLAG> too.
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, str | int | float):
        return [flag, str(value)]
    args: list[str] = []
    for item in value:
        args += [flag, item]
    return args


def _setting_value(text: str) -> str:
    """Text for a unit setting that expands specifiers: `%` doubles."""
    if any(ord(char) < 0x20 for char in text):
        raise ConfigError(f"{text!r}: control characters cannot go into a unit file")
    return text.replace("%", "%%")

