"""The pure core: routing, validation and responses, without any I/O."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sample_app import core

ME = core.Identity(pid=4242, worker_id=1)
SID = "A" * 43


def decide(method: str, path: str, **fields: object) -> core.Response | core.Step:
    return core.route(core.Request(method, path, **fields), ME)  # type: ignore[arg-type]


def answer(method: str, path: str, **fields: object) -> core.Response:
    result = decide(method, path, **fields)
    assert isinstance(result, core.Response), result
    return result


def test_root_says_hello_in_plain_text() -> None:
    response = answer("GET", "/")
    assert (response.status, response.body) == (200, b"Hello, world!")
    assert response.content_type is not None and response.content_type.startswith("text/plain")


def test_health_and_whoami() -> None:
    assert json.loads(answer("GET", "/health").body) == {"status": "ok"}
    assert json.loads(answer("GET", "/whoami").body) == {"pid": 4242, "worker_id": 1}
    anonymous = core.route(core.Request("GET", "/whoami"), core.Identity(7, None))
    assert isinstance(anonymous, core.Response)
    assert json.loads(anonymous.body) == {"pid": 7, "worker_id": None}


@pytest.mark.parametrize(
    "path", ["/nope", "/items/", "/items/a/b", "/items/" + "x" * 129, "/Health"]
)
def test_unknown_route_is_404(path: str) -> None:
    response = answer("GET", path)
    assert response.status == 404
    assert "error" in json.loads(response.body)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/", "GET, HEAD"),
        ("DELETE", "/items/a", "GET, HEAD, PUT"),
        ("GET", "/echo", "POST"),
        ("HEAD", "/echo", "POST"),
    ],
)
def test_wrong_method_is_405_with_allow(method: str, path: str, allow: str) -> None:
    response = answer(method, path)
    assert response.status == 405
    assert dict(response.headers)["allow"] == allow


def test_head_keeps_the_length_and_drops_the_body() -> None:
    request = core.Request("HEAD", "/")
    status, headers, body = core.render(request, answer("HEAD", "/"), ME)
    assert (status, body) == (200, b"")
    assert ("content-length", str(len(b"Hello, world!"))) in headers
    assert ("x-served-by", "4242") in headers


def test_echo_returns_body_and_content_type() -> None:
    response = answer("POST", "/echo", body=b"<a/>", content_type="application/xml")
    assert (response.status, response.body, response.content_type) == (
        200,
        b"<a/>",
        "application/xml",
    )
    untyped = answer("POST", "/echo", body=b"\x00\x01")
    assert untyped.content_type == "application/octet-stream"


@pytest.mark.parametrize(("query", "ms"), [("ms=0", 0), ("ms=250", 250), ("ms=999999", 60_000)])
def test_slow_waits_at_most_a_minute(query: str, ms: int) -> None:
    step = decide("GET", "/slow", query=query)
    assert step == core.Sleep(ms, ME)
    assert json.loads(step.done().body)["slept_ms"] == ms


@pytest.mark.parametrize("query", ["", "ms=", "ms=-1", "ms=1.5", "ms=abc", "ms=1&ms=2", "ms=١"])
def test_slow_rejects_a_bad_duration(query: str) -> None:
    assert answer("GET", "/slow", query=query).status == 400


def test_session_step_takes_only_a_well_formed_sid() -> None:
    step = decide("GET", "/session", cookie=f"theme=dark; sid={SID}")
    assert step == core.CountVisit(SID, False, ME)
    for bad in ["sid=short", "sid=" + "A" * 44, "sid=" + "!" * 43, "other=" + SID, ""]:
        assert decide("GET", "/session", cookie=bad) == core.CountVisit(None, False, ME)


def test_new_session_sets_a_safe_cookie_and_known_one_does_not() -> None:
    step = core.CountVisit(None, secure=False, identity=ME)
    fresh = step.done(core.Visit(SID, 1, new=True))
    assert json.loads(fresh.body) == {"count": 1, "pid": 4242}
    cookie = dict(fresh.headers)["set-cookie"]
    assert cookie.startswith(f"sid={SID};")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    again = step.done(core.Visit(SID, 2, new=False))
    assert "set-cookie" not in dict(again.headers)
    secure = core.CountVisit(None, secure=True, identity=ME).done(core.Visit(SID, 1, new=True))
    assert dict(secure.headers)["set-cookie"].endswith("; Secure")


def test_put_item_needs_one_json_value() -> None:
    assert decide("PUT", "/items/a", body=b'{"x": [1, 2]}') == core.WriteItem("a", b'{"x": [1, 2]}')
    for bad in [b"", b"{", b"NaN", b"[Infinity]", b"1 2", b"\xff", b"[" * 100_000]:
        response = answer("PUT", "/items/a", body=bad)
        assert response.status == 400, bad
        assert "JSON" in json.loads(response.body)["error"]


def test_item_steps_answer_404_201_200() -> None:
    read = core.ReadItem("k")
    assert read.done(None).status == 404
    assert (read.done(b"[1]").status, read.done(b"[1]").body) == (200, b"[1]")
    write = core.WriteItem("k", b"[1]")
    assert write.done(created=True).status == 201
    assert dict(write.done(created=True).headers)["location"] == "/items/k"
    assert write.done(created=False).status == 200


def test_body_limit_and_unavailable() -> None:
    assert core.declared_too_large("11", 10) and not core.declared_too_large("10", 10)
    assert not core.declared_too_large(None, 10) and not core.declared_too_large("x", 10)
    assert core.too_large(10).status == 413
    down = core.unavailable("Redis at h:1 is unavailable: refused")
    assert down.status == 503 and dict(down.headers)["retry-after"] == "1"
    assert "Redis" in json.loads(down.body)["error"]


def test_request_from_scope_joins_split_cookies() -> None:
    scope = {
        "method": "GET",
        "path": "/session",
        "query_string": b"a=1",
        "scheme": "https",
        "headers": [(b"cookie", b"a=1"), (b"Cookie", f"sid={SID}".encode())],
    }
    request = core.request_from_scope(scope, b"")
    assert (request.query, request.secure, core.session_id(request.cookie)) == ("a=1", True, SID)


def test_request_from_environ_decodes_the_path() -> None:
    environ = {
        "REQUEST_METHOD": "PUT",
        "PATH_INFO": "/items/é".encode().decode("latin-1"),
        "CONTENT_TYPE": "application/json",
        "HTTP_COOKIE": f"sid={SID}",
        "wsgi.url_scheme": "http",
    }
    request = core.request_from_environ(environ, b"1")
    assert (request.path, request.content_type, request.secure) == (
        "/items/é",
        "application/json",
        False,
    )
    routed = core.route(request, ME)
    assert isinstance(routed, core.Response) and routed.status == 404  # é is not allowed in ids


@given(st.text())
def test_routing_never_raises(path: str) -> None:
    for method in ["GET", "PUT", "POST", "HEAD", "PATCH"]:
        result = core.route(core.Request(method, path, body=b"1"), ME)
        if isinstance(result, core.Response):
            assert result.status in {200, 400, 404, 405}
