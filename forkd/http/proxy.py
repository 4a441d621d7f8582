"""What a reverse proxy in front tells us about the client, believed only from peers
in --forwarded-allow-ips. Pure: no I/O.

- `TrustedPeers`: the parsed list (IPs, CIDRs, `*`), with a per-address cache.
- `resolve_forwarded`: the client address, scheme and host from RFC 7239 `Forwarded`
  or from `X-Forwarded-For` / `-Proto` / `-Host`. The chain is walked from the nearest
  hop outwards and stops at the first address that is not a trusted proxy: entries
  further left were written by the client itself and prove nothing.
- `parse_proxy_header`: a PROXY protocol v1 (text) or v2 (binary) header, as HAProxy's
  `send-proxy` / `send-proxy-v2` write it."""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

Address = tuple[str, int]
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PROXY_HEADERS = frozenset((b"forwarded", b"x-forwarded-for", b"x-forwarded-proto",
                           b"x-forwarded-host"))


def parse_allow_list(text: str) -> tuple[str, ...]:
    """`127.0.0.1, 10.0.0.0/8, ::1` -> normalised entries; `*` alone trusts everyone.
    Raises ValueError naming a bad entry."""
    entries = [part.strip() for part in str(text).split(",") if part.strip()]
    for entry in entries:
        if entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address, a CIDR or *") from None
    return tuple(entries)


class TrustedPeers:
    def __init__(self, entries: tuple[str, ...]) -> None:
        self.everyone = "*" in entries
        self.networks: list[_Network] = [ipaddress.ip_network(entry, strict=False)
                                         for entry in entries if entry != "*"]
        self.cache: dict[str, bool] = {}

    def trusts(self, host: str | None) -> bool:
        if self.everyone:
            return True
        if not host:
            return False  # a unix socket peer has no address: only `*` trusts it
        known = self.cache.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                known = False
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                known = any(address in network for network in self.networks)
            if len(self.cache) < 4096:  # bounded: addresses come from the network
                self.cache[host] = known
        return known


@dataclass(frozen=True, slots=True)
class Forwarded:
    client: Address | None  # None: keep the connection's peer
    scheme: str | None
    host: bytes | None


_PAIR = re.compile(r'\s*([A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


def _forwarded_elements(value: str) -> list[dict[str, str]]:
    """RFC 7239 4: `for=1.2.3.4;proto=https, for="[::1]:80"` -> one dict per hop."""
    elements: list[dict[str, str]] = []
    for part in _split_outside_quotes(value, ","):
        pairs: dict[str, str] = {}
        for item in _split_outside_quotes(part, ";"):
            match = _PAIR.fullmatch(item)
            if match is None:
                if item.strip():
                    raise ValueError(f"bad Forwarded pair {item!r}")
                continue
            raw = match.group(2)
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            pairs[match.group(1).lower()] = raw
        elements.append(pairs)
    return elements


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _node(text: str) -> Address | None:
    """A Forwarded `for` node or an X-Forwarded-For entry -> (ip, port); None if it is
    not an address (`unknown`, an obfuscated `_name`)."""
    text = text.strip()
    port = 0
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif text.count(":") == 1:  # IPv4:port (a bare IPv6 has several colons)
        host, _, port_text = text.partition(":")
        if port_text.isdigit():
            port = int(port_text)
    else:
        host = text
    try:
        return (_address(ipaddress.ip_address(host)), port)
    except ValueError:
        return None


_ZONE = re.compile(r"[0-9A-Za-z._-]+")


def _address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address's text; ValueError for an IPv6 one whose zone (`fe80::1%eth0`) is not
    an interface's name or number. ipaddress takes any text after the `%`, quotes, tabs
    and spaces included, and this text becomes the client's address in the app's
    scope and in log lines: a client could write whatever it liked into them."""
    zone = getattr(address, "scope_id", None)
    if zone is not None and not _ZONE.fullmatch(zone):
        raise ValueError(f"bad IPv6 zone {zone!r}")
    return str(address)


def _pick(hops: list[Address | None], trusted: TrustedPeers) -> int | None:
    """Index of the client among hops (nearest last): the first, from the right, that
    is not a trusted proxy; if all are trusted, the leftmost."""
    if not hops:
        return None
    for index in range(len(hops) - 1, -1, -1):
        hop = hops[index]
        if hop is None or not trusted.trusts(hop[0]):
            return index
    return 0


_SCHEMES = frozenset(("http", "https", "ws", "wss"))


def resolve_forwarded(headers: list[tuple[bytes, bytes]], trusted: TrustedPeers) -> Forwarded:
    """Only call for a request from a trusted peer. Malformed values are ignored
    (the connection's own address stands), never an error for the client."""
    forwarded: list[str] = []
    xff: list[str] = []
    proto = host = None
    for name, value in headers:
        if name == b"forwarded":
            forwarded.append(value.decode("latin-1"))
        elif name == b"x-forwarded-for":
            xff.append(value.decode("latin-1"))
        elif name == b"x-forwarded-proto":
            proto = value.decode("latin-1").split(",")[-1].strip().lower()
        elif name == b"x-forwarded-host":
            host = value.split(b",")[-1].strip()
    if forwarded:
        try:
            elements = _forwarded_elements(", ".join(forwarded))
        except ValueError:
            return Forwarded(None, None, None)
        hops = [_node(element.get("for", "")) for element in elements]
        index = _pick(hops, trusted)
        if index is None:
            return Forwarded(None, None, None)
        element = elements[index]
        scheme = element.get("proto", "").lower() or None
        fhost = element.get("host")
        return Forwarded(hops[index], scheme if scheme in _SCHEMES else None,
                         fhost.encode("latin-1") if fhost else None)
    client = None
    if xff:
        hops = [_node(entry) for entry in ",".join(xff).split(",")]
        index = _pick(hops, trusted)
        if index is not None:
            client = hops[index]
    return Forwarded(client, proto if proto in _SCHEMES else None, host or None)


# -- PROXY protocol -------------------------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included (the spec's figure)


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header: the connection is closed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int  # bytes the header took; the HTTP request starts after them
    client: Address | None  # None: LOCAL / UNKNOWN, keep the connection's own peer
    server: Address | None


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """None while more bytes are needed; ProxyHeaderError when it cannot be one."""
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not b"PROXY "[: len(data)] == data[:6]:
        raise ProxyHeaderError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    fields = data[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(end + 2, None, None)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("bad PROXY v1 line")
    try:
        family = ipaddress.IPv4Address if fields[1] == b"TCP4" else ipaddress.IPv6Address
        source = _address(family(fields[2].decode("ascii")))
        dest = _address(family(fields[3].decode("ascii")))
        ports = [int(field) for field in fields[4:6]]
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("bad PROXY v1 addresses") from None
    if not all(0 <= port <= 65535 for port in ports) or any(
            field != str(port).encode() for field, port in zip(fields[4:6], ports, strict=True)):
        raise ProxyHeaderError("bad PROXY v1 port")
    return ProxyHeader(end + 2, (source, ports[0]), (dest, ports[1]))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if V2_SIGNATURE[: len(data)] != data[:12]:
        raise ProxyHeaderError("no PROXY protocol header")
    if len(data) < 16:
        return None
    version_command, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if version_command >> 4 != 2 or version_command & 0xF > 1:
        raise ProxyHeaderError("bad PROXY v2 version or command")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if version_command & 0xF == 0:  # LOCAL: the proxy's own connection (health checks)
        return ProxyHeader(total, None, None)
    body = data[16:total]
    if family == 0x11:  # TCP over IPv4
        if length < 12:
            raise ProxyHeaderError("short PROXY v2 IPv4 addresses")
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        return ProxyHeader(total, (str(ipaddress.IPv4Address(src)), sport),
                           (str(ipaddress.IPv4Address(dst)), dport))
    if family == 0x21:  # TCP over IPv6
        if length < 36:
            raise ProxyHeaderError("short PROXY v2 IPv6 addresses")
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        return ProxyHeader(total, (str(ipaddress.IPv6Address(src)), sport),
                           (str(ipaddress.IPv6Address(dst)), dport))
    if family == 0x00:  # UNSPEC
        return ProxyHeader(total, None, None)
    raise ProxyHeaderError(f"PROXY v2 family {family:#x} is not TCP")
