"""Each passive detector on synthetic flows built from the published wire formats:
positive controls it must catch and negative controls it must pass."""

from __future__ import annotations

import datetime
import random
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.lab import synth
from veil.lab import certs, fet, signatures, sni, tlsintls
from veil.lab.flow import Direction, Endpoint
from veil.lab.passive import analyse

C, S = Direction.CLIENT, Direction.SERVER
RNG = random.Random(7)


def rand(n: int) -> bytes:
    return RNG.randbytes(n)


# ------------------------------------------------------------------ fully encrypted
def test_random_first_packet_is_fully_encrypted() -> None:
    verdict = fet.judge_packet(random.Random(1).randbytes(300))
    assert verdict.flagged and verdict.labels == ("fully-encrypted",)
    assert 3.4 < verdict.details["popcount"] < 4.6


@pytest.mark.parametrize(("packet", "exemption"), [
    (bytes([0x01] * 50 + [0xFF] * 10), "Ex1"),           # 1.5 bits per byte
    (b"\xff" * 100, "Ex1"),                               # 8 bits per byte
    (b"abcdef" + random.Random(2).randbytes(200), "Ex2"),
    (b"\x80\x81" * 10 + b"ab" * 30, "Ex3"),
    (random.Random(3).randbytes(50) + b"x" * 21 + random.Random(4).randbytes(50), "Ex4"),
    (b"\x16\x03\x01" + random.Random(5).randbytes(200), "Ex5"),
    (b"\x17\x03\x09" + random.Random(5).randbytes(200), "Ex5"),
])
def test_each_exemption(packet: bytes, exemption: str) -> None:
    verdict = fet.judge_packet(packet)
    assert not verdict.flagged
    assert any(e.startswith(exemption) for e in verdict.evidence), verdict.evidence


def test_thresholds_are_exact() -> None:
    # 20 contiguous printable bytes is not "more than 20"; 21 is.
    body = bytes([0x8F, 0xF0] * 40)  # 4 bits per byte, nothing printable
    assert fet.judge_packet(body[:40] + b"x" * 20 + body[40:]).flagged
    assert not fet.judge_packet(body[:40] + b"x" * 21 + body[40:]).flagged
    # Exactly 3.4 set bits per byte is exempt (<=), 4.0 and 4.4 are not, 4.8 is (>= 4.6).
    at_bound = bytes([0x87, 0x8F, 0x8F, 0x8F, 0x83]) * 10  # 4.4, never printable
    low = bytes([0x87, 0x87, 0x8F, 0x87, 0x83]) * 10       # 4.0
    assert fet.average_popcount(bytes([0x07, 0x0F, 0x0F, 0x0F, 0x03])) == pytest.approx(3.4)
    assert fet.exemptions(bytes([0x07, 0x0F, 0x0F, 0x0F, 0x03]) * 10)[0].startswith("Ex1")
    assert fet.judge_packet(at_bound).flagged and fet.judge_packet(low).flagged
    assert fet.exemptions(bytes([0x8F, 0x8F, 0x8F, 0x8F, 0x8B]) * 10)[0].startswith("Ex1")


def test_fet_uses_the_first_packet_not_the_stream() -> None:
    hello = synth.openssl_client_hello()
    # The client's first segment is random; the TLS record comes later in the stream.
    flow = synth.tcp_flow([(C, rand(200)), (C, hello)])
    assert fet.detect(flow).flagged
    assert not fet.detect(synth.tcp_flow([(C, hello)], segment=100)).flagged
    assert not fet.detect(synth.udp_flow([(C, rand(200))])).applicable


# ------------------------------------------------------------------ signatures
def labels(flow):  # type: ignore[no-untyped-def]
    return signatures.detect(flow).labels


def openvpn_packets() -> tuple[bytes, bytes, bytes]:
    client_sid, server_sid = rand(8), rand(8)
    reset = b"\x38" + client_sid + b"\x00" + struct.pack("!I", 0)
    reply = b"\x40" + server_sid + b"\x01" + struct.pack("!I", 0) + client_sid \
        + struct.pack("!I", 0)
    ack = b"\x28" + client_sid + b"\x01" + struct.pack("!I", 0) + server_sid
    return reset, reply, ack


def test_openvpn_udp_and_tcp() -> None:
    reset, reply, ack = openvpn_packets()
    udp = synth.udp_flow([(C, reset), (S, reply), (C, ack)], server=Endpoint("10.0.0.2", 1194))
    assert labels(udp) == ("openvpn-udp",)

    def framed(p: bytes) -> bytes:
        return struct.pack("!H", len(p)) + p

    tcp = synth.tcp_flow([(C, framed(reset)), (S, framed(reply)), (C, framed(ack))])
    assert labels(tcp) == ("openvpn-tcp",)
    # A lone 0x38 byte with nothing to confirm it is not enough.
    assert labels(synth.udp_flow([(C, reset)])) == ()


def test_wireguard() -> None:
    init = b"\x01\x00\x00\x00" + rand(144)
    response = b"\x02\x00\x00\x00" + rand(88)
    data = b"\x04\x00\x00\x00" + rand(12 + 16 * 5)
    verdict = signatures.detect(synth.udp_flow([(C, init), (S, response), (C, data)]))
    assert verdict.labels == ("wireguard",)
    assert any("exactly 148 bytes" in e for e in verdict.evidence)
    # The sizes matter: a 149-byte type-1 datagram is not a WireGuard initiation.
    assert "wireguard" not in labels(synth.udp_flow([(C, b"\x01\x00\x00\x00" + rand(145))]))


def ike_sa_init(version: int = 0x20, exchange: int = 34) -> bytes:
    payload = rand(200)
    header = rand(8) + bytes(8) + bytes([33, version, exchange, 0x08]) + bytes(4)
    return header + struct.pack("!I", 28 + len(payload)) + payload


def test_ike() -> None:
    v2 = synth.udp_flow([(C, ike_sa_init())], client=Endpoint("10.0.0.1", 500),
                        server=Endpoint("10.0.0.2", 500))
    verdict = signatures.detect(v2)
    assert verdict.labels == ("ike",)
    assert "IKEv2 IKE_SA_INIT" in verdict.evidence[0] and "500/4500" in verdict.evidence[0]
    v1_nat = synth.udp_flow([(C, b"\x00" * 4 + ike_sa_init(0x10, 2))],
                            server=Endpoint("10.0.0.2", 4500))
    assert labels(v1_nat) == ("ike",)
    broken = bytearray(ike_sa_init())
    broken[27] ^= 1  # the length field no longer matches
    assert "ike" not in labels(synth.udp_flow([(C, bytes(broken))]))


def test_pptp_control_and_gre() -> None:
    sccrq = struct.pack("!HHIHH", 156, 1, 0x1A2B3C4D, 1, 0) + bytes(144)
    control = synth.tcp_flow([(C, sccrq)], server=Endpoint("10.0.0.2", 1723))
    assert labels(control) == ("pptp",)
    gre = b"\x30\x81\x88\x0b" + struct.pack("!HHI", 20, 7, 1) + rand(20)
    assert labels(synth.udp_flow([(C, gre)], proto="ip:47")) == ("pptp",)


def test_ssh() -> None:
    flow = synth.tcp_flow([(C, b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"),
                           (S, b"SSH-2.0-OpenSSH_9.2p1\r\n")], server=Endpoint("10.0.0.2", 22))
    verdict = signatures.detect(flow)
    assert verdict.labels == ("ssh",) and len(verdict.evidence) == 2


def tls12_server_flight(cert_der: bytes) -> bytes:
    server_hello = synth.handshake(2, b"\x03\x03" + bytes(32) + b"\x00" + b"\xc0\x2f\x00")
    cert_list = len(cert_der).to_bytes(3, "big") + cert_der
    certificate = synth.handshake(11, len(cert_list).to_bytes(3, "big") + cert_list)
    return synth.record(22, server_hello + certificate)


def make_cert(subject: str, issuer: str | None = None, days: int = 90, san: list[str] | None = None,
              start_offset: int = -1) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_key = key if issuer is None else ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                          issuer or subject)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + datetime.timedelta(days=start_offset))
               .not_valid_after(now + datetime.timedelta(days=start_offset + days)))
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_tor_sni_and_certificate() -> None:
    tor_hello = synth.hello_from_lists([0xC02B, 0xC02F], [0x0000, 0x000D], None, [0x0403],
                                       sni="www.q7wz3kxb4mfe.com")
    assert labels(synth.tcp_flow([(C, tor_hello)])) == ("tor",)
    cert = make_cert("www.vkx3qz7rt2dzh.net", "www.mfh5s2cq4yab.com")
    flow = synth.tcp_flow([(C, synth.hello_from_lists([0xC02B], [0x000D], None, [0x0403])),
                           (S, tls12_server_flight(cert))])
    verdict = signatures.detect(flow)
    assert verdict.labels == ("tor",) and "issued by" in verdict.evidence[0]
    assert "tor" in certs.detect(flow).labels
    for name in ("www.example.com", "www.wikipedia.com", "www.nginx.com", "www.bbc.com"):
        hello = synth.hello_from_lists([0x1301], [0x0000], None, [], sni=name)
        assert labels(synth.tcp_flow([(C, hello)])) == (), name


def test_random_streams_tcp_and_udp() -> None:
    salt_and_header = rand(32 + 2 + 16 + 60 + 16)  # Shadowsocks AEAD: salt, length, payload
    flow = synth.tcp_flow([(C, salt_and_header), (S, rand(120))])
    verdict = signatures.detect(flow)
    assert verdict.labels == ("random-stream",)
    assert "the server's first data is random too" in verdict.evidence[0]
    assert labels(synth.udp_flow([(C, rand(120))], server=Endpoint("10.0.0.2", 8388))) == (
        "random-datagrams",)


@pytest.mark.parametrize("flow", [
    synth.tcp_flow([(C, synth.openssl_client_hello()), (S, synth.record(22, rand(90)))]),
    synth.tcp_flow([(C, b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"),
                    (S, b"HTTP/1.1 200 OK\r\n\r\n")], server=Endpoint("10.0.0.2", 80)),
    synth.udp_flow([(C, b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"\x07example\x03com\x00"
                     + b"\x00\x01\x00\x01")], server=Endpoint("10.0.0.2", 53)),
    synth.udp_flow([(C, b"\xc3\x00\x00\x00\x01" + rand(1195))],
                   server=Endpoint("10.0.0.2", 443)),
    synth.tcp_flow([(C, rand(10))]),  # too short to judge as random
], ids=["tls", "http", "dns", "quic-initial", "short"])
def test_ordinary_traffic_has_no_signature(flow) -> None:  # type: ignore[no-untyped-def]
    assert signatures.detect(flow).flagged is False


# ------------------------------------------------------------------ certificates and SNI
def test_certificate_scoring() -> None:
    def bad(der: bytes, name: str | None = "www.example.com") -> list[str]:
        return certs.score_certificate(der, name)[0]

    assert any(b.startswith("self-signed") for b in bad(make_cert("www.example.com",
                                                                  san=["www.example.com"])))
    good = make_cert("www.example.com", issuer="Example CA", san=["www.example.com"])
    assert bad(good) == []
    assert bad(make_cert("x", issuer="CA", san=["*.example.com"])) == []
    assert bad(make_cert("x", issuer="CA", san=["*.example.com"]), "a.b.example.com") != []
    assert any("name mismatch" in b for b in bad(good, "other.org"))
    assert any("validity of" in b for b in bad(make_cert("w", "CA", days=3650,
                                                         san=["www.example.com"])))
    assert any("expired" in b for b in bad(make_cert("w", "CA", days=10, start_offset=-30,
                                                     san=["www.example.com"])))
    assert any("no subjectAltName" in b for b in bad(make_cert("www.example.com", "CA")))


def test_certificate_visible_only_before_tls13() -> None:
    cert = make_cert("www.example.com", san=["www.example.com"])
    hello = synth.hello_from_lists([0xC02B], [0x0000], None, [])
    tls12 = synth.tcp_flow([(C, hello), (S, tls12_server_flight(cert))])
    verdict = certs.detect(tls12)
    assert verdict.flagged and verdict.labels[0] == "self-signed"
    tls13_hello = synth.handshake(2, b"\x03\x03" + bytes(32) + b"\x00\x13\x01\x00"
                                  + struct.pack("!HHHH", 6, 0x002B, 2, 0x0304))
    tls13 = synth.tcp_flow([(C, hello), (S, synth.record(22, tls13_hello)
                                         + synth.record(23, rand(900)))])
    verdict = certs.detect(tls13)
    assert not verdict.applicable and "encrypted" in verdict.evidence[0]


def test_sni_block_list_and_esni() -> None:
    blocklist = sni.BlockList(["blocked.example", "torproject.org"])
    assert blocklist.match("www.torproject.org") == "torproject.org"
    assert blocklist.match("nottorproject.org") is None

    def verdict(name: str, extra: list[int] | None = None) -> sni.Verdict:
        hello = synth.hello_from_lists([0x1301], [0x0000, *(extra or [])], None, [], sni=name)
        return sni.detect(synth.tcp_flow([(C, hello)]), blocklist)

    assert verdict("a.blocked.example").flagged
    assert not verdict("www.example.com").flagged
    esni = verdict("www.example.com", [0xFFCE])
    assert esni.flagged and esni.labels == ("esni",)
    assert not verdict("www.example.com", [0xFE0D]).flagged


# ------------------------------------------------------------------ TLS in TLS
def outer_tls13(after: list[tuple[Direction, int]]) -> list[tuple[Direction, bytes]]:
    """An outer TLS 1.3 handshake, then application records of the given ciphertext sizes."""
    server_hello = synth.handshake(2, b"\x03\x03" + bytes(32) + b"\x00\x13\x01\x00"
                                   + struct.pack("!HHHH", 6, 0x002B, 2, 0x0304))
    out = [(C, synth.openssl_client_hello()),
           (S, synth.record(22, server_hello) + synth.record(20, b"\x01")
            + synth.record(23, rand(1100))),
           (C, synth.record(20, b"\x01") + synth.record(23, rand(53)))]
    out += [(d, synth.record(23, rand(n))) for d, n in after]
    return out


def test_inner_handshake_is_found() -> None:
    tunnel = outer_tls13([(S, 250), (S, 250),  # the outer NewSessionTickets
                          (C, 17 + 40 + 517),  # framing + inner ClientHello
                          (S, 17 + 1900),      # inner ServerHello ... Finished
                          (C, 17 + 20 + 64),   # inner CCS + Finished
                          (C, 17 + 120),       # inner HTTP request
                          (S, 17 + 4000)])
    verdict = tlsintls.detect(synth.tcp_flow(tunnel))
    assert verdict.flagged, verdict.evidence
    assert verdict.evidence[0].startswith("inner ClientHello: client 557 B")


def test_an_inner_hello_after_the_tunnels_own_small_records_is_found() -> None:
    """A naive CDN carrier measured in CI: its open request and framing (56, 32, 40) in the
    same burst as the inner ClientHello (551); with at most 3 records a burst, it passed."""
    tunnel = outer_tls13([(S, 250), (C, 17 + 56), (C, 17 + 32), (C, 17 + 40), (C, 17 + 551),
                          (S, 17 + 28), (S, 17 + 760), (C, 17 + 171), (S, 17 + 3627)])
    verdict = tlsintls.detect(synth.tcp_flow(tunnel))
    assert verdict.flagged, verdict.evidence
    assert verdict.evidence[0].startswith("inner ClientHello: client 679 B")


@pytest.mark.parametrize("after", [
    [(S, 250), (C, 17 + 90), (S, 17 + 5000)],                       # curl: GET, response
    [(C, 17 + 90), (S, 17 + 5000), (C, 17 + 90), (S, 17 + 5000)],  # keep-alive
    [(C, 17 + 150), (S, 17 + 1200), (C, 17 + 13)],                 # h2: SETTINGS ACK
    [(C, 17 + 600), (S, 17 + 16000), (S, 17 + 16000)],             # a large upload reply
], ids=["https", "keep-alive", "h2", "post"])
def test_plain_https_has_no_inner_handshake(after: list[tuple[Direction, int]]) -> None:
    assert not tlsintls.detect(synth.tcp_flow(outer_tls13(after))).flagged


def test_padded_first_flights_hide_the_inner_handshake() -> None:
    """What shaping must achieve: the same exchange with records padded to ~1,400 bytes."""
    padded = outer_tls13([(C, 17 + 1400), (S, 17 + 1400), (S, 17 + 1400), (C, 17 + 1400),
                          (C, 17 + 1400), (S, 17 + 4000)])
    assert not tlsintls.detect(synth.tcp_flow(padded)).flagged


def test_analyse_runs_every_detector() -> None:
    flows = [synth.tcp_flow([(C, rand(300))]),
             synth.tcp_flow([(C, synth.openssl_client_hello())]),
             synth.tcp_flow([])]  # a connection that carried nothing is skipped
    reports = analyse(flows)
    assert len(reports) == 2
    names = [v.detector for v in reports[0].verdicts]
    assert names == ["fully-encrypted", "protocol-signatures", "clienthello-fingerprint", "sni",
                     "certificate", "tls-in-tls", "idle-heartbeat"]
    assert [v.detector for v in reports[0].flagged] == ["fully-encrypted",
                                                         "protocol-signatures"]
    assert [v.detector for v in reports[1].flagged] == ["clienthello-fingerprint"]
