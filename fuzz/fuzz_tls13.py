"""veil's own TLS 1.3 client (``transport/tls13/``) fed the bytes of a hostile server.

Input: ``mode | cutting | bytes``; ``mode % 3`` picks how far a real server takes the
handshake before the fuzzer's bytes are read:

0. nothing: the bytes are the server's first flight (ServerHello, HelloRetryRequest, alerts,
   change_cipher_spec, any record), as they arrive;
1. a genuine ServerHello (X25519, TLS_AES_128_GCM_SHA256): the bytes are the encrypted
   flight, given as ``type (1) | length (u16) | content`` items that the harness seals with
   the server's handshake keys (any bytes after the last item go out unencrypted);
2. a whole genuine handshake (certificate, CertificateVerify, Finished): the items are
   sealed with the server's application keys (tickets, KeyUpdate, data, alerts).

Invariants: ``receive_data`` raises only the documented failures (``TlsProtocolViolation``,
``TlsServerAuthFailure``, ``TlsAlertReceived``), after which the client is CLOSED and reads
nothing more; the handshake never completes unless the harness's server signed and finished
it (modes 0 and 1 never complete: the fuzzer holds no key); application data never precedes
the handshake's completion; nothing but events the module documents comes out.
"""

from __future__ import annotations

import datetime
import random
import struct
import sys

import harness
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID

from veil.transport.tls13 import (
    ApplicationData,
    HandshakeComplete,
    PeerClosed,
    State,
    TlsAlertReceived,
    TlsClient,
    TlsProtocolViolation,
    TlsServerAuthFailure,
)
from veil.transport.tls13.keys import SUITES, KeySchedule, Transcript, finished_verify_data
from veil.transport.tls13.record import MAX_PLAINTEXT, RecordSealer
from veil.transport.tls13.wire import (
    ExtensionType,
    NamedGroup,
    Reader,
    extension,
    extensions,
    handshake,
    p8,
    p16,
    p24,
    u16,
)

MODULES = ("veil.transport.tls13.client", "veil.transport.tls13.certs",
           "veil.transport.tls13.record", "veil.transport.tls13.wire")

SUITE = 0x1301
INFO = SUITES[SUITE]
E = ExtensionType
FAILURES = (TlsProtocolViolation, TlsServerAuthFailure, TlsAlertReceived)

# The harness's server: fixed keys, so the corpus means the same thing on every run.
SERVER_SHARE = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
SIGNING_KEY = ec.derive_private_key(0x5EC12E7, ec.SECP256R1())


def _certificate() -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.com")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(SIGNING_KEY.public_key()).serial_number(1)
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=90))
            .sign(SIGNING_KEY, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


CERTIFICATE = _certificate()
ENCRYPTED_EXTENSIONS = handshake(8, p16(extension(E.ALPN, p16(p8(b"h2")))))
CERTIFICATE_MESSAGE = handshake(11, p8(b"") + p24(p24(CERTIFICATE) + p16(b"")))


def _client_hello_fields(flight: bytes) -> tuple[bytes, bytes, bytes]:
    """(the ClientHello message, its session id, its X25519 share) from the first record."""
    message = flight[5:]
    r = Reader(message, 4)
    r.raw(2 + 32)
    session_id = r.vec8()
    r.vec16()
    r.vec8()
    shares = Reader(dict(extensions(r))[E.KEY_SHARE]).sub16()
    while shares.remaining:
        group, key = shares.u16(), shares.vec16()
        if group == NamedGroup.X25519:
            return message, session_id, key
    raise AssertionError("the client offered no X25519 share")


class _Server:
    """Just enough TLS 1.3 server to take the client to the fuzzer's state."""

    def __init__(self, client_flight: bytes) -> None:
        hello, session_id, share = _client_hello_fields(client_flight)
        secret = SERVER_SHARE.exchange(x25519.X25519PublicKey.from_public_bytes(share))
        public = SERVER_SHARE.public_key().public_bytes_raw()
        exts = extension(E.SUPPORTED_VERSIONS, u16(0x0304)) + extension(
            E.KEY_SHARE, u16(NamedGroup.X25519) + p16(public))
        server_hello = handshake(2, u16(0x0303) + bytes(32) + p8(session_id) + u16(SUITE)
                                 + b"\x00" + p16(exts))
        self.transcript = Transcript()
        self.transcript.add(hello)
        self.transcript.start(INFO.hash_name)
        self.transcript.add(server_hello)
        self.schedule = KeySchedule(INFO)
        _, self.server_hs = self.schedule.handshake_secrets(secret, self.transcript.digest())
        self.sealer = RecordSealer(INFO, self.server_hs)
        self.hello_flight = b"\x16\x03\x03" + p16(server_hello) + b"\x14\x03\x03\x00\x01\x01"

    def finish(self) -> bytes:
        """The rest of a genuine handshake, sealed; then application keys."""
        flight = ENCRYPTED_EXTENSIONS + CERTIFICATE_MESSAGE
        for message in (ENCRYPTED_EXTENSIONS, CERTIFICATE_MESSAGE):
            self.transcript.add(message)
        content = (b" " * 64 + b"TLS 1.3, server CertificateVerify\x00"
                   + self.transcript.digest())
        verify = handshake(15, u16(0x0403) + p16(
            SIGNING_KEY.sign(content, ec.ECDSA(hashes.SHA256()))))
        self.transcript.add(verify)
        finished = handshake(20, finished_verify_data(INFO, self.server_hs,
                                                      self.transcript.digest()))
        self.transcript.add(finished)
        flight += verify + finished
        out = bytes(self.sealer.seal(flight, 22))
        _, server_ap = self.schedule.application_secrets(self.transcript.digest())
        self.sealer = RecordSealer(INFO, server_ap)
        return out

    def seal_items(self, data: bytes) -> bytes:
        """``type | u16 length | content`` items sealed as records; the rest as it is."""
        out = bytearray()
        pos = 0
        while pos + 3 <= len(data):
            ctype, length = data[pos], struct.unpack_from("!H", data, pos + 1)[0]
            content = data[pos + 3 : pos + 3 + length]
            if len(content) < length or length > MAX_PLAINTEXT:
                break
            out += self.sealer.seal(content, ctype)
            pos += 3 + length
        return bytes(out) + data[pos:]


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, selector, body = data[0] % 3, data[1], data[2:]
    client = TlsClient("example.com", rng=random.Random(7))
    client.connect()
    flight = client.data_to_send()
    completed = False
    if mode:
        server = _Server(flight)
        wire = server.hello_flight
        if mode == 2:
            wire += server.finish()
        client.receive_data(wire)
        client.data_to_send()
        while (event := client.next_event()) is not None:
            assert isinstance(event, HandshakeComplete) and mode == 2
            completed = True
        assert completed == (mode == 2)
        body = server.seal_items(body)
    for piece in harness.pieces(body, selector):
        try:
            client.receive_data(piece)
        except FAILURES:
            assert client.state is State.CLOSED
            client.data_to_send()
            _drain(client, completed)  # what the records before the failure said
            client.receive_data(b"\x17\x03\x03\x00\x01x")  # a closed client reads nothing
            assert client.next_event() is None
            return
        client.data_to_send()
        _drain(client, completed)
        if client.state is State.CONNECTED:
            client.send(b"ping")  # the client still works after whatever it was sent


def _drain(client: TlsClient, completed: bool) -> None:
    while (event := client.next_event()) is not None:
        if isinstance(event, HandshakeComplete):
            raise AssertionError("the handshake completed without the server's key")
        if isinstance(event, ApplicationData):
            assert completed, "application data before the handshake completed"
            bytes(event.data)
        else:
            assert isinstance(event, PeerClosed) and completed, f"event {event!r}"


# ------------------------------------------------------------------ seeds
def _items(*records: tuple[int, bytes]) -> bytes:
    return b"".join(bytes((ctype,)) + struct.pack("!H", len(c)) + c for ctype, c in records)


def seeds() -> dict[str, bytes]:
    hrr_random = bytes.fromhex(
        "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

    def server_hello(random_: bytes, exts: bytes, session_id: bytes = bytes(32)) -> bytes:
        message = handshake(2, u16(0x0303) + random_ + p8(session_id) + u16(SUITE) + b"\x00"
                            + p16(exts))
        return b"\x16\x03\x03" + p16(message)

    versions = extension(E.SUPPORTED_VERSIONS, u16(0x0304))
    ticket = handshake(4, struct.pack(">II", 7200, 1) + p8(b"\x00") + p16(b"T" * 32) + p16(b""))
    return {
        "plain-server-hello": b"\x00\x00" + server_hello(bytes(32), versions + extension(
            E.KEY_SHARE, u16(NamedGroup.X25519) + p16(bytes(32)))),
        "plain-hrr": b"\x00\x00" + server_hello(hrr_random, versions + extension(
            E.KEY_SHARE, u16(NamedGroup.SECP256R1)) + extension(E.COOKIE, p16(b"c" * 8))),
        "plain-tls12": b"\x00\x00" + server_hello(b"\x00" * 24 + b"DOWNGRD\x01", b""),
        "plain-alert": b"\x00\x00\x15\x03\x03\x00\x02\x02\x28",
        "plain-ccs": b"\x00\x00\x14\x03\x03\x00\x01\x01",
        "plain-http": b"\x00\x00HTTP/1.1 400 Bad Request\r\n\r\n",
        "plain-oversized-record": b"\x00\x00\x16\x03\x03\x48\x01",
        "plain-cut": b"\x00\x21" + server_hello(bytes(32), versions),
        "hs-genuine-ee-cert": b"\x01\x00" + _items((22, ENCRYPTED_EXTENSIONS),
                                                   (22, CERTIFICATE_MESSAGE)),
        "hs-ee-cert-bad-verify": b"\x01\x00" + _items(
            (22, ENCRYPTED_EXTENSIONS + CERTIFICATE_MESSAGE
             + handshake(15, u16(0x0403) + p16(b"\x30\x06\x02\x01\x01\x02\x01\x01")))),
        "hs-compressed-cert": b"\x01\x00" + _items(
            (22, ENCRYPTED_EXTENSIONS + handshake(25, u16(2) + b"\x00\x01\x00" + p24(b"\x0b")))),
        "hs-cert-request": b"\x01\x00" + _items(
            (22, ENCRYPTED_EXTENSIONS + handshake(13, p8(b"") + p16(extension(
                E.SIGNATURE_ALGORITHMS, p16(u16(0x0403))))))),
        "hs-alps": b"\x01\x00" + _items((22, handshake(8, p16(
            extension(E.ALPN, p16(p8(b"h2"))) + extension(E.APPLICATION_SETTINGS, b"\x00"))))),
        "hs-alert": b"\x01\x00" + _items((21, b"\x02\x28")),
        "hs-app-data-early": b"\x01\x00" + _items((23, b"hello")),
        "hs-empty-record": b"\x01\x00" + _items((22, b"")),
        "hs-cut": b"\x01\x47" + _items((22, ENCRYPTED_EXTENSIONS), (22, CERTIFICATE_MESSAGE)),
        "app-data": b"\x02\x00" + _items((23, b"HTTP/1.1 200 OK\r\n\r\n"), (23, b"more")),
        "app-ticket-keyupdate": b"\x02\x00" + _items((22, ticket), (22, handshake(24, b"\x01")),
                                                     (23, b"x")),
        "app-close-notify": b"\x02\x00" + _items((23, b"bye"), (21, b"\x01\x00"), (23, b"x")),
        "app-user-canceled": b"\x02\x00" + _items((21, b"\x01\x5a"), (21, b"\x01\x00")),
        "app-bad-key-update": b"\x02\x00" + _items((22, handshake(24, b"\x07"))),
        "app-unencrypted": b"\x02\x00\x17\x03\x03\x00\x05hello",
        "app-cut": b"\x02\x13" + _items((23, bytes(3000)), (22, ticket), (23, b"y" * 100)),
    }


if __name__ == "__main__":
    harness.main(test_one_input, MODULES)
    sys.exit(0)
