"""The control protocol: requests and replies as JSON frames, with no I/O.

A request is one ZeroMQ frame holding a JSON object::

    {"v": 1, "id": "3f2a...", "command": "scale", "args": {"count": "+2"}}

Every request gets replies carrying the same id, each one JSON object:

    {"v": 1, "id": "3f2a...", "kind": "progress", "message": "slot 2/8: ..."}   (zero or more)
    {"v": 1, "id": "3f2a...", "kind": "ok", "result": {...}}                     (final)
    {"v": 1, "id": "3f2a...", "kind": "error", "code": "busy", "message": "..."}  (final)

An error reply for a request whose id could not be read carries ``"id": null``.
Decoding never trusts its input: anything that is not exactly this shape raises
ProtocolError with one of the codes below, and the server answers with that code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from forkd.errors import ProtocolError

PROTOCOL_VERSION = 1

# Requests are tiny; the cap keeps a hostile or broken client from making the primary
# allocate and parse megabytes. The transport enforces the same number (MAXMSGSIZE).
MAX_FRAME = 64 * 1024

# Replies come from the primary the client chose to trust and a status document grows
# with the worker count, so the client accepts far more than the server does.
MAX_REPLY_FRAME = 16 * 1024 * 1024

MAX_ID_LENGTH = 128

# name -> whether it changes the primary's state. Only one mutating command may run at a
# time: the primary refuses a second one with a "busy" error instead of interleaving them.
COMMANDS: dict[str, bool] = {
    "ping": False,
    "status": False,
    "reload": True,
    "scale": True,
    "stop": True,
    "upgrade": True,
    "logs": False,
}


class Code(StrEnum):
    """The error codes a reply (or the client) can carry."""

    TOO_LARGE = "too-large"
    BAD_JSON = "bad-json"
    BAD_REQUEST = "bad-request"
    BAD_VERSION = "bad-version"
    UNKNOWN_COMMAND = "unknown-command"
    BAD_ARGS = "bad-args"
    BUSY = "busy"  # another mutating command runs
    FAILED = "failed"  # the operation ran and failed (a replacement did not boot, ...)
    INTERNAL = "internal"  # the primary could not build its answer
    # Raised on the client side only:
    NO_PRIMARY = "no-primary"
    TIMEOUT = "timeout"
    UNAUTHORIZED = "unauthorized"
    DISCONNECTED = "disconnected"


# Codes that mean "the request itself was wrong" or "nobody to ask": the CLI exits 2
# (bad usage); every other error code means the operation failed (exit 1).
USAGE_CODES = frozenset({Code.BAD_ARGS, Code.BAD_REQUEST, Code.NO_PRIMARY})


@dataclass(frozen=True)
class Request:
    """A decoded, validated request; args carry their defaults filled in."""

    id: str
    command: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OkReply:
    id: str
    result: dict[str, Any]


@dataclass(frozen=True)
class ErrorReply:
    id: str | None
    code: str
    message: str


@dataclass(frozen=True)
class ProgressReply:
    """An intermediate reply: more replies to the same request follow."""

    id: str
    message: str


Reply = OkReply | ErrorReply | ProgressReply


# ---------------------------------------------------------------------------- requests


def encode_request(request: Request) -> bytes:
    """The frame for a request; the request is validated first, so no bad frame leaves."""
    validate_args(request.command, request.args)
    return _dump(
        {"v": PROTOCOL_VERSION, "id": request.id, "command": request.command,
         "args": request.args}
    )


def decode_request(frame: bytes) -> Request:
    """Parse and validate one request frame, or raise ProtocolError saying what is wrong."""
    obj = _load(frame, MAX_FRAME)
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            Code.BAD_VERSION,
            f"protocol version {version!r} is not supported (this primary speaks "
            f"{PROTOCOL_VERSION})",
        )
    request_id = _check_id(obj.get("id"))
    command = obj.get("command")
    if not isinstance(command, str):
        raise ProtocolError(Code.BAD_REQUEST, "'command' must be a string")
    if command not in COMMANDS:
        raise ProtocolError(
            Code.UNKNOWN_COMMAND,
            f"unknown command {command[:40]!r} (known: {', '.join(COMMANDS)})",
        )
    args = obj.get("args", {})
    extra = set(obj) - {"v", "id", "command", "args"}
    if extra:
        raise ProtocolError(Code.BAD_REQUEST, f"unexpected keys: {', '.join(sorted(extra))}")
    return Request(request_id, command, validate_args(command, args))


def peek_id(frame: bytes) -> str | None:
    """The id of a request that failed to decode, when it can still be read; else None.

    Lets the server address its error reply to the waiting client."""
    try:
        obj = _load(frame, MAX_FRAME)
        return _check_id(obj.get("id"))
    except ProtocolError:
        return None


def validate_args(command: str, args: object) -> dict[str, Any]:
    """The args of a command with defaults filled in, or ProtocolError("bad-args")."""
    if command not in COMMANDS:
        raise ProtocolError(Code.UNKNOWN_COMMAND, f"unknown command {command[:40]!r}")
    if not isinstance(args, dict):
        raise ProtocolError(Code.BAD_ARGS, f"{command}: 'args' must be an object")
    allowed = _ARG_KEYS[command]
    unknown = set(args) - allowed
    if unknown:
        raise ProtocolError(
            Code.BAD_ARGS, f"{command}: unexpected argument(s) {', '.join(sorted(unknown))}"
        )
    if command == "scale":
        count = args.get("count")
        if not isinstance(count, str) or not _SCALE_RE.fullmatch(count):
            raise ProtocolError(
                Code.BAD_ARGS, f"scale: count must be N, +N or -N, not {count!r}"
            )
        return {"count": count}
    if command == "stop":
        graceful = args.get("graceful", True)
        if not isinstance(graceful, bool):
            raise ProtocolError(Code.BAD_ARGS, "stop: 'graceful' must be true or false")
        return {"graceful": graceful}
    if command == "logs":
        return _logs_args(args)
    return {}


def _logs_args(args: dict[str, Any]) -> dict[str, Any]:
    """`logs`: lines (0..100000, default 50), after (a cursor), slot, json."""
    checked: dict[str, Any] = {"lines": 50, "after": None, "slot": None, "json": False}
    for key in ("lines", "after", "slot"):
        value = args.get(key, checked[key])
        if value is None and key != "lines":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= (
                100_000 if key == "lines" else 2**62):
            raise ProtocolError(Code.BAD_ARGS, f"logs: {key!r} must be a whole number "
                                               f"{'0..100000' if key == 'lines' else '>= 0'}")
        checked[key] = value
    if not isinstance(args.get("json", False), bool):
        raise ProtocolError(Code.BAD_ARGS, "logs: 'json' must be true or false")
    checked["json"] = args.get("json", False)
    return checked


_ARG_KEYS: dict[str, frozenset[str]] = {
    "ping": frozenset(),
    "status": frozenset(),
    "reload": frozenset(),
    "scale": frozenset({"count"}),
    "stop": frozenset({"graceful"}),
    "upgrade": frozenset(),
    "logs": frozenset({"lines", "after", "slot", "json"}),
}

# ASCII digits only (str.isdigit would accept other scripts' digits); bounded length so
# int() never works on a huge number.
_SCALE_RE = re.compile(r"[+-]?[0-9]{1,6}")


# The most workers one primary runs (`forkd scale`, SIGTTIN, `--workers`): far past what
# any host serves well, and short of a typo (`scale 999999`) forking the host to death.
MAX_WORKERS = 1024


def parse_scale(text: str, current: int, *, maximum: int | None = MAX_WORKERS) -> int:
    """The worker count that `forkd scale TEXT` asks for, given the current count.

    "4" sets the count, "+2" / "-2" change it. The result must be at least 1 (stopping
    every worker is `forkd stop`) and at most `maximum` when one is given."""
    number, relative = parse_scale_words(text)
    return resolve_scale(number, relative, current, maximum=maximum)


def parse_scale_words(text: str) -> tuple[int, bool]:
    """`forkd scale` words -> (number, relative): "4" -> (4, False), "-2" -> (-2, True)."""
    if not _SCALE_RE.fullmatch(text):
        raise ProtocolError(Code.BAD_ARGS, f"scale: expected N, +N or -N, not {text!r}")
    return int(text), text[0] in "+-"


def resolve_scale(number: int, relative: bool, current: int, *,
                  maximum: int | None = MAX_WORKERS) -> int:
    """The worker count asked for; at least 1, at most `maximum` when one is given."""
    target = current + number if relative else number
    if target < 1:
        raise ProtocolError(
            Code.BAD_ARGS,
            f"cannot scale to {target} workers (now {current}): at least 1 must run; "
            "use `forkd stop` to stop them all",
        )
    if maximum is not None and target > maximum:
        raise ProtocolError(
            Code.BAD_ARGS, f"cannot scale to {target} workers: the most forkd runs is {maximum}"
        )
    return target


# ----------------------------------------------------------------------------- replies


def encode_reply(reply: Reply) -> bytes:
    """The frame for a reply. Raises ValueError/TypeError for a result JSON cannot carry
    (NaN, a set, ...), so the caller can answer with an error instead."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": reply.id}
    if isinstance(reply, OkReply):
        body |= {"kind": "ok", "result": reply.result}
    elif isinstance(reply, ProgressReply):
        body |= {"kind": "progress", "message": reply.message}
    else:
        body |= {"kind": "error", "code": str(reply.code), "message": reply.message}
    return _dump(body)


def decode_reply(frame: bytes) -> Reply:
    """Parse one reply frame, or raise ProtocolError."""
    obj = _load(frame, MAX_REPLY_FRAME)
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(Code.BAD_VERSION, f"reply of protocol version {obj.get('v')!r}")
    kind = obj.get("kind")
    raw_id = obj.get("id")
    if kind == "error":
        code, message = obj.get("code"), obj.get("message")
        if not isinstance(code, str) or not isinstance(message, str):
            raise ProtocolError(Code.BAD_REQUEST, "error reply without code and message")
        return ErrorReply(None if raw_id is None else _check_id(raw_id), code, message)
    reply_id = _check_id(raw_id)
    if kind == "ok":
        result = obj.get("result")
        if not isinstance(result, dict):
            raise ProtocolError(Code.BAD_REQUEST, "ok reply without a result object")
        return OkReply(reply_id, result)
    if kind == "progress":
        message = obj.get("message")
        if not isinstance(message, str):
            raise ProtocolError(Code.BAD_REQUEST, "progress reply without a message")
        return ProgressReply(reply_id, message)
    raise ProtocolError(Code.BAD_REQUEST, f"unknown reply kind {kind!r}")


# ------------------------------------------------------------------------------ helpers


def _dump(obj: dict[str, Any]) -> bytes:
    # allow_nan=False: NaN is not JSON, and other tools (jq) would reject the document.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _load(frame: bytes, limit: int) -> dict[str, Any]:
    if len(frame) > limit:
        raise ProtocolError(Code.TOO_LARGE, f"frame of {len(frame)} bytes exceeds {limit}")
    try:
        obj = json.loads(frame.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(Code.BAD_JSON, f"not valid JSON: {exc}") from None
    except RecursionError:
        # A few kilobytes of "[[[[..." nest deeper than the parser's stack allows.
        raise ProtocolError(Code.BAD_JSON, "not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(Code.BAD_REQUEST, "a message must be a JSON object")
    return obj


def _check_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise ProtocolError(
            Code.BAD_REQUEST, f"'id' must be a non-empty string of at most {MAX_ID_LENGTH}"
        )
    return value
