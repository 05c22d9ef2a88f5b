"""Destination addresses in the SOCKS5 wire format (RFC 1928, section 5).

The session protocol, SOCKS5 and the UDP datagram header all use the same encoding, so it
lives here once: ``ATYP | ADDR | PORT`` where ATYP is 1 (IPv4, 4 bytes), 3 (domain: one length
byte then the name) or 4 (IPv6, 16 bytes), and PORT is big-endian u16.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from veil.errors import RemoteProtocolError

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

_PORT = struct.Struct("!H")


class NeedMoreData(Exception):
    """Raised by decoders when the buffer ends before the item does."""


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP/UDP destination: an IP literal or a domain name, and a port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port}")
        if not self.host:
            raise ValueError("empty host")

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The host as an IP address, or None when it is a domain name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def encode(self) -> bytes:
        ip = self.ip
        if isinstance(ip, ipaddress.IPv4Address):
            return bytes((ATYP_IPV4,)) + ip.packed + _PORT.pack(self.port)
        if isinstance(ip, ipaddress.IPv6Address):
            return bytes((ATYP_IPV6,)) + ip.packed + _PORT.pack(self.port)
        name = self.host.encode("idna")
        if len(name) > 255:
            raise ValueError("domain name longer than 255 bytes")
        return bytes((ATYP_DOMAIN, len(name))) + name + _PORT.pack(self.port)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Address, int]:
        """Decode one address at ``offset``; return it and the offset just past it.

        Raises NeedMoreData when ``buf`` is too short and RemoteProtocolError when the bytes
        cannot be an address.
        """
        if len(buf) <= offset:
            raise NeedMoreData
        atyp = buf[offset]
        if atyp == ATYP_IPV4:
            end = offset + 1 + 4
            if len(buf) < end + 2:
                raise NeedMoreData
            host = str(ipaddress.IPv4Address(bytes(buf[offset + 1 : end])))
        elif atyp == ATYP_IPV6:
            end = offset + 1 + 16
            if len(buf) < end + 2:
                raise NeedMoreData
            host = str(ipaddress.IPv6Address(bytes(buf[offset + 1 : end])))
        elif atyp == ATYP_DOMAIN:
            if len(buf) < offset + 2:
                raise NeedMoreData
            length = buf[offset + 1]
            end = offset + 2 + length
            if len(buf) < end + 2:
                raise NeedMoreData
            if length == 0:
                raise RemoteProtocolError("empty domain name", code="bad_address")
            try:
                host = bytes(buf[offset + 2 : end]).decode("idna")
            except UnicodeError as exc:
                raise RemoteProtocolError("undecodable domain name", code="bad_address") from exc
        else:
            raise RemoteProtocolError(f"unknown address type {atyp}", code="bad_address")
        (port,) = _PORT.unpack_from(buf, end)
        return cls(host, port), end + 2

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_host_port(text: str, default_port: int | None = None) -> Address:
    """Parse ``host:port``, ``[v6]:port`` or (with a default) a bare host."""
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"unbalanced brackets in {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest.startswith(":"):
            port_text = rest[1:]
        elif rest == "" and default_port is not None:
            port_text = str(default_port)
        else:
            raise ValueError(f"expected [host]:port, got {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.rsplit(":", 1)
    elif text.count(":") > 1:
        raise ValueError(f"IPv6 addresses need brackets: [{text}]:port")
    elif default_port is not None:
        host, port_text = text, str(default_port)
    else:
        raise ValueError(f"expected host:port, got {text!r}")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if not port_text.isdigit():
        raise ValueError(f"bad port in {text!r}")
    return Address(host, int(port_text))
