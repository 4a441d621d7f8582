"""The pure parts of the HTTP server: the request target split, the percent-decoding
of the path, and the PEP 3333 environ built from one parsed request."""

from __future__ import annotations

import io
import sys
import warnings
from typing import Any
from wsgiref.validate import WSGIWarning, check_environ

import pytest

from forkd.http.asgi import decode_path
from forkd.http.framing import split_target
from forkd.http.wsgi import build_environ


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/", (b"/", b"")),
        (b"/a/b", (b"/a/b", b"")),
        (b"/a?x=1&y=2", (b"/a", b"x=1&y=2")),
        (b"/a?", (b"/a", b"")),
        (b"/a?x=1?y=2", (b"/a", b"x=1?y=2")),  # only the first ? separates
        (b"/a%3Fb?q=%3F", (b"/a%3Fb", b"q=%3F")),  # an escaped ? stays in the path, raw
        (b"//double//slash", (b"//double//slash", b"")),
        (b"*", (b"*", b"")),
        (b"http://example.com/p/q?x=1", (b"/p/q", b"x=1")),
        (b"http://example.com:8080/p", (b"/p", b"")),
        (b"http://example.com", (b"/", b"")),  # absolute-form without a path is "/"
        (b"http://example.com?x=1", (b"/", b"x=1")),
        (b"https://user:pw@example.com/a%20b?c", (b"/a%20b", b"c")),
    ],
)
def test_split_target(target: bytes, expected: tuple[bytes, bytes]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/plain", "/plain"),
        (b"/a%20b", "/a b"),
        (b"/caf%C3%A9", "/caf\u00e9"),  # percent-escapes are UTF-8
        (b"/a%2Fb", "/a/b"),
        (b"/%7e%7E", "/~~"),  # both cases of hex digits
        (b"/100%", "/100%"),  # a stray % is kept
        (b"/%zz", "/%zz"),  # so is an escape that is not hex
    ],
)
def test_decode_path(raw: bytes, expected: str) -> None:
    assert decode_path(raw) == expected


def test_decode_path_replaces_invalid_utf8_so_apps_can_encode_it() -> None:
    text = decode_path(b"/%FF%FE")
    assert text == "/\ufffd\ufffd"
    assert text.encode("utf-8")  # an app calling path.encode() does not crash


def _environ(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "method": "GET",
        "raw_path": b"/",
        "query": b"",
        "headers": [(b"host", b"example.com")],
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
        "body": io.BytesIO(b""),
    }
    args.update(overrides)
    return build_environ(**args)


def test_environ_passes_wsgiref_validate() -> None:
    environ = _environ(method="POST", raw_path=b"/a%20b", query=b"x=1",
                       headers=[(b"host", b"h"), (b"content-type", b"text/plain"),
                                (b"content-length", b"3"), (b"x-custom", b"v")],
                       body=io.BytesIO(b"abc"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", WSGIWarning)
        check_environ(environ)  # raises AssertionError (or the warning) on any breach


def test_environ_core_keys() -> None:
    body = io.BytesIO(b"")
    environ = _environ(method="PUT", raw_path=b"/items/7", query=b"a=1&b=%20",
                       http_version="1.0", server=("10.0.0.1", 8080),
                       client=("10.0.0.2", 51234), body=body)
    assert environ["REQUEST_METHOD"] == "PUT"
    assert environ["SCRIPT_NAME"] == ""
    assert environ["PATH_INFO"] == "/items/7"
    assert environ["QUERY_STRING"] == "a=1&b=%20"  # the query stays raw
    assert environ["SERVER_NAME"] == "10.0.0.1"
    assert environ["SERVER_PORT"] == "8080"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert environ["REMOTE_ADDR"] == "10.0.0.2"
    assert environ["REMOTE_PORT"] == "51234"
    assert environ["wsgi.version"] == (1, 0)
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["wsgi.input"] is body
    assert environ["wsgi.errors"] is sys.stderr
    assert environ["wsgi.input_terminated"] is True
    assert callable(environ["wsgi.file_wrapper"])


def test_environ_path_info_is_utf8_bytes_as_latin1() -> None:
    # PEP 3333: "native strings" carry the decoded bytes as latin-1
    environ = _environ(raw_path=b"/caf%C3%A9/%2F")
    assert environ["PATH_INFO"] == "/caf\u00c3\u00a9//"
    assert environ["PATH_INFO"].encode("latin-1").decode("utf-8") == "/caf\u00e9//"


def test_environ_invalid_utf8_escapes_keep_their_bytes() -> None:
    environ = _environ(raw_path=b"/%FF")
    assert environ["PATH_INFO"].encode("latin-1") == b"/\xff"


def test_environ_headers() -> None:
    environ = _environ(headers=[
        (b"host", b"example.com"),
        (b"content-type", b"application/json"),
        (b"content-length", b"12"),
        (b"x-forwarded-for", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
        (b"accept", b"text/html"),
        (b"x-latin", b"caf\xe9"),
        (b"x_forwarded_for", b"6.6.6.6"),  # would pose as X-Forwarded-For
    ])
    assert environ["CONTENT_TYPE"] == "application/json"
    assert environ["CONTENT_LENGTH"] == "12"
    assert "HTTP_CONTENT_TYPE" not in environ
    assert "HTTP_CONTENT_LENGTH" not in environ
    assert environ["HTTP_HOST"] == "example.com"
    assert environ["HTTP_X_FORWARDED_FOR"] == "1.1.1.1,2.2.2.2"  # RFC 9110 5.3 list join
    # (and the underscore spelling is dropped rather than merged in)
    assert environ["HTTP_COOKIE"] == "a=1; b=2"  # cookies join with "; " (RFC 6265 5.4)
    assert environ["HTTP_ACCEPT"] == "text/html"
    assert environ["HTTP_X_LATIN"] == "caf\u00e9"  # bytes as latin-1


def test_environ_without_content_headers_has_no_content_keys() -> None:
    environ = _environ()
    assert "CONTENT_TYPE" not in environ
    assert "CONTENT_LENGTH" not in environ


@pytest.mark.parametrize(
    ("root_path", "raw_path", "script_name", "path_info"),
    [
        ("/app", b"/app/x", "/app", "/x"),  # the mount prefix moves to SCRIPT_NAME
        ("/app", b"/app", "/app", ""),
        ("/app", b"/application", "/app", "/application"),  # a prefix of a segment is not it
        ("/app", b"/other", "/app", "/other"),
        ("", b"/x", "", "/x"),
    ],
)
def test_environ_root_path(root_path: str, raw_path: bytes, script_name: str,
                           path_info: str) -> None:
    environ = _environ(root_path=root_path, raw_path=raw_path)
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == (script_name, path_info)


def test_environ_unix_socket_server_and_no_client() -> None:
    environ = _environ(server=("/run/app.sock", None), client=None)
    assert environ["SERVER_NAME"] == "/run/app.sock"
    assert environ["SERVER_PORT"] == ""
    assert environ["REMOTE_ADDR"] == ""
