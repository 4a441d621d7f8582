"""Both apps in-process on the default SQLite store: same routes, same answers.

The ASGI app is driven through scope/receive/send (with lifespan), the WSGI app through
wsgiref's validator, which also checks that it keeps PEP 3333.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sample_harness import AsgiClient, Reply, WsgiClient

from sample_app.asgi import ASGIApp
from sample_app.wsgi import WSGIApp

Client = AsgiClient | WsgiClient


def make_client(kind: str, env: dict[str, str]) -> Client:
    return AsgiClient(ASGIApp(env)) if kind == "asgi" else WsgiClient(WSGIApp(env))


@pytest.fixture(params=["asgi", "wsgi"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Client]:
    env = {"SAMPLE_APP_DB": str(tmp_path / "s.db"), "SAMPLE_APP_MAX_BODY": "1024"}
    app_client = make_client(request.param, env)
    assert app_client.start()["type"] == "lifespan.startup.complete"
    yield app_client
    app_client.stop()


def test_simple_routes(client: Client) -> None:
    hello = client.request("GET", "/")
    assert (hello.status, hello.body) == (200, b"Hello, world!")
    assert hello.header(
        "content-type",
    ).startswith("text/plain")  # type: ignore[union-attr]
    assert client.request("GET", "/health").json() == {"status": "ok"}
    whoami = client.request("GET", "/whoami").json()
    assert whoami["worker_id"] is None and isinstance(whoami["pid"], int)
    head = client.request("HEAD", "/")
    assert (head.status, head.body, head.header("content-length")) == (200, b"", "13")


def test_errors(client: Client) -> None:
    assert client.request("GET", "/missing").status == 404
    wrong = client.request("DELETE", "/items/a")
    assert (wrong.status, wrong.header("allow")) == (405, "GET, HEAD, PUT")
    assert client.request("GET", "/slow", query="ms=soon").status == 400
    invalid = client.request("PUT", "/items/a", body=b"{nope")
    assert invalid.status == 400 and "JSON" in invalid.json()["error"]


def test_oversized_bodies_are_413(client: Client) -> None:
    declared = client.request("POST", "/echo", body=b"x" * 1025)
    assert declared.status == 413
    streamed = client.request("POST", "/echo", chunks=[b"x" * 600, b"x" * 600])
    assert streamed.status == 413
    fits = client.request("POST", "/echo", chunks=[b"x" * 512, b"y" * 512])
    assert (fits.status, len(fits.body)) == (200, 1024)


def test_echo_and_slow(client: Client) -> None:
    echo = client.request(
        "POST", "/echo", body=b'{"a":1}', headers=[("content-type", "application/json")]
    )
    assert (echo.status, echo.body, echo.header("content-type")) == (
        200,
        b'{"a":1}',
        "application/json",
    )
    slow = client.request("GET", "/slow", query="ms=20")
    assert slow.status == 200 and slow.json()["slept_ms"] == 20


def test_session_cookie_and_counter(client: Client) -> None:
    first = client.request("GET", "/session")
    assert first.json()["count"] == 1
    set_cookie = first.header("set-cookie") or ""
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    cookie = first.cookie()
    assert cookie is not None
    replies = [client.request("GET", "/session", headers=[("cookie", cookie)]) for _ in range(3)]
    assert [r.json()["count"] for r in replies] == [2, 3, 4]
    assert all(r.header("set-cookie") is None for r in replies)
    stranger = client.request("GET", "/session", headers=[("cookie", "sid=" + "Z" * 43)])
    assert stranger.json()["count"] == 1 and stranger.cookie() not in (None, "sid=" + "Z" * 43)


def test_items_round_trip(client: Client) -> None:
    assert client.request("GET", "/items/k").status == 404
    created = client.request("PUT", "/items/k", body=b'{"n": 1}')
    assert (created.status, created.header("location")) == (201, "/items/k")
    assert client.request("GET", "/items/k").body == b'{"n": 1}'
    replaced = client.request("PUT", "/items/k", body=b"[2]")
    assert replaced.status == 200
    got = client.request("GET", "/items/k")
    assert (got.status, got.body, got.header("content-type")) == (200, b"[2]", "application/json")


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_bad_settings_fail_startup_with_the_variable_named(kind: str, tmp_path: Path) -> None:
    env = {"SAMPLE_APP_DB": str(tmp_path / "s.db"), "FORKD_WORKERS": "zero"}
    if kind == "asgi":
        client = AsgiClient(ASGIApp(env))
        answer = client.start()
        client.stop()
        assert answer["type"] == "lifespan.startup.failed"
        assert "FORKD_WORKERS" in answer["message"]
    else:
        with pytest.raises(ValueError, match="FORKD_WORKERS"):
            WsgiClient(WSGIApp(env)).request("GET", "/")


def test_asgi_opens_on_first_request_without_lifespan(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    client = AsgiClient(ASGIApp({"SAMPLE_APP_DB": str(db)}))
    try:
        assert not db.exists()
        reply: Reply = client.request("GET", "/session")
        assert reply.json()["count"] == 1 and db.exists()
    finally:
        client.run(client.app.aclose())
        client.stop()


def test_importing_the_apps_opens_nothing() -> None:
    # forkd --preload imports the app in the primary before forking: nothing may be open yet.
    import sample_app.asgi
    import sample_app.wsgi

    assert sample_app.asgi.app.store is None
    assert sample_app.wsgi.app.store is None


def test_worker_id_comes_from_forkd(tmp_path: Path) -> None:
    env = {"SAMPLE_APP_DB": str(tmp_path / "s.db"), "FORKD_WORKER_ID": "3"}
    client = WsgiClient(WSGIApp(env))
    try:
        assert json.loads(client.request("GET", "/whoami").body)["worker_id"] == 3
    finally:
        client.stop()
