"""The TLS and WebSocket options: parsing, their pairings, and the worker's ssl context
(made from certificates the test issues with trustme)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from forkd.config import merge
from forkd.errors import AppLoadError, ConfigError
from forkd.tls import server_context


def test_websocket_defaults_follow_the_spec() -> None:
    config = merge("app:app", {}, {}, {})
    assert (config.ws_max_size, config.ws_ping_interval, config.ws_ping_timeout) == (
        16 << 20, 20.0, 20.0)
    assert config.ws_per_message_deflate is True
    assert config.certfile is None


def test_websocket_options_from_flags_env_and_file() -> None:
    config = merge("app:app", {"ws_max_size": "1M"},
                   {"FORKD_WS_PING_INTERVAL": "0", "FORKD_WS_PER_MESSAGE_DEFLATE": "off"},
                   {"ws_ping_timeout": 2.5})
    assert config.ws_max_size == 1 << 20
    assert config.ws_ping_interval == 0.0  # pings off
    assert config.ws_ping_timeout == 2.5
    assert config.ws_per_message_deflate is False


@pytest.mark.parametrize("cli, needle", [
    ({"ws_max_size": "huge"}, "--ws-max-size"),
    ({"ws_ping_timeout": "0"}, "--ws-ping-timeout"),
    ({"ws_ping_interval": "-1"}, "--ws-ping-interval"),
    ({"keyfile": "key.pem"}, "--keyfile: needs --certfile"),
    ({"ca_certs": "ca.pem"}, "--ca-certs: needs --certfile"),
])
def test_bad_tls_and_websocket_values_name_their_flag(cli: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        merge("app:app", cli, {}, {})


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path, ca_path = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return ca, cert_path, key_path, ca_path


def test_no_certfile_no_context() -> None:
    assert server_context(merge("app:app", {}, {}, {})) is None


def test_context_is_tls12_or_later_and_client_certificates_only_with_ca_certs(issued) -> None:
    _, cert_path, key_path, ca_path = issued
    plain = server_context(merge("app:app", {"certfile": str(cert_path),
                                             "keyfile": str(key_path)}, {}, {}))
    assert plain is not None
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_2
    assert plain.verify_mode == ssl.CERT_NONE
    mutual = server_context(merge("app:app", {"certfile": str(cert_path), "keyfile": str(key_path),
                                              "ca_certs": str(ca_path)}, {}, {}))
    assert mutual is not None and mutual.verify_mode == ssl.CERT_REQUIRED


def test_a_key_in_the_certfile_needs_no_keyfile(issued, tmp_path: Path) -> None:
    _, cert_path, key_path, _ = issued
    both = tmp_path / "both.pem"
    both.write_text(key_path.read_text() + cert_path.read_text())
    assert server_context(merge("app:app", {"certfile": str(both)}, {}, {})) is not None


def test_files_that_do_not_load_fail_like_an_app_load_naming_the_file(issued,
                                                                      tmp_path: Path) -> None:
    ca, cert_path, _, ca_path = issued
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    cases = [
        ({"certfile": str(tmp_path / "absent.pem")}, "No such file"),
        ({"certfile": str(cert_path), "keyfile": str(other_key)}, "does not belong"),
        ({"certfile": str(ca_path), "keyfile": str(ca_path)}, "not a PEM"),
    ]
    for cli, why in cases:
        with pytest.raises(AppLoadError, match=why) as failed:
            server_context(merge("app:app", cli, {}, {}))
        assert "--certfile" in str(failed.value)
