"""SOCKS5 (RFC 1928/1929): the sans-IO ``Socks5Connection`` and the UDP header decoder.

Input: ``flags | cutting | bytes``. flags bit 0: the listener requires username/password;
bit 1: the bytes are one UDP datagram for ``decode_udp_datagram`` instead.

Invariants: ``receive_data`` raises only ``RemoteProtocolError`` or ``AuthError`` (what the
inbound catches), and then the state is CLOSED; at most one request per connection, only in
WAIT_REPLY; with credentials required, no request without the right pair on the wire; a
domain handed to the dialer is printable and has no separators; bytes after the request
are kept as early data, unchanged; replies start with the version byte. The UDP decoder
raises only ``RemoteProtocolError`` and returns a suffix of the datagram.
"""

from __future__ import annotations

import sys

import harness

from veil.client.socks5 import (
    ConnectRequest,
    Reply,
    Socks5Connection,
    State,
    UdpAssociateRequest,
    decode_udp_datagram,
    encode_udp_datagram,
)
from veil.config import Credentials
from veil.errors import AuthError, RemoteProtocolError
from veil.protocol.address import Address

MODULES = ("veil.client.socks5", "veil.protocol.address")

USER, PASSWORD = b"alice", b"s3cret"
CREDENTIALS = Credentials(USER, PASSWORD)
_AUTH_MESSAGE = bytes((1, len(USER))) + USER + bytes((len(PASSWORD),)) + PASSWORD


def _udp(data: bytes) -> None:
    try:
        dest, payload = decode_udp_datagram(data)
    except RemoteProtocolError:
        return
    assert data.endswith(payload)
    Address.decode(dest.encode())


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, selector, body = data[0], data[1], data[2:]
    if flags & 2:
        _udp(body)
        return
    auth = bool(flags & 1)
    conn = Socks5Connection(CREDENTIALS if auth else None)
    events: list[object] = []
    fed = 0
    for piece in harness.pieces(body, selector):
        try:
            new = conn.receive_data(piece)
        except (RemoteProtocolError, AuthError):
            assert conn.state is State.CLOSED, "an error left the handshake open"
            out = conn.data_to_send()
            assert not out or out[0] in (1, 5), f"odd reply {out!r}"
            return
        fed += len(piece)
        out = conn.data_to_send()
        assert not out or out[0] in (1, 5), f"odd reply {out!r}"
        for event in new:
            assert not events, "a second request on one connection"
            assert conn.state is State.WAIT_REPLY
            if auth:
                assert _AUTH_MESSAGE in body[:fed], "a request without the credentials"
            events.append(event)
            if isinstance(event, ConnectRequest):
                dest = event.dest
            else:
                assert isinstance(event, UdpAssociateRequest)
                dest = event.client
            if dest.ip is None:
                assert dest.host.isprintable() and not any(
                    c.isspace() or c in "/\\@" for c in dest.host), "implausible host passed on"
            Address.decode(dest.encode())  # the tunnel's OPEN must carry it, the server read it
            conn.send_reply(Reply.SUCCEEDED)
            assert conn.state.value == State.ESTABLISHED.value  # (mypy keeps WAIT_REPLY)
            assert body[:fed].endswith(conn.trailing_data), "early data changed"
    if events:
        assert body.endswith(conn.trailing_data)


# ------------------------------------------------------------------ seeds
def seeds() -> dict[str, bytes]:
    def request(cmd: int, dest: Address) -> bytes:
        return bytes((5, cmd, 0)) + dest.encode()

    hello, hello_auth = b"\x05\x01\x00", b"\x05\x02\x00\x02"
    connect = request(1, Address("example.com", 443))
    return {
        "connect-domain": b"\x00\x00" + hello + connect + b"\x16\x03\x01\x00\x05hello",
        "connect-domain-cut": b"\x00\x11" + hello + connect,
        "connect-ipv4": b"\x00\x00" + hello + request(1, Address("192.0.2.7", 80)),
        "connect-ipv6": b"\x00\x00" + hello + request(1, Address("2001:db8::7", 80)),
        "udp-associate": b"\x00\x00" + hello + request(3, Address("0.0.0.0", 0)),
        "bind": b"\x00\x00" + hello + request(2, Address("192.0.2.7", 80)),
        "auth-connect": b"\x01\x00" + hello_auth + _AUTH_MESSAGE + connect + b"early",
        "auth-connect-bytewise": b"\x01\x10" + hello_auth + _AUTH_MESSAGE + connect,
        "auth-wrong-password": b"\x01\x00" + hello_auth + b"\x01\x05alice\x06s3creT" + connect,
        "auth-not-offered": b"\x01\x00" + hello + connect,
        "bad-version": b"\x00\x00\x04\x01\x00",
        "bad-atyp": b"\x00\x00" + hello + b"\x05\x01\x00\x05\x00",
        "empty-domain": b"\x00\x00" + hello + b"\x05\x01\x00\x03\x00\x00\x50",
        "control-char-domain": b"\x00\x00" + hello + b"\x05\x01\x00\x03\x03a\nb\x00\x50",
        "bad-idna-domain": b"\x00\x00" + hello + b"\x05\x01\x00\x03\x04xn--\x00\x50",
        "udp-datagram": b"\x02\x00" + encode_udp_datagram(Address("192.0.2.1", 53), b"query"),
        "udp-datagram-domain": b"\x02\x00"
        + encode_udp_datagram(Address("dns.example", 53), b"q"),
        "udp-fragment": b"\x02\x00\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x35",
    }


if __name__ == "__main__":
    harness.main(test_one_input, MODULES)
    sys.exit(0)
