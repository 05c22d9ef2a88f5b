"""veil's TLS 1.3 client against a small in-memory TLS 1.3 server (tests/unit/tls13_support.py):
every group and suite, HelloRetryRequest, compressed certificates, client certificate requests,
KeyUpdate, tickets, alerts, and the failures that must end a handshake."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, rsa

from tests.unit.tls13_support import MiniServer, ServerConfig, parse_client_hello
from veil.transport.tls13 import (
    CHROME,
    ApplicationData,
    HandshakeComplete,
    PeerClosed,
    State,
    TlsAlertReceived,
    TlsClient,
    TlsProtocolViolation,
    TlsServerAuthFailure,
    TlsUsageError,
)
from veil.transport.tls13.certs import brotli_available
from veil.transport.tls13.wire import ExtensionType, NamedGroup, is_grease

E = ExtensionType
GROUPS = [NamedGroup.X25519MLKEM768, NamedGroup.X25519, NamedGroup.SECP256R1,
          NamedGroup.SECP384R1]
SUITES = [0x1301, 0x1302, 0x1303]


def pump(client: TlsClient, server: MiniServer) -> list[object]:
    """Move bytes both ways until neither side has anything to say; return client events."""
    events: list[object] = []
    to_server = client.data_to_send()
    while to_server:
        reply = server.receive(to_server)
        client.receive_data(reply)
        while (event := client.next_event()) is not None:
            events.append(_copy(event))
        to_server = client.data_to_send()
    return events


def _copy(event: object) -> object:
    if isinstance(event, ApplicationData):
        return ApplicationData(memoryview(bytes(event.data)))
    return event


def connect(config: ServerConfig | None = None, host: str | None = "example.test",
            ) -> tuple[TlsClient, MiniServer, HandshakeComplete]:
    client, server = TlsClient(host), MiniServer(config)
    client.connect()
    events = pump(client, server)
    done = [e for e in events if isinstance(e, HandshakeComplete)]
    assert len(done) == 1, events
    assert client.state is State.CONNECTED and server.connected
    return client, server, done[0]


def received(client: TlsClient, data: bytes) -> bytes:
    client.receive_data(data)
    out = b""
    while (event := client.next_event()) is not None:
        assert isinstance(event, ApplicationData), event
        out += bytes(event.data)
    return out


# ---------------------------------------------------------------------- handshakes
@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("group", GROUPS)
def test_handshake_with_every_group_and_suite(group: int, suite: int) -> None:
    client, server, done = connect(ServerConfig(group=group, suite=suite))
    assert (done.group, done.cipher_suite, done.alpn) == (group, suite, "h2")
    assert done.hello_retry == (group not in (NamedGroup.X25519MLKEM768, NamedGroup.X25519))
    # tls-unique: the client's Finished, the same on both ends.
    assert done.tls_unique == server.tls_unique == client.tls_unique
    assert len(done.tls_unique) == (48 if suite == 0x1302 else 32)
    assert done.peer_certificate_der == server.certificate
    server.receive(bytes(client.send(b"ping")))
    assert bytes(server.received) == b"ping"
    assert received(client, server.send(b"pong")) == b"pong"


def test_rsa_certificate_and_rsa_pss_signature() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _, _, done = connect(ServerConfig(key=key))
    assert done.cipher_suite == 0x1301


def test_hello_retry_request_keeps_the_hello_and_echoes_the_cookie() -> None:
    _client, server, done = connect(ServerConfig(group=NamedGroup.SECP256R1, cookie=b"C" * 40))
    first, second = server.hellos
    assert done.hello_retry
    assert (second.random, second.session_id, second.cipher_suites) == (
        first.random, first.session_id, first.cipher_suites)
    assert [t for t in second.extension_types if t != E.COOKIE] == first.extension_types
    assert second.ext(E.COOKIE) == b"\x00\x28" + b"C" * 40
    assert is_grease(first.key_shares[0][0])
    assert [g for g, _ in second.key_shares] == [NamedGroup.SECP256R1]  # no GREASE share
    assert server.ccs_seen == 1  # one dummy change_cipher_spec, before the second hello


@pytest.mark.parametrize("level", [44, 65, 87])
def test_ml_dsa_certificate(level: int) -> None:
    """Chrome offers ML-DSA (draft-ietf-tls-mldsa); a server with such a key completes."""
    kind = {44: mldsa.MLDSA44PrivateKey, 65: mldsa.MLDSA65PrivateKey,
            87: mldsa.MLDSA87PrivateKey}[level]
    key = kind.generate()
    _, server, done = connect(ServerConfig(key=key))
    assert done.peer_certificate_der == server.certificate
    forged = ServerConfig(key=key, signing_key=kind.generate())
    client, server = TlsClient("example.test"), MiniServer(forged)
    client.connect()
    with pytest.raises(TlsServerAuthFailure, match="CertificateVerify does not verify"):
        client.receive_data(server.receive(client.data_to_send()))


def test_brotli_compressed_certificate() -> None:
    if not brotli_available():
        pytest.skip("libbrotlidec is not installed (Debian: libbrotli1)")
    _, server, done = connect(ServerConfig(compress_certificate=True))
    assert done.peer_certificate_der == server.certificate


def test_certificate_request_is_answered_with_an_empty_certificate() -> None:
    _, server, _ = connect(ServerConfig(request_certificate=True))
    assert server.client_certificate == b"\x0b\x00\x00\x04\x00\x00\x00\x00"


def test_tickets_are_dropped_and_data_flows() -> None:
    client, server, _ = connect(ServerConfig(tickets=3))
    assert received(client, server.send(b"x" * 100)) == b"x" * 100


# ---------------------------------------------------------------------- failures
def test_forged_certificate_verify_fails() -> None:
    """A server that presents a certificate without holding its key (it signs with another)
    cannot complete the handshake: that is what stops a replayed certificate."""
    config = ServerConfig(signing_key=ec.generate_private_key(ec.SECP256R1()))
    client, server = TlsClient("example.test"), MiniServer(config)
    client.connect()
    with pytest.raises(TlsServerAuthFailure, match="CertificateVerify does not verify"):
        client.receive_data(server.receive(client.data_to_send()))
    assert client.state is State.CLOSED
    server.receive(client.data_to_send())
    assert server.alerts == [51]  # decrypt_error, under the handshake key
    assert not server.connected


def test_certificate_verify_with_a_scheme_that_does_not_fit_the_key_fails() -> None:
    config = ServerConfig(scheme=0x0804)  # RSA-PSS claimed, ECDSA key
    client, server = TlsClient("example.test"), MiniServer(config)
    client.connect()
    with pytest.raises(TlsServerAuthFailure, match="does not fit"):
        client.receive_data(server.receive(client.data_to_send()))


def test_wrong_server_finished_fails() -> None:
    client, server = TlsClient("example.test"), MiniServer(ServerConfig(bad_finished=True))
    client.connect()
    with pytest.raises(TlsServerAuthFailure, match="Finished does not verify"):
        client.receive_data(server.receive(client.data_to_send()))


def test_truncated_handshake_waits_and_reports_nothing() -> None:
    client, server = TlsClient("example.test"), MiniServer()
    client.connect()
    flight = server.receive(client.data_to_send())
    client.receive_data(flight[: len(flight) // 2])
    assert client.next_event() is None and client.state is not State.CONNECTED
    client.receive_data(flight[len(flight) // 2 :])
    assert isinstance(client.next_event(), HandshakeComplete)


def test_byte_at_a_time() -> None:
    client, server = TlsClient("example.test"), MiniServer()
    client.connect()
    flight = server.receive(client.data_to_send())
    for i in range(len(flight)):
        client.receive_data(flight[i : i + 1])
    assert isinstance(client.next_event(), HandshakeComplete)


def test_tampered_record_is_bad_record_mac() -> None:
    client, server, _ = connect()
    record = bytearray(server.send(b"hello"))
    record[-1] ^= 1
    with pytest.raises(TlsProtocolViolation, match="bad_record_mac"):
        client.receive_data(bytes(record))


def test_fatal_alert_from_the_server() -> None:
    client, server, _ = connect()
    with pytest.raises(TlsAlertReceived, match="internal_error"):
        client.receive_data(server.alert(80))


def test_server_speaking_tls12_gets_protocol_version() -> None:
    client = TlsClient("example.test")
    client.connect()
    hello, _ = parse_client_hello(client.data_to_send())
    body = (b"\x03\x03" + os.urandom(32) + bytes((32,)) + hello.session_id + b"\xc0\x2f\x00"
            + b"\x00\x00")
    server_hello = b"\x02" + len(body).to_bytes(3, "big") + body
    with pytest.raises(TlsProtocolViolation, match=r"does not speak TLS 1\.3"):
        client.receive_data(b"\x16\x03\x03" + len(server_hello).to_bytes(2, "big")
                            + server_hello)
    assert client.data_to_send() == b"\x15\x03\x03\x00\x02\x02\x46"  # protocol_version


def test_unoffered_alpn_is_illegal() -> None:
    client, server = TlsClient("example.test"), MiniServer(ServerConfig(alpn=b"spdy/3"))
    client.connect()
    with pytest.raises(TlsProtocolViolation, match="ALPN"):
        client.receive_data(server.receive(client.data_to_send()))


def test_unoffered_extension_in_encrypted_extensions() -> None:
    config = ServerConfig(extra_ee=b"\x00\x1c\x00\x02\x40\x00")  # record_size_limit
    client, server = TlsClient("example.test"), MiniServer(config)
    client.connect()
    with pytest.raises(TlsProtocolViolation, match="unsupported_extension"):
        client.receive_data(server.receive(client.data_to_send()))


def test_data_before_the_handshake_is_refused() -> None:
    client = TlsClient("example.test")
    with pytest.raises(TlsUsageError):
        client.send(b"early")


# ---------------------------------------------------------------------- after the handshake
def test_key_update_requested_by_the_server() -> None:
    client, server, _ = connect()
    assert received(client, server.key_update(request=True) + server.send(b"after")) == b"after"
    server.receive(bytes(client.send(b"reply")))  # the KeyUpdate answer goes first
    assert server.key_updates == 1 and bytes(server.received) == b"reply"
    assert received(client, server.send(b"again")) == b"again"


def test_key_update_by_the_client() -> None:
    client, server, _ = connect()
    client.update_keys(request_peer=True)
    reply = server.receive(client.data_to_send())
    assert server.key_updates == 1
    assert received(client, reply + server.send(b"new keys")) == b"new keys"
    server.receive(bytes(client.send(b"both ways")))
    assert bytes(server.received) == b"both ways"


def test_close_notify_both_ways() -> None:
    client, server, _ = connect()
    client.receive_data(server.send(b"last") + server.close_notify() + server.send(b"ignored"))
    events = [client.next_event(), client.next_event(), client.next_event()]
    assert isinstance(events[0], ApplicationData) and bytes(events[0].data) == b"last"
    assert isinstance(events[1], PeerClosed) and events[2] is None
    client.close()
    server.receive(client.data_to_send())
    assert server.peer_closed


def test_large_writes_become_full_records_and_batched_reads() -> None:
    client, server, _ = connect()
    payload = os.urandom(1_000_000)
    records = bytes(client.send(payload))
    sizes, pos = [], 0
    while pos < len(records):
        length = int.from_bytes(records[pos + 3 : pos + 5], "big")
        sizes.append(length)
        pos += 5 + length
    assert sizes[:-1] == [16384 + 17] * (len(sizes) - 1)
    server.receive(records)
    assert bytes(server.received) == payload
    # Many records delivered at once come out as one run of plaintext.
    wire = b"".join(server.send(payload[i : i + 16384]) for i in range(0, 262144, 16384))
    client.receive_data(wire)
    event = client.next_event()
    assert isinstance(event, ApplicationData) and bytes(event.data) == payload[:262144]
    assert client.next_event() is None


def test_random_split_points() -> None:
    rng = random.Random(7)
    client, server, _ = connect()
    payload = os.urandom(200_000)
    wire = b"".join(server.send(payload[i : i + 5000]) for i in range(0, len(payload), 5000))
    out, pos = b"", 0
    while pos < len(wire):
        step = rng.randint(1, 40000)
        out += received(client, wire[pos : pos + step])
        pos += step
    assert out == payload


def test_padded_records_are_unpadded() -> None:
    client, server, _ = connect()
    assert server.sealer is not None
    # Content type then zeros: TLSInnerPlaintext padding (RFC 8446 §5.4).
    record = server.sealer.seal(b"padded\x17" + bytes(100), 0)
    # seal() put its own content type (0) last: the inner plaintext ends in zeros, so the
    # real content type is the 0x17 after "padded".
    assert received(client, bytes(record)) == b"padded"


def test_spec_is_chrome() -> None:
    assert TlsClient(None).spec is CHROME
