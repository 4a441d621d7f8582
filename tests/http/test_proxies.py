"""Behind a proxy, and under overload: --forwarded-allow-ips (ASGI and WSGI),
--proxy-protocol with a real HAProxy (Debian's package) sending v1 and v2,
--health-path, --limit-concurrency and the body-read timeout. Loopback only: the
frontend, the client and forkd sit on different 127.x addresses, so the address the
app reports proves which header was believed."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpkit import Conn, Response, Served

from support import Forkd, wait_until

pytestmark = pytest.mark.integration


def fetch(port: int, path: str, headers: bytes = b"", source: str | None = None,
          host: str = "127.0.0.1") -> Response:
    sock = socket.create_connection((host, port), timeout=5,
                                    source_address=(source, 0) if source else None)
    with Conn(sock) as conn:
        conn.send(f"GET {path} HTTP/1.1\r\nHost: test\r\n".encode() + headers + b"\r\n")
        return conn.read_response()


FORWARDED = (b"X-Forwarded-For: 6.6.6.6, 203.0.113.9\r\nX-Forwarded-Proto: https\r\n"
             b"X-Forwarded-Host: shop.example\r\n")


@pytest.fixture(scope="module")
def asgi(serve) -> Served:
    return serve("http_asgi_probe:app", "--forwarded-allow-ips", "127.0.0.1",
                 "--health-path", "/healthz", "--header-timeout", "1")


@pytest.fixture(scope="module")
def wsgi(serve) -> Served:
    return serve("http_wsgi_validate:app", "--forwarded-allow-ips", "127.0.0.0/30")


def test_asgi_believes_a_trusted_proxy(asgi: Served) -> None:
    scope = fetch(asgi.port, "/scope", FORWARDED).json()
    assert scope["client"] == ["203.0.113.9", 0]
    assert scope["scheme"] == "https"
    headers = {name["bytes"]: value["bytes"] for name, value in scope["headers"]}
    assert headers["host"] == "shop.example"
    assert headers["x-forwarded-for"] == "6.6.6.6, 203.0.113.9"  # passed on as it came


def test_asgi_ignores_an_untrusted_peer(asgi: Served) -> None:
    scope = fetch(asgi.port, "/scope", FORWARDED, source="127.0.0.2").json()
    assert scope["client"][0] == "127.0.0.2"
    assert scope["scheme"] == "http"
    headers = {name["bytes"]: value["bytes"] for name, value in scope["headers"]}
    assert headers["host"] == "test" and headers["x-forwarded-proto"] == "https"


def test_wsgi_believes_trusted_and_ignores_untrusted(wsgi: Served) -> None:
    environ = fetch(wsgi.port, "/environ", b"Forwarded: for=192.0.2.60;proto=https\r\n",
                    source="127.0.0.2").json()
    assert (environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]) == ("192.0.2.60", "https")
    environ = fetch(wsgi.port, "/environ", b"Forwarded: for=192.0.2.60;proto=https\r\n",
                    source="127.0.0.5").json()
    assert (environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]) == ("127.0.0.5", "http")
    assert environ["HTTP_FORWARDED"] == "for=192.0.2.60;proto=https"


def test_wsgi_client_and_scheme_follow_each_request_of_a_kept_alive_connection(
        wsgi: Served) -> None:
    # (the environ keys of a connection are kept between its requests: a proxy's
    # word for one request must not stay for the next)
    asked = [(b"Forwarded: for=192.0.2.60;proto=https\r\n", ("192.0.2.60", "https")),
             (b"", ("127.0.0.2", "http")),
             (b"X-Forwarded-For: 192.0.2.61\r\n", ("192.0.2.61", "http")),
             (b"X-Forwarded-For: 192.0.2.61\r\n", ("192.0.2.61", "http")),
             (b"", ("127.0.0.2", "http"))]
    sock = socket.create_connection(("127.0.0.1", wsgi.port), timeout=5,
                                    source_address=("127.0.0.2", 0))
    with Conn(sock) as conn:
        seen = []
        for headers, _ in asked:
            conn.send(b"GET /environ HTTP/1.1\r\nHost: test\r\n" + headers + b"\r\n")
            environ = conn.read_response().json()
            seen.append((environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]))
    assert seen == [expected for _, expected in asked]


def test_wsgi_scheme_alone_follows_each_request_of_a_kept_alive_connection(
        wsgi: Served) -> None:
    """The scheme half of the connection's environ key: the same client, its
    proxy's https for one request only."""
    sock = socket.create_connection(("127.0.0.1", wsgi.port), timeout=5,
                                    source_address=("127.0.0.2", 0))
    with Conn(sock) as conn:
        seen = []
        for headers in (b"X-Forwarded-Proto: https\r\n", b""):
            conn.send(b"GET /environ HTTP/1.1\r\nHost: test\r\n" + headers + b"\r\n")
            environ = conn.read_response().json()
            seen.append((environ["REMOTE_ADDR"], environ["wsgi.url_scheme"]))
    assert seen == [("127.0.0.2", "https"), ("127.0.0.2", "http")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["always", "never"])  # inline, threaded
def test_wsgi_an_apps_changes_to_its_environ_stay_in_its_request(serve, mode: str) -> None:
    """Each request of a kept-alive connection starts from the connection's environ
    keys: what the app added, changed or removed on one is gone on the next."""
    served = serve("http_wsgi_validate:app", "--wsgi-inline", mode)
    with Conn.open(served.port) as conn:
        conn.send(b"GET /environ HTTP/1.1\r\nHost: test\r\n\r\n")
        before = conn.read_response().json()
        conn.send(b"GET /environ-mutate HTTP/1.1\r\nHost: test\r\n\r\n")
        assert conn.read_response().body == b"mutated"
        conn.send(b"GET /environ HTTP/1.1\r\nHost: test\r\n\r\n")
        after = conn.read_response().json()
    assert "app.mark" not in after
    assert (after["SERVER_NAME"], after["REMOTE_ADDR"]) == ("127.0.0.1", "127.0.0.1")
    assert after == before


def test_health_path_is_forkds_and_not_the_apps(asgi: Served) -> None:
    response = fetch(asgi.port, "/healthz")
    assert (response.status, response.body) == (200, b"ready\n")
    assert response.header("cache-control") == "no-store"
    assert fetch(asgi.port, "/healthz/x").status == 200 and "path" in fetch(
        asgi.port, "/healthz/x").json()  # only the exact path is forkd's


@pytest.mark.timeout(20)
def test_stalled_body_gets_408_and_the_worker_lives(asgi: Served) -> None:
    pid = asgi.pid()
    with Conn.open(asgi.port, timeout=6) as conn:
        started = time.monotonic()
        conn.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        response = conn.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 408 and response.closes
        assert conn.server_closed()
    assert 0.9 <= elapsed <= 3.5, f"cut after {elapsed:.2f}s with --header-timeout 1"
    assert asgi.pid() == pid


def _start(tmp_path: Path, *args: str) -> tuple[Forkd, int]:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    proc = Forkd([*args, "-b", "127.0.0.1:0", "-w", "1"], home, tmp_path / "forkd.log")
    port = proc.port()
    proc.wait_ready(1)
    return proc, port


@pytest.mark.timeout(30)
def test_health_turns_503_while_the_worker_drains(tmp_path: Path) -> None:
    proc, port = _start(tmp_path, "http_asgi_probe:app", "--health-path", "/healthz",
                        "--graceful-timeout", "10")
    try:
        with Conn.open(port, timeout=8) as conn:
            conn.send(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
            assert conn.read_response().status == 200  # the connection is the worker's now
            conn.send(b"GET /slow?ms=2000 HTTP/1.1\r\nHost: t\r\n\r\n"
                      b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            proc.signal(signal.SIGTERM)
            assert conn.read_response().body == b"slow 2000"
            health = conn.read_response()
            assert (health.status, health.body) == (503, b"draining\n")
            assert health.closes
        assert proc.wait(15) == 0
    finally:
        proc.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("app", ["http_asgi_probe:app", "http_wsgi_validate:app"])
def test_limit_concurrency_sheds_with_503_and_stays_responsive(tmp_path: Path,
                                                               app: str) -> None:
    proc, port = _start(tmp_path, app, "--limit-concurrency", "2")
    held: list[socket.socket] = []
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /slow?ms=4000 HTTP/1.1\r\nHost: t\r\n\r\n")
            held.append(sock)

        def shed() -> Response | None:
            started = time.monotonic()
            response = fetch(port, "/pid")
            if response.status == 503:
                assert time.monotonic() - started < 1.0, "the 503 was not immediate"
                return response
            return None

        response = wait_until(shed, 3, message=proc.describe)
        assert response.header("retry-after") == "1"
        for sock in held:
            with Conn(sock) as conn:
                assert conn.read_response().body == b"slow 4000"
        assert fetch(port, "/pid").status == 200
    finally:
        for sock in held:
            sock.close()
        proc.stop()


# -- PROXY protocol through a real HAProxy ------------------------------------------------

def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("haproxy is not installed (scripts/test installs Debian's haproxy)")
    base = tmp_path_factory.mktemp("haproxy")
    home = base / "home"
    home.mkdir(mode=0o700)
    proc = Forkd(["http_asgi_probe:app", "-b", "127.0.0.1:0", "-w", "1", "--proxy-protocol",
                  "--forwarded-allow-ips", "127.0.0.1"], home, base / "forkd.log")
    haproxy_proc = None
    log = open(base / "haproxy.log", "wb")  # noqa: SIM115 - closed below
    try:
        backend = proc.port()
        proc.wait_ready(1)
        ports = {"v1": _free_port("127.0.0.3"), "v2": _free_port("127.0.0.3"), "forkd": backend}
        config = base / "haproxy.cfg"
        config.write_text(f"""
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend v1
    bind 127.0.0.3:{ports["v1"]}
    default_backend forkd_v1
frontend v2
    bind 127.0.0.3:{ports["v2"]}
    default_backend forkd_v2
backend forkd_v1
    server forkd 127.0.0.1:{backend} send-proxy
backend forkd_v2
    server forkd 127.0.0.1:{backend} send-proxy-v2
""")
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True,
                               text=True, timeout=10)
        assert check.returncode == 0, check.stdout + check.stderr
        haproxy_proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.3", ports["v2"]), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(listening, 10, message=lambda: (base / "haproxy.log").read_text())
        yield ports
    finally:
        if haproxy_proc is not None:
            haproxy_proc.terminate()
            try:
                haproxy_proc.wait(5)
            except subprocess.TimeoutExpired:
                haproxy_proc.kill()
                haproxy_proc.wait(5)
        log.close()
        proc.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_proxy_protocol_carries_the_client(haproxy: dict[str, int],
                                                   version: str) -> None:
    # the client's own X-Forwarded-For is not believed: the client is not a trusted proxy
    for _ in range(3):  # and on several connections
        scope = fetch(haproxy[version], "/scope", b"X-Forwarded-For: 6.6.6.6\r\n",
                      source="127.0.0.4", host="127.0.0.3").json()
        assert scope["client"][0] == "127.0.0.4"
        assert scope["server"] == ["127.0.0.3", haproxy[version]]


@pytest.mark.timeout(30)
def test_proxy_protocol_refuses_what_has_no_valid_header(haproxy: dict[str, int]) -> None:
    port = haproxy["forkd"]
    # a trusted peer without the header, and an untrusted one: both closed unanswered
    for source, data in (("127.0.0.1", b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"),
                         ("127.0.0.2", b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\nGET / HTTP/1.1\r\n"
                                       b"Host: t\r\n\r\n")):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                        source_address=(source, 0))
        with Conn(sock) as conn:
            try:
                conn.send(data)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert conn.read_to_eof() == b""
    # a direct, valid header from a trusted peer works, and so does the worker
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    with Conn(sock) as conn:
        conn.send(b"PROXY TCP4 198.51.100.7 127.0.0.1 4000 80\r\n"
                  b"GET /scope HTTP/1.1\r\nHost: t\r\n\r\n")
        assert conn.read_response().json()["client"] == ["198.51.100.7", 4000]

