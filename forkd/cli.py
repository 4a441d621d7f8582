"""The `forkd` command: parse, call, print. No decisions live here."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from forkd import __version__
from forkd.config import OPTIONS, Config, default_name, merge, option_flag, parse_toml
from forkd.errors import AppLoadError, BindError, ConfigError, ControlError

EXIT_FAILED = 1
EXIT_USAGE = 2

_FLAGS = {"preload", "access_log", "proxy_protocol", "ws_per_message_deflate"}
_SHORT = {"bind": "-b", "workers": "-w"}


def _start_options(func: Any) -> Any:
    """Every start option from config.OPTIONS, each defaulting to None so that only
    what was typed counts as 'given on the command line'."""
    for option in reversed(OPTIONS):
        names = [_SHORT[option.name]] if option.name in _SHORT else []
        names.append(option_flag(option.name))
        if option.name in _FLAGS:
            flag = option_flag(option.name)
            func = click.option(f"{flag}/--no-{flag[2:]}", option.name, default=None,
                                help=option.help)(func)
        elif option.name == "bind":
            func = click.option(*names, option.name, multiple=True, metavar="ADDR",
                                help=option.help + " (repeatable)")(func)
        else:
            func = click.option(*names, option.name, default=None, type=str,
                                help=option.help)(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="forkd")
def cli() -> None:
    """forkd: a pre-fork process manager for Python WSGI and ASGI apps."""


@cli.command(context_settings={"show_default": False})
@click.argument("app", required=False)
@_start_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file of the same options (default: ./forkd.toml if present)")
def start(app: str | None, config_file: str | None, **given: Any) -> None:
    """Run APP (module:attr or module:factory()) under a primary in the foreground.

    \b
    Example:
      forkd start sample_app.asgi:app -b 127.0.0.1:8000 -w 4 --max-memory 512M
    """
    from forkd.log import setup

    setup("forkd")
    given = {k: (list(v) if k == "bind" else v) for k, v in given.items()
             if v is not None and v != ()}
    try:
        config = load_config(app, given, config_file, os.environ)
    except ConfigError as exc:
        _fail(f"error: {exc}", EXIT_USAGE)
    config = config.replace(chdir=working_directory(config.chdir, os.environ))
    if config.certfile is not None:
        from forkd.tls import TLSConfigError, server_context

        try:  # each worker loads the files again at its start; this only fails fast
            server_context(config)
        except TLSConfigError as exc:
            _fail(f"error: {exc}", EXIT_USAGE)
    # `forkd upgrade` starts the next primary with these same words, from here
    sys.exit(run_start(config, argv=sys.argv[1:],
                       start_dir=working_directory(None, os.environ)))


def working_directory(chdir: str | None, env: Any) -> str:
    """--chdir as an absolute path, kept as typed (a `current` symlink stays one). The
    default is the directory forkd start ran in as the shell names it: $PWD, when
    that names the same directory as the resolved one the kernel reports."""
    here = os.getcwd()
    logical = env.get("PWD")
    if logical and os.path.isabs(logical):
        try:
            if os.path.samefile(logical, here):
                here = logical
        except OSError:
            pass
    if not chdir:
        return here
    return os.path.normpath(os.path.join(here, chdir))


def load_config(app: str | None, given: dict[str, Any], config_file: str | None,
                env: Any) -> Config:
    path = config_file or env.get("FORKD_CONFIG")
    if path is None and Path("forkd.toml").is_file():
        path = "forkd.toml"
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
        file_values = parse_toml(text, path)
    return merge(app, given, env, file_values, path or "forkd.toml")


def open_control(config: Config, name: str) -> Any:
    """The primary's control server (ConfigError, ControlError when it cannot be had)."""
    from forkd import control

    home = control.default_home(os.environ)
    endpoint = config.control or control.endpoint_for(home, name)
    if endpoint.startswith("ipc://"):
        control.ensure_home(home)
    keys = control.load_curve_keys(config.control_keys) if config.control_keys else None
    return control.ControlServer(
        endpoint, curve_secret_key=keys.secret if keys else None,
        curve_public_key=keys.public if keys else None)


def run_start(config: Config, argv: list[str] | None = None, start_dir: str | None = None
              ) -> int:
    from forkd import handoff

    # Started by `forkd upgrade`: the old primary waits on the other end of this.
    predecessor = handoff.Predecessor.from_env(os.environ)
    code, error = _run_start(config, argv or [], start_dir or os.getcwd(), predecessor)
    if predecessor is not None and code != 0:
        predecessor.failed(error or f"the new primary exited with code {code}")
    return code


def _fail_start(message: str, code: int) -> tuple[int, str]:
    click.echo(f"forkd: error: {message}", err=True)
    return code, message


def _run_start(config: Config, argv: list[str], start_dir: str,
               predecessor: Any) -> tuple[int, str]:
    """(exit code, why it failed before the primary ran)."""
    from forkd import handoff, process, systemd
    from forkd.primary import Primary, PrimaryOptions
    from forkd.sockets import Listener, adopt_fd, open_listeners

    name = config.name or default_name(config.app)
    try:  # first: a bad --log-file fails the start before anything is bound
        logs = open_logs(config, name)
    except OSError as exc:
        return _fail_start(f"--log-file {config.log_file}: {exc.strerror}", EXIT_FAILED)
    server = None
    if predecessor is None:  # (else taken over once the old primary lets go of it)
        try:
            server = open_control(config, name)
        except ConfigError as exc:
            return _fail_start(str(exc), EXIT_USAGE)
        except ControlError as exc:
            from forkd.protocol import USAGE_CODES

            return _fail_start(exc.message,
                               EXIT_USAGE if exc.code in USAGE_CODES else EXIT_FAILED)
    handed = handoff.inherited_listeners(os.environ)
    inherited = systemd.listen_fds(os.environ, os.getpid())
    systemd.clear_listen_env(os.environ)
    if handed == []:
        if server is not None:
            server.close()
        return _fail_start("the listeners the old primary handed over are unreadable",
                           EXIT_FAILED)
    try:
        if handed is not None:  # an upgrade: the old primary's sockets, under their labels
            listeners = [Listener(adopt_fd(fd, config.backlog, label), label)
                         for fd, label in handed]
        else:
            listeners = open_listeners(config.binds, config.backlog, config.unix_mode,
                                       inherited)
    except BindError as exc:
        if server is not None:
            server.close()
        return _fail_start(str(exc), EXIT_FAILED)
    from forkd.metrics.shell import prepare_app_dir

    # before anything imports prometheus_client (the exporter, a --preload'ed app)
    metrics_dir = prepare_app_dir(config.metrics, name, os.environ)
    app_object = None
    interface = None if config.interface == "auto" else config.interface
    if config.preload:
        from forkd.http.loader import detect_interface, enter_directory, import_app
        from forkd.log import guard

        try:
            enter_directory(config.chdir)  # the primary imports the app: from there
            app_object = import_app(config.app)
        except AppLoadError as exc:
            if server is not None:
                server.close()
            return _fail_start(str(exc), EXIT_FAILED)
        except BaseException:
            text = traceback.format_exc()
            sys.stderr.write(text)
            if server is not None:
                server.close()
            return _fail_start(f"cannot import {config.app}:\n{text.rstrip()}", EXIT_FAILED)
        guard()  # the app may have reconfigured logging on import
        interface = interface or detect_interface(app_object)
    workers = config.workers or process.usable_cpus()
    if config.autoscale is not None:  # start inside the bounds: at MIN unless -w says more
        low, high = config.autoscale
        workers = min(max(config.workers or low, low), high)
    options = PrimaryOptions(config=config, name=name, listeners=listeners, workers=workers,
                             control=server, app=app_object, interface=interface,
                             metrics_dir=metrics_dir,
                             argv=argv, start_dir=start_dir, predecessor=predecessor,
                             open_control=lambda: open_control(config, name), logs=logs)
    return Primary(options).run(), ""


def open_logs(config: Config, name: str) -> Any:
    """The primary's log hub, its output opened now so that a bad --log-file fails the
    start instead of the first line."""
    from forkd.logs.hub import LogHub
    from forkd.logs.writer import LogWriter

    writer = LogWriter(config.log_file, max_size=config.log_max_size, keep=config.log_keep)
    return LogHub(writer, fmt=config.log_format, app_name=name)


_control_option = click.option(
    "--control", "endpoint", envvar="FORKD_CONTROL", default=None, metavar="ENDPOINT",
    help="the primary's control endpoint, when it was started with --control")


@cli.command()
@click.argument("name", required=False)
@click.option("--once", is_flag=True, help="print one frame and exit (for scripts and pipes)")
@_control_option
def monit(name: str | None, once: bool, endpoint: str | None) -> None:
    """A live view of every worker (CPU, memory, req/s, p50/p99, state, restarts),
    refreshed every second; q quits.

    \b
    Example:
      forkd monit sample_app
    """
    from forkd import monit as view

    sys.exit(view.run(name, _home(), endpoint, once))


@cli.command()
@click.argument("name", required=False)
@click.option("--timeout", type=float, default=None,
              help="seconds to wait for the whole reload (default: an hour)")
@click.option("--control", "endpoints", envvar="FORKD_CONTROL", multiple=True,
              metavar="ENDPOINT",
              help="the primary's control endpoint, when it was started with --control; "
                   "repeat it to reload several primaries (hosts) one after another")
def reload(name: str | None, timeout: float | None, endpoints: tuple[str, ...]) -> None:
    """Replace every worker with a fresh one, one slot at a time, with no dropped request.

    With several --control endpoints the primaries are reloaded in the order given; the
    first that fails stops the sequence (exit 1, naming it) and the rest are left as they
    were.

    \b
    Examples:
      forkd reload sample_app
      FORKD_CONTROL_KEYS=/etc/forkd/keys/forkd.key_secret forkd reload \\
          --control tcp://10.0.0.11:7000 --control tcp://10.0.0.12:7000
    """
    from forkd import ctl

    limit = ctl.LONG_TIMEOUT if timeout is None else timeout
    if len(endpoints) > 1:
        if name is not None:
            _fail("error: reload takes NAME or several --control endpoints, not both",
                  EXIT_USAGE)
        sys.exit(ctl.reload_fleet(list(endpoints), timeout=limit))
    sys.exit(ctl.reload(name, _home(), endpoint=endpoints[0] if endpoints else None,
                        timeout=limit))


@cli.command()
@click.argument("name", required=False)
@click.option("--timeout", type=float, default=None,
              help="seconds to wait for the whole upgrade (default: an hour)")
@_control_option
def upgrade(name: str | None, timeout: float | None, endpoint: str | None) -> None:
    """Replace the primary itself (new forkd, Python or --preload'ed app) without closing
    a listening socket: a new primary with the same options takes the listeners, its
    workers become ready, then the old primary drains its workers and exits.

    \b
    Example:
      forkd upgrade sample_app
    """
    from forkd import ctl

    sys.exit(ctl.upgrade(name, _home(), endpoint=endpoint,
                         timeout=ctl.LONG_TIMEOUT if timeout is None else timeout))


@cli.command()
@click.argument("name", required=False)
@click.option("--now", "immediate", is_flag=True, help="stop at once, without draining")
@_control_option
def stop(name: str | None, immediate: bool, endpoint: str | None) -> None:
    """Stop the primary: in-flight requests finish, then it exits 0.

    \b
    Example:
      forkd stop sample_app
    """
    from forkd import ctl

    sys.exit(ctl.stop(name, _home(), graceful=not immediate, endpoint=endpoint))


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="print the status document as JSON")
@_control_option
def status(name: str | None, as_json: bool, endpoint: str | None) -> None:
    """One row per worker: slot, pid, state, uptime, restarts, memory, requests.

    \b
    Example:
      forkd status sample_app --json
    """
    from forkd import ctl

    sys.exit(ctl.status(name, _home(), as_json=as_json, endpoint=endpoint))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("words", nargs=-1, type=click.UNPROCESSED, metavar="[NAME] N|+N|-N")
@_control_option
def scale(words: tuple[str, ...], endpoint: str | None) -> None:
    """Set the number of workers: new ones start ready-gated, removed ones drain.

    \b
    Examples:
      forkd scale web 8
      forkd scale web -2
    """
    from forkd import ctl

    if len(words) == 1:
        name, count = None, words[0]
    elif len(words) == 2:
        name, count = words
    else:
        _fail("error: scale takes [NAME] N|+N|-N", EXIT_USAGE)
    sys.exit(ctl.scale(name, _home(), count, endpoint=endpoint))


@cli.command()
@click.argument("name", required=False)
@click.option("-f", "--follow", is_flag=True, help="then print new lines as they come")
@click.option("-n", "--lines", "count", type=click.IntRange(0, 100_000), default=50,
              show_default=True, help="how many of the latest lines")
@click.option("--worker", "slot", type=click.IntRange(0), default=None, metavar="SLOT",
              help="only this worker's lines (its slot)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@_control_option
def logs(name: str | None, follow: bool, count: int, slot: int | None, as_json: bool,
         endpoint: str | None) -> None:
    """The latest lines of the primary and its workers (their output, forkd's events and
    the access log), from the primary's memory; -f follows until interrupted.

    \b
    Examples:
      forkd logs sample_app -n 200
      forkd logs -f --worker 0 --json
    """
    from forkd import ctl

    sys.exit(ctl.logs(name, _home(), count=count, follow=follow, slot=slot,
                      as_json=as_json, endpoint=endpoint))


@cli.command(name="systemd-unit")
@click.argument("app")
@_start_options
@click.option("--user", default="forkd", show_default=True, help="the unit's User=")
@click.option("--exec-path", default=None,
              help="absolute path of the forkd command (default: this forkd)")
@click.option("--working-directory", "given_directory", default=None,
              help="the app's directory, also passed as --chdir (default: the current "
                   "directory, as the shell names it)")
@click.option("--socket", "socket_activated", is_flag=True,
              help="also print a .socket unit: systemd binds, forkd inherits")
def systemd_unit(app: str, user: str, exec_path: str | None, given_directory: str | None,
                 socket_activated: bool, **given: Any) -> None:
    """Print a systemd service unit (Type=notify, hardened) that runs APP with these options.

    \b
    Example:
      forkd systemd-unit sample_app.asgi:app -w 4 --max-memory 512M > forkd-sample_app.service
    """
    import shutil

    from forkd.units import render_service, render_socket

    options = {k: (list(v) if k == "bind" else v) for k, v in given.items()
               if v is not None and v != ()}
    beside_python = Path(sys.executable).parent / "forkd"
    exec_path = exec_path or (str(beside_python) if beside_python.is_file() else None) \
        or shutil.which("forkd") or "/usr/local/bin/forkd"
    try:
        text = render_service(app, options, user=user, exec_path=exec_path,
                              working_directory=working_directory(
                                  given_directory or given.get("chdir"), os.environ),
                              socket_activated=socket_activated)
        if socket_activated:
            text += "\n" + render_socket(app, options)
    except ConfigError as exc:
        _fail(f"error: {exc}", EXIT_USAGE)
    click.echo(text, nl=False)


@cli.command(name="control-keys")
@click.argument("directory", type=click.Path(file_okay=False))
def control_keys(directory: str) -> None:
    """Create the CURVE key pair a tcp:// control endpoint needs.

    The primary gets --control-keys DIRECTORY/forkd.key_secret; every client
    (reload, status, ...) the same file in FORKD_CONTROL_KEYS. Keep it secret.

    \b
    Example:
      forkd control-keys /etc/forkd/keys
      forkd start app:main --control tcp://10.0.0.5:7000 \\
          --control-keys /etc/forkd/keys/forkd.key_secret
    """
    from forkd.control import create_curve_keys

    click.echo(create_curve_keys(Path(directory)))


@cli.command(name="ls")
def list_primaries() -> None:
    """Every forkd primary running under FORKD_HOME, one row each.

    \b
    Example:
      forkd ls
    """
    from forkd import ctl

    sys.exit(ctl.ls(_home()))


def _home() -> Path:
    from forkd.control import default_home

    return default_home(os.environ)


def _fail(message: str, code: int) -> Any:
    click.echo(f"forkd: {message}", err=True)
    sys.exit(code)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
