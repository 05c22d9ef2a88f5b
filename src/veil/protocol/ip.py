"""IP streams: the full-device tunnel's wire formats (docs/protocol.md, "IP streams").

A client in TUN mode opens one stream of kind :attr:`StreamKind.IP`. The server answers with
one :class:`IpConfig` message as the stream's DATA (the addresses it assigned, the MTU and the
resolvers to use); from then on DATAGRAM frames on the stream carry IP packets both ways, each
behind a 10-byte offload header (:class:`GsoHeader`). Only this module knows these layouts;
nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from veil.protocol.address import NeedMoreData
from veil.protocol.frames import MAX_DATAGRAM_PAYLOAD, MAX_IP_PACKET

IPv4Interface = ipaddress.IPv4Interface
IPv6Interface = ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CONFIG_VERSION = 1
# length (u16) | version | mtu (u16) | v4 prefix | v4 address | v6 prefix | v6 address | n dns
# | dns (family u8 + address)... | n routes (u8) | routes (family u8 + prefix u8 + address)...
# The routes came later: a config without them ends after the resolvers, and a client that
# does not know them skips them (bytes after the known fields).
_CONFIG_FIXED = struct.Struct("!HBHB4sB16sB")
# A config message is small; a larger one is a broken or hostile server.
MAX_CONFIG_SIZE = 1024
# Routes one config may carry: a site gateway's view of the other sites' subnets. 40 IPv6
# routes (18 bytes each), 8 resolvers and the fixed part (883 bytes) fit MAX_CONFIG_SIZE.
MAX_ROUTES = 40
# The MTU range a tunnel may use: IPv6 needs 1280; a TSO super-packet is never above 64 KiB.
MIN_MTU = 1280
MAX_MTU = 65_535

# The offload header in front of every packet is Linux's struct virtio_net_hdr (as read and
# written with IFF_VNET_HDR), fixed to little-endian on the wire: a Linux peer reads and writes
# it as it is; anybody else writes zeros (a plain packet) and segments GSO packets itself.
GSO_HEADER = struct.Struct("<BBHHHH")
GSO_HEADER_SIZE = GSO_HEADER.size  # 10
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
GSO_F_NEEDS_CSUM = 1
GSO_F_DATA_VALID = 2
PLAIN_HEADER = bytes(GSO_HEADER_SIZE)
MAX_IP_DATAGRAM = GSO_HEADER_SIZE + MAX_IP_PACKET
assert MAX_IP_DATAGRAM <= MAX_DATAGRAM_PAYLOAD  # the frame limit admits a super-packet whole


@dataclass(frozen=True, slots=True)
class GsoHeader:
    """The offload header of one packet (virtio_net_hdr): how the receiving kernel must
    finish it (checksum) and cut it (segments of ``gso_size`` after ``hdr_len`` header bytes)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def encode(self) -> bytes:
        return GSO_HEADER.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                               self.csum_start, self.csum_offset)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> GsoHeader:
        if len(buf) < GSO_HEADER_SIZE:
            raise ValueError("shorter than an offload header")
        return cls(*GSO_HEADER.unpack_from(buf))


@dataclass(frozen=True, slots=True)
class IpConfig:
    """What the server assigned to one IP stream; sent once, as the stream's first DATA."""

    #: The client's IPv4 address and the pool's prefix (None: no IPv4 through the tunnel).
    ipv4: IPv4Interface | None
    #: The client's IPv6 address and prefix (None: IPv6 must be blocked, never leaked).
    ipv6: IPv6Interface | None
    #: MTU of the tunnel device on both ends.
    mtu: int = 1500
    #: Resolvers the client sends its DNS to, through the tunnel.
    dns: tuple[IPAddress, ...] = field(default_factory=tuple)
    #: Subnets this client reaches through the tunnel besides the Internet: the other sites'
    #: LANs, which a site gateway (``--tun --site``) routes into the tunnel and nothing else.
    #: The server may send the config again on the stream when these change.
    routes: tuple[IPNetwork, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"MTU out of range: {self.mtu}")
        if self.ipv4 is None and self.ipv6 is None:
            raise ValueError("an IP config needs an IPv4 or an IPv6 address")
        if len(self.dns) > 8:
            raise ValueError("at most 8 resolvers")
        if len(self.routes) > MAX_ROUTES:
            raise ValueError(f"at most {MAX_ROUTES} routes")

    def encode(self) -> bytes:
        v4 = self.ipv4
        v6 = self.ipv6
        body = bytearray(_CONFIG_FIXED.pack(
            0, CONFIG_VERSION, self.mtu,
            v4.network.prefixlen if v4 else 0, v4.ip.packed if v4 else bytes(4),
            v6.network.prefixlen if v6 else 0, v6.ip.packed if v6 else bytes(16),
            len(self.dns)))
        for ip in self.dns:
            body += bytes((ip.version,)) + ip.packed
        if self.routes:
            body.append(len(self.routes))
            for net in self.routes:
                body += bytes((net.version, net.prefixlen)) + net.network_address.packed
        struct.pack_into("!H", body, 0, len(body) - 2)
        return bytes(body)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> tuple[IpConfig, int]:
        """Parse one config from the start of ``buf``: (config, bytes used).

        Raises NeedMoreData when ``buf`` ends before the message, ValueError when malformed.
        Bytes after the known fields (a later version's) are skipped.
        """
        if len(buf) < 2:
            raise NeedMoreData
        (length,) = struct.unpack_from("!H", buf)
        if length > MAX_CONFIG_SIZE or length + 2 < _CONFIG_FIXED.size:
            raise ValueError(f"bad IP config length {length}")
        if len(buf) < length + 2:
            raise NeedMoreData
        (_, version, mtu, p4, a4, p6, a6, ndns) = _CONFIG_FIXED.unpack_from(buf)
        if version != CONFIG_VERSION:
            raise ValueError(f"unknown IP config version {version}")
        if p4 > 32 or p6 > 128:
            raise ValueError("bad prefix length")
        pos = _CONFIG_FIXED.size
        dns: list[IPAddress] = []
        for _ in range(ndns):
            if pos >= length + 2:
                raise ValueError("truncated resolver list")
            family = buf[pos]
            size = {4: 4, 6: 16}.get(family)
            if size is None or pos + 1 + size > length + 2:
                raise ValueError("bad resolver address")
            dns.append(ipaddress.ip_address(bytes(buf[pos + 1 : pos + 1 + size])))
            pos += 1 + size
        end = length + 2
        routes: list[IPNetwork] = []
        if pos < end:
            count = buf[pos]
            pos += 1
            if count > MAX_ROUTES:
                raise ValueError("too many routes")
            for _ in range(count):
                if pos + 2 > end:
                    raise ValueError("truncated route list")
                family, prefix = buf[pos], buf[pos + 1]
                size = {4: 4, 6: 16}.get(family)
                if size is None or pos + 2 + size > end or prefix > size * 8:
                    raise ValueError("bad route")
                try:
                    routes.append(ipaddress.ip_network(
                        (bytes(buf[pos + 2 : pos + 2 + size]), prefix)))
                except ValueError as exc:
                    raise ValueError(f"bad route: {exc}") from None
                pos += 2 + size
        ipv4 = IPv4Interface((bytes(a4), p4)) if p4 else None
        ipv6 = IPv6Interface((bytes(a6), p6)) if p6 else None
        return cls(ipv4, ipv6, mtu, tuple(dns), tuple(routes)), end


# ---------------------------------------------------------------- packet fields
# Where the addresses sit in an IP header, after the offload header.
_V4_SRC = GSO_HEADER_SIZE + 12
_V4_DST = GSO_HEADER_SIZE + 16
_V6_SRC = GSO_HEADER_SIZE + 8
_V6_DST = GSO_HEADER_SIZE + 24


def packet_source(datagram: bytes | memoryview) -> bytes:
    """The source address (4 or 16 bytes) of an IP datagram (offload header + packet), or
    b"" when it is not a whole IPv4/IPv6 header."""
    if len(datagram) <= GSO_HEADER_SIZE:
        return b""
    version = datagram[GSO_HEADER_SIZE] >> 4
    if version == 4 and len(datagram) >= GSO_HEADER_SIZE + 20:
        return bytes(datagram[_V4_SRC : _V4_SRC + 4])
    if version == 6 and len(datagram) >= GSO_HEADER_SIZE + 40:
        return bytes(datagram[_V6_SRC : _V6_SRC + 16])
    return b""


def packet_destination(datagram: bytes | memoryview) -> bytes:
    """The destination address (4 or 16 bytes) of an IP datagram, or b"" (see above)."""
    if len(datagram) <= GSO_HEADER_SIZE:
        return b""
    version = datagram[GSO_HEADER_SIZE] >> 4
    if version == 4 and len(datagram) >= GSO_HEADER_SIZE + 20:
        return bytes(datagram[_V4_DST : _V4_DST + 4])
    if version == 6 and len(datagram) >= GSO_HEADER_SIZE + 40:
        return bytes(datagram[_V6_DST : _V6_DST + 16])
    return b""
