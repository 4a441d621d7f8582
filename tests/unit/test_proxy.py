"""The proxy layer alone: allow lists, Forwarded / X-Forwarded-* resolution, PROXY
protocol v1 and v2 headers, and the shared health flag across a fork."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkd.config import merge
from forkd.errors import ConfigError
from forkd.http.health import HealthFlag
from forkd.http.proxy import (
    V2_SIGNATURE,
    ProxyHeaderError,
    TrustedPeers,
    parse_allow_list,
    parse_proxy_header,
    resolve_forwarded,
)

LOCAL = TrustedPeers(("127.0.0.1", "10.0.0.0/8", "::1"))


def test_allow_list_parsing_and_matching() -> None:
    assert parse_allow_list(" 127.0.0.1 , 10.0.0.0/8,::1 ") == ("127.0.0.1", "10.0.0.0/8", "::1")
    assert LOCAL.trusts("10.1.2.3") and LOCAL.trusts("::1") and LOCAL.trusts("::ffff:127.0.0.1")
    assert not LOCAL.trusts("11.0.0.1") and not LOCAL.trusts("") and not LOCAL.trusts(None)
    assert not LOCAL.trusts("not-an-ip")
    assert TrustedPeers(("*",)).trusts("203.0.113.9")
    with pytest.raises(ValueError, match="'10.0.0.300'"):
        parse_allow_list("127.0.0.1,10.0.0.300")


def test_bad_allow_list_names_the_option() -> None:
    with pytest.raises(ConfigError, match="--forwarded-allow-ips"):
        merge("a:b", {"forwarded_allow_ips": "localhost"}, {}, {})
    config = merge("a:b", {}, {"FORKD_FORWARDED_ALLOW_IPS": "*"}, {})
    assert config.forwarded_allow_ips == ("*",)


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def test_x_forwarded_for_takes_the_first_untrusted_hop_from_the_right() -> None:
    # the client wrote "6.6.6.6" itself; 203.0.113.7 is what our proxy 10.0.0.2 saw
    result = resolve_forwarded(h(("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.2"),
                                 ("x-forwarded-proto", "https")), LOCAL)
    assert result.client == ("203.0.113.7", 0)
    assert result.scheme == "https"


def test_all_trusted_hops_give_the_leftmost() -> None:
    result = resolve_forwarded(h(("x-forwarded-for", "10.0.0.5"), ("x-forwarded-for", "10.0.0.6")),
                               LOCAL)
    assert result.client == ("10.0.0.5", 0)


def test_forwarded_rfc7239_with_quotes_ports_and_ipv6() -> None:
    value = 'for="[2001:db8::1]:4711";proto=https;host="example.com:8443", for=10.0.0.2'
    result = resolve_forwarded(h(("forwarded", value)), LOCAL)
    assert result.client == ("2001:db8::1", 4711)
    assert result.scheme == "https" and result.host == b"example.com:8443"


def test_forwarded_wins_over_x_forwarded() -> None:
    result = resolve_forwarded(h(("x-forwarded-for", "198.51.100.1"),
                                 ("forwarded", "for=192.0.2.60;proto=http")), LOCAL)
    assert result.client == ("192.0.2.60", 0) and result.scheme == "http"


@pytest.mark.parametrize("headers", [
    h(("forwarded", 'for="unclosed')), h(("forwarded", "for=unknown")),
    h(("x-forwarded-for", "garbage")), h(("x-forwarded-proto", "gopher")),
    h(("forwarded", "for;;=,,")),
])
def test_malformed_values_change_nothing(headers: list[tuple[bytes, bytes]]) -> None:
    result = resolve_forwarded(headers, LOCAL)
    assert result.client is None and result.scheme is None


BAD_ZONES = ['fe80::1%a","pid":999,"slot":7,"y":"', "fe80::1%a\tb", "fe80::1%a b",
             "fe80::1%a\\b", "fe80::1%\u00e9", 'fe80::1%a"b']


@pytest.mark.parametrize("zone", BAD_ZONES)
def test_an_ipv6_zone_that_is_no_interface_name_is_no_address(zone: str) -> None:
    """ipaddress takes any text after an IPv6 address's `%`; the client's address goes
    into the app's scope and the access log as it is, so a forwarded address with a
    zone that is no interface name or number is ignored, as any other malformed one."""
    quoted = zone.replace("\\", "\\\\").replace('"', '\\"')
    for headers in (h(("forwarded", f'for="[{quoted}]:80"')),
                    h(("forwarded", f'for="[{quoted}]"')),
                    h(("x-forwarded-for", zone.replace(",", ";")))):
        assert resolve_forwarded(headers, LOCAL).client is None, headers
    if " " not in zone:  # (a space ends a PROXY v1 field)
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(b"PROXY TCP6 " + zone.encode() + b" ::1 1 2\r\n")
    sane = 'for="[fe80::1%eth0.5_a-b]:80"'  # an interface's name or number is kept
    assert resolve_forwarded(h(("forwarded", sane)), LOCAL).client == ("fe80::1%eth0.5_a-b", 80)
    assert resolve_forwarded(h(("x-forwarded-for", "fe80::1%2")), LOCAL).client == (
        "fe80::1%2", 0)


@given(st.binary(max_size=200), st.binary(max_size=200))
def test_forwarded_never_raises(forwarded: bytes, xff: bytes) -> None:
    resolve_forwarded([(b"forwarded", forwarded), (b"x-forwarded-for", xff)], LOCAL)


# -- PROXY protocol ------------------------------------------------------------------

def test_v1_tcp4_and_tcp6() -> None:
    data = b"PROXY TCP4 198.51.100.22 203.0.113.7 35646 80\r\nGET / HTTP/1.1\r\n"
    header = parse_proxy_header(data)
    assert header is not None and data[header.length:].startswith(b"GET")
    assert header.client == ("198.51.100.22", 35646) and header.server == ("203.0.113.7", 80)
    header = parse_proxy_header(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n")
    assert header is not None and header.client == ("2001:db8::1", 1)
    header = parse_proxy_header(b"PROXY UNKNOWN\r\n")
    assert header is not None and header.client is None and header.length == 15


def test_v1_needs_more_until_the_line_ends() -> None:
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    for cut in range(1, len(line)):
        assert parse_proxy_header(line[:cut]) is None


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", b"PROXY TCP4 ::1 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY " + b"x" * 200, b"proxy TCP4",
])
def test_v1_refusals(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes((0x20 | command, family)) + struct.pack("!H", len(body)) + body


def test_v2_ipv4_ipv6_local_and_tlvs() -> None:
    body = socket.inet_aton("192.0.2.1") + socket.inet_aton("192.0.2.2") + struct.pack("!HH", 5, 80)
    tlv = b"\x04\x00\x02ok"  # a TLV after the addresses is skipped
    data = v2(1, 0x11, body + tlv) + b"GET"
    header = parse_proxy_header(data)
    assert header is not None and header.client == ("192.0.2.1", 5)
    assert data[header.length:] == b"GET"
    six = socket.inet_pton(socket.AF_INET6, "2001:db8::7") * 2 + struct.pack("!HH", 9, 443)
    header = parse_proxy_header(v2(1, 0x21, six))
    assert header is not None and header.client == ("2001:db8::7", 9)
    header = parse_proxy_header(v2(0, 0x00, b""))  # LOCAL: HAProxy's own health check
    assert header is not None and header.client is None
    whole = v2(1, 0x11, body)
    for cut in range(1, len(whole)):
        assert parse_proxy_header(whole[:cut]) is None


@pytest.mark.parametrize("data", [
    V2_SIGNATURE[:5] + b"x", v2(1, 0x12, b"\x00" * 12), v2(1, 0x11, b"\x00" * 4),
    V2_SIGNATURE + b"\x31\x11\x00\x00", V2_SIGNATURE + b"\x2f\x11\x00\x00",
])
def test_v2_refusals(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


@given(st.binary(max_size=300))
def test_proxy_header_parser_never_raises_anything_else(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if header is not None:
        assert 0 < header.length <= len(data)


@pytest.mark.timeout(10)
def test_health_flag_raised_in_the_primary_is_seen_by_a_forked_worker() -> None:
    flag = HealthFlag()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: report once it sees the flag
        code = 1
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if flag.failing:
                    code = 0
                    break
                time.sleep(0.005)
            os.write(writer, b"x")
        finally:
            os._exit(code)
    try:
        os.close(writer)
        assert not flag.failing
        flag.fail()
        os.read(reader, 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the worker never saw the flag"
        flag.clear()
        assert not flag.failing
    finally:
        os.close(reader)


def test_new_http_options_from_file_env_and_flags() -> None:
    config = merge("a:b", {"health_path": "/healthz", "limit_concurrency": "50"},
                   {"FORKD_PROXY_PROTOCOL": "1"},
                   {"forwarded_allow_ips": ["10.0.0.0/8", "127.0.0.1"]})
    assert config.forwarded_allow_ips == ("10.0.0.0/8", "127.0.0.1")
    assert (config.health_path, config.limit_concurrency, config.proxy_protocol) == (
        "/healthz", 50, True)
    for bad in ("healthz", "/a b", "/a?b"):
        with pytest.raises(ConfigError, match="--health-path"):
            merge("a:b", {"health_path": bad}, {}, {})
    with pytest.raises(ConfigError, match="--limit-concurrency"):
        merge("a:b", {"limit_concurrency": "-1"}, {}, {})
