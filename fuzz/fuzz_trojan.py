"""Trojan: ``parse_request`` (the first bytes of a connection), the UDP ASSOCIATE packet
stream (``UdpPacketDecoder``) and ``TrojanLink.parse`` (trojan:// links users paste).

Input: ``which | cutting | bytes``; ``which % 3`` picks the parser.

Invariants: ``parse_request`` is total (never raises) and answers consistently: a request is
complete exactly at its size, every shorter prefix of a request is ``Incomplete``, and the
size never exceeds ``MAX_REQUEST_SIZE``; the UDP decoder raises only ``RemoteProtocolError``,
yields the same packets however the stream is cut, and holds less than one packet; a link
parses or raises ``ConfigError``, and a parsed link survives ``to_uri`` and back.
"""

from __future__ import annotations

import sys

import harness

from veil.errors import ConfigError, RemoteProtocolError
from veil.protocol.address import Address
from veil.protocol.trojan import (
    MAX_REQUEST_SIZE,
    MAX_UDP_PACKET,
    MAX_UDP_PAYLOAD,
    Command,
    Incomplete,
    NotTrojan,
    TrojanLink,
    TrojanRequest,
    UdpPacketDecoder,
    build_request,
    encode_udp_packet,
    parse_request,
    password_hash,
)

MODULES = ("veil.protocol.trojan", "veil.protocol.uri", "veil.protocol.address")


def _request(data: bytes) -> None:
    parsed = parse_request(data)
    assert isinstance(parsed, TrojanRequest | Incomplete | NotTrojan)
    if isinstance(parsed, TrojanRequest):
        assert parsed.size <= min(len(data), MAX_REQUEST_SIZE)
        assert parse_request(data[: parsed.size]) == parsed, "request depends on its payload"
        shorter = parse_request(data[: parsed.size - 1])
        assert isinstance(shorter, Incomplete), f"a prefix of a request is {shorter!r}"
        assert 0 <= parsed.destination.port <= 0xFFFF
    elif isinstance(parsed, Incomplete):
        assert len(data) < MAX_REQUEST_SIZE


def _udp(data: bytes, selector: int) -> None:
    whole = UdpPacketDecoder()
    try:
        expected = whole.feed(data)
    except RemoteProtocolError:
        expected = None
    cut = UdpPacketDecoder()
    got: list[tuple[Address, bytes]] = []
    try:
        for piece in harness.pieces(data, selector):
            got += cut.feed(piece)
            assert len(cut._buffer) < MAX_UDP_PACKET, "decoder holds more than one packet"
    except RemoteProtocolError:
        assert expected is None, "the cut stream failed, the whole one did not"
        return
    assert expected is not None, "the cut stream decoded, the whole one did not"
    assert got == expected, "packets depend on how the stream is cut"
    for _address, payload in got:
        assert len(payload) <= MAX_UDP_PAYLOAD


def _link(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        link = TrojanLink.parse(text)
    except ConfigError:
        return
    assert TrojanLink.parse(link.to_uri()) == link, "a link changed through to_uri"


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    which, selector, body = data[0] % 3, data[1], data[2:]
    if which == 0:
        _request(body)
    elif which == 1:
        _udp(body, selector)
    else:
        _link(body)


# ------------------------------------------------------------------ seeds
def seeds() -> dict[str, bytes]:
    digest = password_hash("correct horse")
    connect = build_request(digest, Command.CONNECT, Address("example.com", 443))
    packets = (encode_udp_packet(Address("192.0.2.1", 53), b"\x12\x34query")
               + encode_udp_packet(Address("2001:db8::1", 123), b"ntp")
               + encode_udp_packet(Address("dns.example", 53), b""))
    link = TrojanLink(Address("vpn.example.org", 8443), "p@ss:word/#?", "cdn.example",
                      insecure=True, pin=bytes(range(32)), label="alice phone")
    return {
        "request-connect": b"\x00\x00" + connect + b"GET / HTTP/1.1\r\n\r\n",
        "request-udp": b"\x00\x00" + build_request(digest, Command.UDP_ASSOCIATE,
                                                   Address("0.0.0.0", 0)),
        "request-ipv6": b"\x00\x00" + build_request(digest, Command.CONNECT,
                                                    Address("2001:db8::1", 80)),
        "request-long-name": b"\x00\x00" + build_request(digest, Command.CONNECT,
                                                         Address("a" * 63 + ".example", 80)),
        "request-partial": b"\x00\x00" + connect[:60],
        "request-bad-crlf": b"\x00\x00" + connect[:56] + b"\n\r" + connect[58:],
        "request-uppercase-hash": b"\x00\x00" + connect.upper(),
        "udp-stream": b"\x01\x00" + packets,
        "udp-stream-cut": b"\x01\x35" + packets,
        "udp-no-crlf": b"\x01\x00\x01\x01\x02\x03\x04\x00\x35\x00\x02XXhi",
        "udp-max-length": b"\x01\x00\x01\x01\x02\x03\x04\x00\x35\xff\xff\r\nx",
        "link-full": b"\x02\x00" + link.to_uri().encode(),
        "link-ipv6-peer": b"\x02\x00trojan://secret@[2001:db8::1]?peer=x.example&allowInsecure=0#n",
        "link-colon-password": b"\x02\x00trojan://a:b@h:1",
        "link-bad-port": b"\x02\x00trojan://p@h:99999",
        "link-bad-pin": b"\x02\x00trojan://p@h:1?pin=abc",
        "link-percent": b"\x02\x00trojan://%E2%82%AC%zz@h%41st:443?sni=%00#%ff",
    }


if __name__ == "__main__":
    harness.main(test_one_input, MODULES)
    sys.exit(0)
