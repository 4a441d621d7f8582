"""forkd's configuration: one frozen dataclass, its validation, and the merge of
command line, environment and forkd.toml. No I/O here: the caller reads the file
and the environment and hands their contents in."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from forkd.errors import ConfigError
from forkd.http.proxy import parse_allow_list

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """`512M` -> 536870912. Units are powers of 1024, as `top` and PM2 count them."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise ValueError(f"{text!r} is not a size (examples: 512M, 1G, 1048576)")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{text!r} must be more than zero")
    return value


def format_size(value: float) -> str:
    """536870912 -> `512M`; the inverse of parse_size, rounded to one unit."""
    for unit in ("T", "G", "M", "K"):
        scale = _SIZE_UNITS[unit.lower()]
        if value >= scale:
            return f"{value / scale:.0f}{unit}"
    return f"{value:.0f}"


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a whole number")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise ValueError(f"{number} is less than {minimum}")
        if maximum is not None and number > maximum:
            raise ValueError(f"{number} is more than {maximum}")
        return number

    return parse


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not number > 0:
        raise ValueError(f"{value!r} must be more than zero")
    return number


def _seconds_or_zero(value: Any) -> float:
    """Seconds where 0 means off (--drain-delay)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not 0 <= number < float("inf"):
        raise ValueError(f"{value!r} must be zero (off) or more")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _binds(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value)
    if isinstance(value, str) and "," in value:  # FORKD_BIND=a,b
        items = [part.strip() for part in value.split(",")]
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ValueError(f"{value!r} is not a list of addresses")
    for item in items:
        parse_bind(item)
    return tuple(items)


def _optional_size(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "0")):
        return None
    return parse_size(value)


def _allow_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        value = ",".join(str(item) for item in value)
    return parse_allow_list(_text(value))


def _path(value: Any) -> str | None:
    text = _text(value).strip()
    if not text:
        return None
    if not text.startswith("/") or any(char in text for char in " ?#\r\n"):
        raise ValueError(f"{value!r} is not a path like /healthz")
    return text


def _autoscale(value: Any) -> tuple[int, int] | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off")):
        return None
    if isinstance(value, list | tuple) and len(value) == 2:
        low, high = value
    else:
        low, sep, high = str(value).partition(":")
        if not sep:
            raise ValueError(f"{value!r} is not MIN:MAX (for instance 2:8)")
    try:
        bounds = int(low), int(high)
    except ValueError:
        raise ValueError(f"{value!r} is not MIN:MAX (for instance 2:8)") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"{value!r}: need 1 <= MIN <= MAX")
    return bounds


def _ratio(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    if not 0 < number <= 1:
        raise ValueError(f"{value!r} is not a ratio between 0 (excluded) and 1")
    return number


def _mode(value: Any) -> int:
    try:
        mode = int(str(value), 8) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"{value!r} is not an octal file mode like 660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{value!r} is not a file mode")
    return mode


def _text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not text")
    return str(value)


@dataclass(frozen=True)
class Bind:
    """One listener address: kind is tcp, unix or fd."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd://{self.fd}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_bind(text: str) -> Bind:
    """`HOST:PORT`, `[IPV6]:PORT`, `unix:PATH` or `fd://N`."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError(f"{text!r} has no path")
        return Bind("unix", path=path)
    if text.startswith("fd://"):
        try:
            fd = int(text[len("fd://") :])
        except ValueError:
            raise ValueError(f"{text!r}: fd://N takes a file descriptor number") from None
        if fd < 0:
            raise ValueError(f"{text!r}: a file descriptor is not negative")
        return Bind("fd", fd=fd)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [::1]:8000")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: the port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: the port must be 0 to 65535")
    return Bind("tcp", host=host or "0.0.0.0", port=port)


def _metrics_address(value: Any) -> str | None:
    text = _text(value).strip()
    if text.lower() in ("", "off", "none"):
        return None
    bind = parse_bind(text)
    if bind.kind not in ("tcp", "unix"):
        raise ValueError(f"{text!r}: give HOST:PORT, [IPV6]:PORT or unix:PATH")
    return text


@dataclass(frozen=True)
class Option:
    """One `forkd start` option: its parser and help. Its default is stated once, as
    the default of the Config field of the same name."""

    name: str
    parse: Callable[[Any], Any]
    help: str


# The single list of every `forkd start` option: the CLI, the environment
# (FORKD_<NAME>) and forkd.toml all read from it.
OPTIONS: tuple[Option, ...] = (
    Option("bind", _binds, "HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N"),
    Option("workers", _int(1, 1024), "number of workers (default: usable CPU cores)"),
    Option("name", _text, "name of this primary (default: the app's top-level module)"),
    Option("interface", _choice("auto", "asgi", "wsgi"), "how the app is called"),
    Option("max_memory", _optional_size, "per-worker memory limit (512M, 1G)"),
    Option("memory_metric", _choice("rss", "uss", "pss"), "what --max-memory judges"),
    Option("memory_interval", _seconds, "seconds between memory samples"),
    Option("memory_samples", _int(1), "consecutive samples over the limit before a replace"),
    Option("memory_hard_limit", _optional_size, "SIGKILL above this (default 1.5x limit)"),
    Option("timeout", _seconds, "seconds of heartbeat silence before a worker is killed"),
    Option("startup_timeout", _seconds, "seconds a new worker may take to become ready"),
    Option("graceful_timeout", _seconds, "seconds a stopping worker may drain"),
    Option("drain_delay", _seconds_or_zero, "on a graceful stop, seconds to keep serving "
           "with --health-path answering 503 before draining, so a load balancer lets go first"),
    Option("max_requests", _int(0), "recycle a worker after this many requests (0: off)"),
    Option("max_requests_jitter", _int(0), "random extra requests before recycling"),
    Option("chdir", _text, "directory each new worker changes to and imports the app "
           "from (default: where forkd start ran, as typed: a symlink stays a path)"),
    Option("preload", _bool, "import the app in the primary before forking"),
    Option("control", _text, "ZeroMQ control endpoint (default ipc://FORKD_HOME/NAME.sock)"),
    Option("control_keys", _text,
           "CURVE secret key file for a tcp:// control endpoint (see forkd control-keys)"),
    Option("reload_batch", _int(1), "workers replaced at once during a reload"),
    Option("backlog", _int(1), "listen backlog of each listener"),
    Option("unix_mode", _mode, "file mode of unix: listeners (octal)"),
    Option("threads", _int(0), "WSGI threads per worker, at most (up to 8 always; more while "
           "calls wait on I/O; 0: every call inline)"),
    Option("wsgi_inline", _choice("auto", "always", "never"),
           "run WSGI calls learnt to be quick on the loop's thread (auto), every call, or none"),
    Option("keepalive_timeout", _seconds, "seconds an idle keep-alive connection is kept"),
    Option("header_timeout", _seconds,
           "seconds a client may take to send its headers, stall its body, or take none of "
           "an answer that waits on it"),
    Option("max_body_size", parse_size, "largest request body accepted (413 above)"),
    Option("limit_request_line", _int(64), "longest request line accepted (431 above)"),
    Option("limit_request_fields", _int(1), "most header fields accepted (431 above)"),
    Option("limit_request_field_size", _int(64), "longest header field accepted"),
    Option("root_path", _text, "ASGI root_path / WSGI SCRIPT_NAME of the app"),
    Option("access_log", _bool, "log every request (with duration_ms and request_id)"),
    Option("forwarded_allow_ips", _allow_list,
           "IPs/CIDRs (or *) whose Forwarded / X-Forwarded-* headers are believed"),
    Option("proxy_protocol", _bool,
           "TCP listeners expect a PROXY protocol v1/v2 header from --forwarded-allow-ips"),
    Option("health_path", _path, "a path forkd answers itself: 200 ready, 503 draining"),
    Option("limit_concurrency", _int(0),
           "requests in progress per worker beyond which forkd answers 503 (0: off)"),
    Option("metrics", _metrics_address,
           "serve Prometheus metrics of every worker at http://ADDR/metrics (HOST:PORT or "
           "unix:PATH) from the primary"),
    Option("autoscale", _autoscale, "MIN:MAX: let forkd choose the worker count between them"),
    Option("autoscale_target", _ratio,
           "worker utilisation (busy/wall time, pool average) autoscaling aims at"),
    Option("autoscale_window", _seconds,
           "seconds a lower load must last before autoscaling removes workers"),
    # TLS and WebSockets (issue 18)
    Option("certfile", _text, "TLS certificate chain (PEM): HTTPS and WSS on TCP listeners"),
    Option("keyfile", _text, "TLS private key (PEM), when not in --certfile"),
    Option("ca_certs", _text, "with TLS, require client certificates signed by these CAs"),
    Option("ws_max_size", parse_size, "largest WebSocket message (close 1009 above)"),
    Option("ws_ping_interval", _seconds_or_zero,
           "seconds of WebSocket silence before a ping (0: no pings)"),
    Option("ws_ping_timeout", _seconds, "seconds a pinged WebSocket has to answer"),
    Option("ws_per_message_deflate", _bool, "offer WebSocket permessage-deflate"),
    Option("min_body_rate", _int(0),
           "bytes per second a request body must average over 5 s (408 below), and a "
           "client must take its answers at, streamed ones too (cut below; 0: off)"),
    Option("wsgi_body_buffer", parse_size,
           "request body read in the event loop before a WSGI thread is taken"),
    Option("log_format", _choice("text", "json"), "log lines as text or JSON objects"),
    Option("log_file", _text, "write every log line here (default stderr); SIGUSR1 reopens"),
    Option("log_max_size", _optional_size, "rotate --log-file at this size (10M)"),
    Option("log_keep", _int(0), "rotated --log-file copies kept"),
)
OPTION_NAMES = frozenset(option.name for option in OPTIONS)
_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Config:
    app: str
    bind: tuple[str, ...] = ("127.0.0.1:8000",)
    workers: int | None = None
    name: str | None = None
    interface: str = "auto"
    max_memory: int | None = None
    memory_metric: str = "rss"
    memory_interval: float = 1.0
    memory_samples: int = 2
    memory_hard_limit: int | None = None
    timeout: float = 30.0
    startup_timeout: float = 60.0
    graceful_timeout: float = 30.0
    drain_delay: float = 0.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    chdir: str | None = None
    preload: bool = False
    control: str | None = None
    control_keys: str | None = None
    reload_batch: int = 1
    backlog: int = 2048
    unix_mode: int = 0o660
    threads: int = 32
    wsgi_inline: str = "auto"
    keepalive_timeout: float = 5.0
    header_timeout: float = 10.0
    max_body_size: int = 100 << 20
    limit_request_line: int = 8190
    limit_request_fields: int = 100
    limit_request_field_size: int = 8190
    root_path: str = ""
    access_log: bool = False
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    proxy_protocol: bool = False
    health_path: str | None = None
    limit_concurrency: int = 0
    metrics: str | None = None
    autoscale: tuple[int, int] | None = None
    autoscale_target: float = 0.6
    autoscale_window: float = 60.0
    certfile: str | None = None
    keyfile: str | None = None
    ca_certs: str | None = None
    ws_max_size: int = 16 << 20
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    ws_per_message_deflate: bool = True
    min_body_rate: int = 240
    wsgi_body_buffer: int = 1 << 20
    log_format: str = "text"
    log_file: str | None = None
    log_max_size: int | None = None
    log_keep: int = 5

    @property
    def binds(self) -> tuple[Bind, ...]:
        return tuple(parse_bind(text) for text in self.bind)

    @property
    def hard_memory_limit(self) -> int | None:
        if self.max_memory is None:
            return None
        return self.memory_hard_limit or int(self.max_memory * 1.5)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "FORKD_" + name.upper()


def _parse(name: str, value: Any, origin: str) -> Any:
    try:
        return _BY_NAME[name].parse(value)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def parse_toml(text: str, path: str) -> dict[str, Any]:
    """forkd.toml's text -> {option: raw value}; unknown keys are an error."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    section = data.get("forkd", data) if isinstance(data.get("forkd"), dict) else data
    for key in section:
        if key not in OPTION_NAMES and key != "app":
            raise ConfigError(f"{path}: unknown key {key!r}")
    return dict(section)


def merge(
    app: str | None,
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    file_values: Mapping[str, Any],
    file_path: str = "forkd.toml",
) -> Config:
    """Build the Config: command line, then environment, then file, then default.

    `cli` holds only the options given on the command line; `env` is the whole
    environment (only FORKD_<OPTION> keys are read)."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        name = option.name
        if name in cli and cli[name] is not None:
            values[name] = _parse(name, cli[name], option_flag(name))
        elif env_name(name) in env:
            values[name] = _parse(name, env[env_name(name)], env_name(name))
        elif name in file_values:
            values[name] = _parse(name, file_values[name], f"{file_path}: {name}")
    app = app or env.get("FORKD_APP") or file_values.get("app")
    if not app:
        raise ConfigError("APP is missing: give it as module:attr (e.g. sample_app.asgi:app)")
    if not isinstance(app, str) or ":" not in app and "." not in app:
        raise ConfigError(f"APP {app!r} is not module:attr")
    config = Config(app=app, **values)
    if config.max_requests_jitter and not config.max_requests:
        raise ConfigError("--max-requests-jitter: needs --max-requests")
    if config.memory_hard_limit is not None and (
            config.max_memory is None or config.memory_hard_limit <= config.max_memory):
        raise ConfigError("--memory-hard-limit: must be above --max-memory")
    for needs_cert in ("keyfile", "ca_certs"):
        if getattr(config, needs_cert) is not None and config.certfile is None:
            raise ConfigError(f"{option_flag(needs_cert)}: needs --certfile")
    if config.log_max_size is not None and config.log_file is None:
        raise ConfigError("--log-max-size: needs --log-file")
    return config


def default_name(app: str) -> str:
    """`sample_app.asgi:app` -> `sample_app`."""
    return app.split(":", 1)[0].split(".", 1)[0] or "app"
