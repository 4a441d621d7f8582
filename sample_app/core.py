"""The pure core of the sample app: routing, validation and every response. No I/O here.

A shell (``asgi`` or ``wsgi``) builds a `Request`, calls `route()`, and gets back either a
finished `Response` or a *step*: a request for one piece of I/O (sleep, count a visit, read
or write an item). The shell performs the step its own way (await or block) and passes the
result to the step's ``done()``, which returns the response. So both shells share every
decision, and the tests here need no sockets, threads or event loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

SLOW_MAX_MS = 60_000
SID_COOKIE = "sid"
# secrets.token_urlsafe(32) gives 43 characters of this alphabet. Anything else a client sends
# is not one of our ids, so it is ignored rather than looked up.
_SID_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# Item ids are path segments kept to unreserved characters, so no decoding question arises.
_ITEM_ID_RE = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_ITEMS_PREFIX = "/items/"


@dataclass(frozen=True, slots=True)
class Identity:
    """Which process answers: shown by /whoami, /session and /slow."""

    pid: int
    worker_id: int | None


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, already read (the body is bounded by the shell)."""

    method: str
    path: str
    query: str = ""
    content_type: str | None = None
    cookie: str = ""
    body: bytes = b""
    secure: bool = False


@dataclass(frozen=True, slots=True)
class Response:
    """A complete answer. ``headers`` excludes Content-Type and Content-Length (see `render`)."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Visit:
    """The session store's answer to one /session visit."""

    sid: str
    count: int
    new: bool


@dataclass(frozen=True, slots=True)
class Sleep:
    """Step: wait ``ms`` milliseconds, then call `done`."""

    ms: int
    identity: Identity

    def done(self) -> Response:
        return json_response(200, {"slept_ms": self.ms, "pid": self.identity.pid})


@dataclass(frozen=True, slots=True)
class CountVisit:
    """Step: add one to the session ``sid`` (None or unknown: start a new session)."""

    sid: str | None
    secure: bool
    identity: Identity

    def done(self, visit: Visit) -> Response:
        headers: tuple[tuple[str, str], ...] = (("cache-control", "no-store"),)
        if visit.new:
            headers += (("set-cookie", session_cookie(visit.sid, secure=self.secure)),)
        return json_response(200, {"count": visit.count, "pid": self.identity.pid}, headers)


@dataclass(frozen=True, slots=True)
class ReadItem:
    """Step: read item ``item_id`` through the cache; the result is its JSON or None."""

    item_id: str

    def done(self, value: bytes | None) -> Response:
        if value is None:
            return error(404, f"no item {self.item_id!r}")
        return Response(200, value)


@dataclass(frozen=True, slots=True)
class WriteItem:
    """Step: store ``value`` (valid JSON) as item ``item_id`` and invalidate every cache."""

    item_id: str
    value: bytes

    def done(self, created: bool) -> Response:
        headers = (("location", _ITEMS_PREFIX + self.item_id),) if created else ()
        return Response(201 if created else 200, self.value, headers=headers)


Step = Sleep | CountVisit | ReadItem | WriteItem
Handler = Callable[[Request, Identity, str], "Response | Step"]


def route(request: Request, identity: Identity) -> Response | Step:
    """Decide what ``request`` needs: a finished response, or one step of I/O first."""
    found = _match(request.path)
    if found is None:
        return error(404, f"no route for {request.path}")
    handlers, param = found
    # HEAD is GET without the body; the shell drops the body in `render`.
    method = "GET" if request.method == "HEAD" else request.method
    handler = handlers.get(method)
    if handler is None:
        allow = allowed_methods(handlers)
        return error(
            405, f"{request.method} is not allowed here", headers=(("allow", ", ".join(allow)),)
        )
    return handler(request, identity, param)


def allowed_methods(handlers: Mapping[str, object]) -> list[str]:
    """The Allow header's methods: HEAD goes wherever GET does."""
    methods = sorted(handlers)
    if "GET" in handlers:
        methods.insert(methods.index("GET") + 1, "HEAD")
    return methods


def render(
    request: Request, response: Response, identity: Identity
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, full header list and the bytes to send; HEAD keeps the length, drops the body.

    Every answer names the worker process in ``x-served-by``: with several workers behind
    one socket, it shows how requests spread (and lets tests tell the workers apart).
    """
    headers = list(response.headers)
    if response.content_type is not None:
        headers.append(("content-type", response.content_type))
    headers.append(("content-length", str(len(response.body))))
    headers.append(("x-served-by", str(identity.pid)))
    body = b"" if request.method == "HEAD" else response.body
    return response.status, headers, body


def json_response(
    status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    return Response(status, json.dumps(payload, separators=(",", ":")).encode(), headers=headers)


def error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return json_response(status, {"error": message}, headers)


def too_large(limit: int) -> Response:
    """413 for a body over ``limit`` bytes. The shell stops reading at the limit, so the rest
    of the body is still on the connection: ask the server to close it."""
    return error(413, f"request body is larger than {limit} bytes", (("connection", "close"),))


def unavailable(message: str) -> Response:
    """503 when the store cannot answer in time; clients may retry after a second."""
    return error(503, message, headers=(("retry-after", "1"),))


def declared_too_large(content_length: str | None, limit: int) -> bool:
    """True when the client announces a body over ``limit`` (answer 413 without reading it)."""
    if content_length is None or not content_length.strip().isdigit():
        return False
    return int(content_length) > limit


def session_cookie(sid: str, *, secure: bool) -> str:
    """The Set-Cookie value: unreadable by scripts, not sent on cross-site subrequests."""
    cookie = f"{SID_COOKIE}={sid}; Path=/; HttpOnly; SameSite=Lax"
    return cookie + "; Secure" if secure else cookie


def session_id(cookie_header: str) -> str | None:
    """The well-formed ``sid`` from a Cookie header, or None."""
    for part in cookie_header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == SID_COOKIE:
            value = value.strip().strip('"')
            return value if _SID_RE.fullmatch(value) else None
    return None


def parse_slow_ms(query: str) -> int | None:
    """The ``ms`` of /slow, capped at `SLOW_MAX_MS`; None when missing or not a whole number."""
    values = parse_qs(query, keep_blank_values=True).get("ms")
    if not values or len(values) != 1:
        return None
    text = values[0].strip()
    if not text.isascii() or not text.isdigit():
        return None
    return min(int(text), SLOW_MAX_MS)


def parse_json_value(body: bytes) -> object:
    """Decode ``body`` as one strict JSON value; raise ValueError when it is not one."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from exc


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def request_from_scope(scope: Mapping[str, object], body: bytes) -> Request:
    """Build a `Request` from an ASGI HTTP scope."""
    headers = _asgi_headers(scope.get("headers", ()))  # type: ignore[arg-type]
    query = scope.get("query_string", b"")
    return Request(
        method=str(scope["method"]),
        path=str(scope["path"]),
        query=query.decode("latin-1") if isinstance(query, bytes) else "",
        content_type=headers.get("content-type"),
        cookie=headers.get("cookie", ""),
        body=body,
        secure=scope.get("scheme") == "https",
    )


def request_from_environ(environ: Mapping[str, object], body: bytes) -> Request:
    """Build a `Request` from a WSGI environ."""
    # PEP 3333 hands the path over as latin-1 text of the raw bytes; undo that to get UTF-8.
    raw_path = str(environ.get("PATH_INFO", "") or "/")
    path = raw_path.encode("latin-1", "replace").decode("utf-8", "replace")
    content_type = environ.get("CONTENT_TYPE")
    return Request(
        method=str(environ["REQUEST_METHOD"]),
        path=path,
        query=str(environ.get("QUERY_STRING", "")),
        content_type=str(content_type) if content_type else None,
        cookie=str(environ.get("HTTP_COOKIE", "")),
        body=body,
        secure=environ.get("wsgi.url_scheme") == "https",
    )


def _asgi_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name_bytes, value_bytes in raw:
        name, value = name_bytes.decode("latin-1").lower(), value_bytes.decode("latin-1")
        if name in headers:
            # HTTP/2 may split cookies over several fields; other repeats join with commas.
            value = headers[name] + ("; " if name == "cookie" else ", ") + value
        headers[name] = value
    return headers


# --- the routes -----------------------------------------------------------------------------


def _hello(request: Request, identity: Identity, param: str) -> Response | Step:
    return Response(200, b"Hello, world!", content_type="text/plain; charset=utf-8")


def _health(request: Request, identity: Identity, param: str) -> Response | Step:
    # Liveness only: a Redis outage must not make every worker look dead to forkd or to a
    # load balancer; the routes that need the store answer 503 themselves.
    return json_response(200, {"status": "ok"})


def _whoami(request: Request, identity: Identity, param: str) -> Response | Step:
    payload = {"pid": identity.pid, "worker_id": identity.worker_id}
    return json_response(200, payload, (("cache-control", "no-store"),))


def _session(request: Request, identity: Identity, param: str) -> Response | Step:
    return CountVisit(session_id(request.cookie), request.secure, identity)


def _slow(request: Request, identity: Identity, param: str) -> Response | Step:
    ms = parse_slow_ms(request.query)
    if ms is None:
        return error(400, f"ms must be a whole number of milliseconds (at most {SLOW_MAX_MS})")
    return Sleep(ms, identity)


def _echo(request: Request, identity: Identity, param: str) -> Response | Step:
    content_type = request.content_type or "application/octet-stream"
    return Response(200, request.body, content_type=content_type)


def _get_item(request: Request, identity: Identity, item_id: str) -> Response | Step:
    return ReadItem(item_id)


def _put_item(request: Request, identity: Identity, item_id: str) -> Response | Step:
    try:
        parse_json_value(request.body)
    except ValueError as exc:
        return error(400, f"the body must be one JSON value: {exc}")
    # An item is any JSON value, kept byte for byte as the client sent it.
    return WriteItem(item_id, request.body)


_EXACT: dict[str, dict[str, Handler]] = {
    "/": {"GET": _hello},
    "/health": {"GET": _health},
    "/whoami": {"GET": _whoami},
    "/session": {"GET": _session},
    "/slow": {"GET": _slow},
    "/echo": {"POST": _echo},
}
_ITEM_ROUTE: dict[str, Handler] = {"GET": _get_item, "PUT": _put_item}


def _match(path: str) -> tuple[dict[str, Handler], str] | None:
    handlers = _EXACT.get(path)
    if handlers is not None:
        return handlers, ""
    if path.startswith(_ITEMS_PREFIX):
        item_id = path[len(_ITEMS_PREFIX) :]
        if _ITEM_ID_RE.fullmatch(item_id):
            return _ITEM_ROUTE, item_id
    return None
