"""The lab counts a failed request as failed: hey's summary is read right, so a lab
test's "0 failed" can fail."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lab import finish_hey, start_hey

pytestmark = pytest.mark.integration  # runs haproxy, nginx or hey


def test_refused_connections_count_as_failed() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = finish_hey(start_hey(f"http://127.0.0.1:{port}/", 1, concurrency=2), timeout=30)
    assert result.total > 0
    assert result.failed == result.total
    assert all("connection refused" in error for error in result.errors)


class Flaky(BaseHTTPRequestHandler):
    """Every third request answers 503."""

    count = 0
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        with Flaky.lock:
            Flaky.count += 1
            status = 503 if Flaky.count % 3 == 0 else 200
        self.send_response(status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_error_statuses_count_as_failed(flaky_server: int) -> None:
    result = finish_hey(start_hey(f"http://127.0.0.1:{flaky_server}/", 1, concurrency=2),
                        timeout=30)
    assert set(result.responses) == {200, 503}
    assert result.failed == result.responses[503] > 0
    assert result.total == result.responses[200] + result.responses[503]
