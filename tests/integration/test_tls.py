"""TLS on the listeners with certificates made by the test (trustme): HTTPS and WSS,
ALPN, mutual TLS, a plain-HTTP client on the TLS port, a renewed certificate served
after `forkd reload`, and a certificate that does not load failing a reload."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme
from websockets.sync.client import connect

from support import Forkd, forkd_cli, raw_exchange, wait_until

pytestmark = pytest.mark.integration


class Certs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_path = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.cert_path = folder / "cert.pem"
        self.key_path = folder / "key.pem"
        self.issue()

    def issue(self) -> bytes:
        """A new server certificate over the same files; returns its DER form."""
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        cert.cert_chain_pems[0].write_to_path(str(self.cert_path))
        cert.private_key_pem.write_to_path(str(self.key_path))
        return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())

    def client_context(self, with_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if with_cert:
            self.ca.issue_cert("client@example.test").configure_cert(context)
        return context


def https_get(port: int, context: ssl.SSLContext, path: str = "/") -> tuple[int, dict]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def peer_certificate(port: int, context: ssl.SSLContext) -> tuple[bytes, str | None, str]:
    """(the server's certificate as DER, the ALPN protocol chosen, the TLS version)."""
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der, tls.selected_alpn_protocol(), str(tls.version())


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    folder = tmp_path / "tls"
    folder.mkdir()
    return Certs(folder)


def start_tls(run_forkd, certs: Certs, *extra: str) -> tuple[Forkd, int]:
    proc = run_forkd("ws_app:app", "-b", "127.0.0.1:0", "-w", "1", "--graceful-timeout", "2",
                     "--certfile", str(certs.cert_path), "--keyfile", str(certs.key_path),
                     *extra)
    port = proc.port()
    proc.wait_ready(1)
    return proc, port


@pytest.mark.timeout(60)
def test_https_and_wss_with_alpn(run_forkd, certs: Certs) -> None:
    proc, port = start_tls(run_forkd, certs)
    context = certs.client_context()
    status, body = https_get(port, context)
    assert (status, body["scheme"]) == (200, "https")
    _, alpn, version = peer_certificate(port, certs.client_context())
    assert alpn == "http/1.1"
    assert version in ("TLSv1.2", "TLSv1.3")
    with connect(f"wss://127.0.0.1:{port}/scope", ssl=context, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=5))["scheme"] == "wss"
        ws.send(b"\x00" * 200_000)
        assert ws.recv(timeout=10) == b"\x00" * 200_000


@pytest.mark.timeout(60)
def test_plain_http_on_the_tls_port_is_closed_and_the_worker_lives(run_forkd,
                                                                   certs: Certs) -> None:
    proc, port = start_tls(run_forkd, certs)
    pid = https_get(port, certs.client_context())[1]["pid"]
    started = time.monotonic()
    answer = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=8)
    assert time.monotonic() - started < 5, "the server left a plain-HTTP client hanging"
    assert b"HTTP/1.1" not in answer
    assert https_get(port, certs.client_context())[1]["pid"] == pid


@pytest.mark.timeout(60)
def test_mutual_tls_refuses_a_client_without_certificate(run_forkd, certs: Certs) -> None:
    proc, port = start_tls(run_forkd, certs, "--ca-certs", str(certs.ca_path))
    status, body = https_get(port, certs.client_context(with_cert=True))
    assert status == 200
    # no response at all: the handshake fails (TLS 1.2) or the server drops the
    # connection at the client's first bytes (TLS 1.3); either is an OSError to a client
    with pytest.raises(OSError):
        https_get(port, certs.client_context(with_cert=False))
    assert https_get(port, certs.client_context(with_cert=True))[1]["pid"] == body["pid"]


@pytest.mark.timeout(90)
def test_reload_serves_a_renewed_certificate_and_a_bad_one_aborts(run_forkd,
                                                                 certs: Certs) -> None:
    first = ssl.PEM_cert_to_DER_cert(certs.cert_path.read_text())
    proc, port = start_tls(run_forkd, certs)
    assert peer_certificate(port, certs.client_context())[0] == first
    renewed = certs.issue()
    assert renewed != first
    # the running worker read its files at start: still the first certificate
    assert peer_certificate(port, certs.client_context())[0] == first
    result = forkd_cli(proc.env, "reload")
    assert result.returncode == 0, result.stdout + result.stderr + proc.describe()
    assert peer_certificate(port, certs.client_context())[0] == renewed

    pid = https_get(port, certs.client_context())[1]["pid"]
    certs.cert_path.write_text("not a certificate\n")
    result = forkd_cli(proc.env, "reload")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--certfile" in result.stdout + result.stderr, result.stdout + result.stderr
    # the old worker keeps serving with the certificate it loaded
    assert https_get(port, certs.client_context())[1]["pid"] == pid
    assert peer_certificate(port, certs.client_context())[0] == renewed


@pytest.mark.timeout(60)
def test_start_with_a_missing_key_fails_at_once_naming_it(run_forkd, certs: Certs) -> None:
    missing = certs.folder / "missing-key.pem"
    proc = run_forkd("ws_app:app", "-b", "127.0.0.1:0", "-w", "1",
                     "--certfile", str(certs.cert_path), "--keyfile", str(missing))
    wait_until(lambda: proc.proc.poll() is not None, 30, message=proc.describe)
    assert proc.proc.returncode == 2, proc.describe()
    assert f"--keyfile {missing}: No such file or directory" in proc.output(), proc.describe()
    assert "event=worker-started" not in proc.output()
