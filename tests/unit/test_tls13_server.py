"""The borrowed identity's TLS 1.3 server (transport/tls13/server.py) and the hello's mark
(protocol/borrow.py), both ends in memory: exact record sizes, authentication both ways."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from veil.protocol.auth import Credential, new_secret
from veil.protocol.borrow import HelloSeal, unmask
from veil.transport.tls13 import ApplicationData, HandshakeComplete, TlsClient
from veil.transport.tls13.errors import TlsProtocolViolation
from veil.transport.tls13.keys import HAVE_MLKEM
from veil.transport.tls13.server import MirrorShape, ShapeError, TlsServer, parse_client_hello
from veil.transport.tls13.wire import HRR_RANDOM, NamedGroup

NOW = 1_800_000_000.0
# nginx 1.22 (OpenSSL 3.0) answering Chrome's hello, as measured in tests/lab/test_borrowed.py.
FLIGHT = (36, 1497, 281, 69)
POST = (298, 282, 57)


def target_server_hello(session_id: bytes, random: bytes | None = None,
                        group: int = NamedGroup.X25519, share_len: int = 32) -> bytes:
    share = struct.pack("!HH", group, share_len) + os.urandom(share_len)
    exts = b"\x00\x2b\x00\x02\x03\x04" + b"\x00\x33" + struct.pack("!H", len(share)) + share
    body = (b"\x03\x03" + (random or os.urandom(32)) + bytes((len(session_id),)) + session_id
            + b"\x13\x02\x00" + struct.pack("!H", len(exts)) + exts)
    return b"\x02" + len(body).to_bytes(3, "big") + body


def records(data: bytes) -> list[tuple[int, int]]:
    out = []
    pos = 0
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        out.append((data[pos], length))
        pos += 5 + length
    assert pos == len(data)
    return out


class Pair:
    def __init__(self, *, static: x25519.X25519PrivateKey | None = None,
                 flight: tuple[int, ...] = FLIGHT, hrr: bool = False,
                 group: int = NamedGroup.X25519, share_len: int = 32) -> None:
        self.static = x25519.X25519PrivateKey.generate()
        self.credential = Credential.from_secret(new_secret())
        seal = HelloSeal(self.credential, self.static.public_key().public_bytes_raw(),
                         lambda: NOW)
        self.client = TlsClient("www.example.test", sealer=seal)
        self.client.connect()
        first = self.client.data_to_send()
        self.hello = first[5:]
        parsed = parse_client_hello(self.hello)
        unmasked = unmask(static or self.static, parsed.random, parsed.session_id,
                          parsed.key_shares[NamedGroup.X25519])
        assert unmasked is not None
        self.unmasked = unmasked
        psk = unmasked.verify(self.credential) or os.urandom(32)
        self.shape = MirrorShape(
            target_server_hello(parsed.session_id, HRR_RANDOM if hrr else None, group,
                                share_len), True,
            flight, POST, b"h2")
        self.server = TlsServer(self.hello, self.shape, psk)


def test_a_sealed_hello_gets_a_handshake_in_the_targets_shape() -> None:
    pair = Pair()
    assert pair.unmasked.key_id == pair.credential.key_id
    assert pair.unmasked.timestamp == int(NOW)
    client, server = pair.client, pair.server
    server.connect()
    flight = server.data_to_send()
    shape = records(flight)
    assert shape[0][0] == 22 and shape[0][1] == len(pair.shape.server_hello)
    assert shape[1:] == [(20, 1)] + [(23, size) for size in FLIGHT]
    # Only the random and the key share's bytes differ from the target's ServerHello.
    ours, theirs = flight[5:5 + shape[0][1]], pair.shape.server_hello
    assert ours[:6] == theirs[:6] and ours[38:-32] == theirs[38:-32]
    client.receive_data(flight)
    done = client.next_event()
    assert isinstance(done, HandshakeComplete) and done.alpn == "h2"
    assert done.peer_certificate_der == b""
    server.receive_data(client.data_to_send())
    assert isinstance(server.next_event(), HandshakeComplete)
    assert server.tls_unique == client.tls_unique
    post = server.data_to_send()
    assert records(post) == [(23, size) for size in POST]
    client.receive_data(post)
    assert client.next_event() is None  # empty records: nothing for the application
    client.receive_data(server.send(b"from the server"))
    event = client.next_event()
    assert isinstance(event, ApplicationData) and bytes(event.data) == b"from the server"
    server.receive_data(client.send(b"from the client"))
    event = server.next_event()
    assert isinstance(event, ApplicationData) and bytes(event.data) == b"from the client"


@pytest.mark.skipif(not HAVE_MLKEM, reason="this cryptography has no ML-KEM (needs >= 47)")
def test_a_target_choosing_the_hybrid_group_is_answered_with_it() -> None:
    """X25519MLKEM768, as Cloudflare's and Google's servers choose for Chrome: our share is
    an ML-KEM ciphertext and an X25519 key, 1,120 bytes like theirs."""
    pair = Pair(group=NamedGroup.X25519MLKEM768, share_len=1088 + 32)
    pair.server.connect()
    flight = pair.server.data_to_send()
    assert records(flight)[0][1] == len(pair.shape.server_hello)
    pair.client.receive_data(flight)
    assert isinstance(pair.client.next_event(), HandshakeComplete)
    assert pair.client.group == NamedGroup.X25519MLKEM768


def test_a_server_without_the_static_key_cannot_answer() -> None:
    """An impostor (or the real site) lacks the PSK: the client refuses its first flight."""
    pair = Pair(static=x25519.X25519PrivateKey.generate())
    assert pair.unmasked.verify(pair.credential) is None  # it cannot even read the mark
    pair.server.connect()
    with pytest.raises(TlsProtocolViolation):
        pair.client.receive_data(pair.server.data_to_send())


def test_a_mark_moved_to_another_hello_fails() -> None:
    pair = Pair()
    parsed = parse_client_hello(pair.hello)
    other_share = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    spliced = unmask(pair.static, parsed.random, parsed.session_id, other_share)
    assert spliced is None or spliced.verify(pair.credential) is None
    moved = unmask(pair.static, os.urandom(32), parsed.session_id,
                   parsed.key_shares[NamedGroup.X25519])
    assert moved is None or moved.verify(pair.credential) is None


def test_answers_that_cannot_be_mirrored_are_refused_before_a_byte() -> None:
    with pytest.raises(ShapeError, match="HelloRetryRequest"):
        Pair(hrr=True)
    with pytest.raises(ShapeError, match="do not fit"):
        Pair(flight=(20, 20))


def test_records_split_anywhere_and_batched_reach_the_server_whole() -> None:
    """The client's flight and data fed byte by byte, then many records in one read, with a
    KeyUpdate among them: every byte arrives, in order."""
    pair = Pair()
    client, server = pair.client, pair.server
    server.connect()
    client.receive_data(server.data_to_send())
    assert isinstance(client.next_event(), HandshakeComplete)
    finished = client.data_to_send()
    for i in range(len(finished)):
        server.receive_data(finished[i:i + 1])
    assert isinstance(server.next_event(), HandshakeComplete)
    chunks = [os.urandom(n) for n in (1, 700, 16384, 40000)]
    wire = bytearray()
    for chunk in chunks[:2]:
        wire += client.send(chunk)
    client.update_keys(request_peer=True)
    for chunk in chunks[2:]:
        wire += client.send(chunk)
    received = bytearray()
    for start in range(0, len(wire), 5000):
        server.receive_data(wire[start:start + 5000])
        while (event := server.next_event()) is not None:
            assert isinstance(event, ApplicationData)
            received += event.data
    assert bytes(received) == b"".join(chunks)
    # The server answered the KeyUpdate: the client reads the server's records after it.
    client.receive_data(server.send(b"after the update"))
    event = client.next_event()
    assert isinstance(event, ApplicationData) and bytes(event.data) == b"after the update"
