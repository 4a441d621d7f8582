"""A WSGI app for the HTTP server tests (tests/http), served through
`wsgiref.validate.validator`, which asserts on every PEP 3333 rule the server (and the
app) must keep. Breaches the validator can only report late (a result iterator that
was never closed, a warning) are collected and served by /problems. Routes:

/pid                   {"pid": ...}
/query                 JSON of REQUEST_METHOD, PATH_INFO, QUERY_STRING, SCRIPT_NAME, SERVER_PROTOCOL
/environ               the str-valued environ as JSON
/echo                  the request body back (read with read(n), with or without CONTENT_LENGTH)
/lines                 reads the body with readline() and iteration: {"lines": .., "bytes": ..}
/sized?n=N             N bytes of "x", no content-length from the app (the server frames it)
/stream?n=N&chunk=M    N bytes of http_asgi_probe.pattern yielded in M-byte pieces, no length
/slow?ms=N             "slow N" after N ms
/upload-probe?id=X     reads a body slowly; writes MARKERS/started-X after the first block and
                       MARKERS/result-X (what ended the read) at the end
/raise                 raises before start_response
/raise-after-start     calls start_response, then raises before any body
/partial               yields 256 KiB (past the server's flush size), then raises
/problems              what the validator reported late, as a JSON list"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import parse_qs
from wsgiref.validate import validator

from http_asgi_probe import pattern

_problems: list[str] = []
_problems_lock = threading.Lock()


def _record(text: str) -> None:
    with _problems_lock:
        _problems.append(text)


def _unraisable(info) -> None:  # e.g. "Iterator garbage collected without being closed"
    _record(f"unraisable: {info.exc_type.__name__}: {info.exc_value}")


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    _record(f"warning: {category.__name__}: {message}")


sys.unraisablehook = _unraisable
warnings.showwarning = _showwarning
warnings.simplefilter("always")


def _marker(name: str, text: str) -> None:
    folder = os.environ.get("HTTP_PROBE_MARKERS")
    if folder:
        tmp = Path(folder, f".{name}.tmp")
        tmp.write_text(text)
        tmp.rename(Path(folder, name))


def _read_body(environ) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        return stream.read(int(length))
    parts = []
    while True:  # no length: wsgi.input_terminated promises an end-of-file
        part = stream.read(65536)
        if not part:
            return b"".join(parts)
        parts.append(part)


def _respond(start_response, body: bytes, ctype: str = "application/octet-stream",
             status: str = "200 OK", length: bool = True) -> list[bytes]:
    headers = [("Content-Type", ctype)]
    if length:
        headers.append(("Content-Length", str(len(body))))
    start_response(status, headers)
    return [body]


def _stream(data: bytes, step: int):
    for start in range(0, len(data), step):
        yield data[start:start + step]


def _partial():
    yield b"p" * (256 * 1024)
    raise RuntimeError("probe: failure in the middle of the body")


def _upload_probe(environ, name: str) -> str:
    stream = environ["wsgi.input"]
    total = 0
    try:
        while True:
            block = stream.read(16384)
            if total == 0:
                _marker(f"started-{name}", "")
            if not block:
                return f"eof after {total}"
            total += len(block)
    except OSError as exc:
        return f"OSError after {total}: {exc}"


def _dispatch(environ, start_response):
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
    if path == "/pid":
        return _respond(start_response, json.dumps({"pid": os.getpid()}).encode(),
                        "application/json")
    if path == "/query":
        keys = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SCRIPT_NAME", "SERVER_PROTOCOL")
        body = json.dumps({key: environ[key] for key in keys}).encode()
        return _respond(start_response, body, "application/json")
    if path == "/environ":
        _read_body(environ)
        document = {k: v for k, v in environ.items() if isinstance(v, str)}
        return _respond(start_response, json.dumps(document).encode(), "application/json")
    if path == "/environ-mutate":  # what an app may do to its own environ
        environ["app.mark"] = "left by the app"
        environ["SERVER_NAME"] = "changed.example"
        environ.pop("REMOTE_ADDR")
        return _respond(start_response, b"mutated")
    if path == "/echo":
        return _respond(start_response, _read_body(environ))
    if path == "/lines":
        stream = environ["wsgi.input"]
        first = stream.readline()
        lines = [first] if first else []
        lines.extend(stream)
        body = json.dumps({"lines": len(lines), "bytes": sum(map(len, lines)),
                           "sha": hashlib.sha256(b"".join(lines)).hexdigest()})
        return _respond(start_response, body.encode(), "application/json")
    if path == "/sized":
        return _respond(start_response, b"x" * int(query.get("n", "0")), length=False)
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _stream(pattern(int(query.get("n", "0"))), int(query.get("chunk", "65536")))
    if path == "/slow":
        ms = int(query.get("ms", "100"))
        time.sleep(ms / 1000)
        return _respond(start_response, b"slow %d" % ms)
    if path == "/upload-probe":
        name = query.get("id", "x")
        result = _upload_probe(environ, name)
        _marker(f"result-{name}", result)
        return _respond(start_response, result.encode())
    if path == "/raise":
        raise RuntimeError("probe: failure before start_response")
    if path == "/raise-after-start":
        start_response("200 OK", [("Content-Type", "text/plain")])
        raise RuntimeError("probe: failure after start_response")
    if path == "/partial":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _partial()
    if path == "/problems":
        with _problems_lock:
            body = json.dumps(_problems).encode()
        return _respond(start_response, body, "application/json")
    return _respond(start_response, b"not found", "text/plain", "404 Not Found")


app = validator(_dispatch)
