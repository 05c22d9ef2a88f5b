"""Trojan: passwords, the request parser, UDP packets, links, the store and the way in."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.errors import ConfigError, RemoteProtocolError
from veil.protocol.address import Address
from veil.protocol.auth import Credential
from veil.protocol.trojan import (
    MAX_REQUEST_SIZE,
    Command,
    Incomplete,
    NotTrojan,
    TrojanLink,
    TrojanRequest,
    UdpPacketDecoder,
    build_request,
    encode_udp_packet,
    parse_request,
    password_for_secret,
    password_hash,
    password_hash_for_secret,
)
from veil.server.gate import Accept, Reject, Wait
from veil.server.live import UserDirectory, build_directory
from veil.server.trojan import TrojanWayIn
from veil.store.base import User

SECRET = bytes(range(32))
PASSWORD = password_for_secret(SECRET)
DIGEST = password_hash(PASSWORD)
HEX = DIGEST.encode()


# ------------------------------------------------------------------ passwords
def _hkdf_sha256(secret: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with hmac, to check the derivation independently."""
    prk = hmac.new(bytes(32), secret, "sha256").digest()  # no salt: HashLen zero bytes
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), "sha256").digest()
        okm += block
    return okm[:length]


def test_the_password_is_derived_printable_and_stable() -> None:
    expected = base64.urlsafe_b64encode(_hkdf_sha256(SECRET, b"veil trojan password", 18))
    assert expected.decode() == PASSWORD
    assert PASSWORD == "Jmj8EpNNeFJeQOVbF2duwLQ0"  # a change here locks every Trojan user out
    assert len(PASSWORD) == 24 and PASSWORD.isascii() and PASSWORD.isprintable()
    assert password_for_secret(bytes(32)) != PASSWORD
    assert hashlib.sha224(PASSWORD.encode()).hexdigest() == DIGEST
    assert len(DIGEST) == 56 and DIGEST.lower() == DIGEST
    assert password_hash_for_secret(SECRET) == DIGEST


# ------------------------------------------------------------------ requests
@pytest.mark.parametrize("command, dest, encoded", [
    (Command.CONNECT, Address("example.com", 443), b"\x03\x0bexample.com\x01\xbb"),
    (Command.CONNECT, Address("127.0.0.1", 8080), b"\x01\x7f\x00\x00\x01\x1f\x90"),
    (Command.CONNECT, Address("::1", 53), b"\x04" + bytes(15) + b"\x01\x00\x35"),
    (Command.UDP_ASSOCIATE, Address("0.0.0.0", 0), b"\x01\x00\x00\x00\x00\x00\x00"),
])
def test_a_request_parses_to_exact_fields(command: Command, dest: Address,
                                          encoded: bytes) -> None:
    wire = HEX + b"\r\n" + bytes([command]) + encoded + b"\r\n"
    assert build_request(DIGEST, command, dest) == wire
    assert parse_request(wire + b"GET / HTTP/1.1\r\n") == TrojanRequest(DIGEST, command, dest,
                                                                        len(wire))
    assert parse_request(memoryview(wire)) == TrojanRequest(DIGEST, command, dest, len(wire))


@pytest.mark.parametrize("wire, reason", [
    (HEX.upper() + b"\r\n\x01\x01\x7f\x00\x00\x01\x00\x50\r\n", "not_hex"),
    (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "not_hex"),
    (HEX + b"\n\r\x01\x01\x7f\x00\x00\x01\x00\x50\r\n", "bad_crlf"),
    (HEX + b"\r\n\x02\x01\x7f\x00\x00\x01\x00\x50\r\n", "bad_command"),
    (HEX + b"\r\n\x01\x05\x7f\x00\x00\x01\x00\x50\r\n", "bad_address"),
    (HEX + b"\r\n\x01\x03\x00\x00\x50\r\n", "bad_address"),
    (HEX + b"\r\n\x01\x01\x7f\x00\x00\x01\x00\x50\n\n", "bad_crlf"),
])
def test_malformed_requests_are_not_trojan(wire: bytes, reason: str) -> None:
    result = parse_request(wire)
    assert isinstance(result, NotTrojan) and result.reason == reason


def test_every_prefix_is_incomplete_and_names_the_hash_once_known() -> None:
    wire = build_request(DIGEST, Command.CONNECT, Address("example.com", 443))
    for end in range(len(wire)):
        result = parse_request(wire[:end])
        assert isinstance(result, Incomplete), end
        assert result.password_hash == (DIGEST if end >= 58 else None)
    assert isinstance(parse_request(wire), TrojanRequest)


requests = st.builds(
    build_request, st.just(DIGEST), st.sampled_from(list(Command)),
    st.one_of(st.builds(Address, st.ip_addresses().map(str), st.integers(0, 65535)),
              st.builds(Address, st.from_regex(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?"
                                               r"(\.[a-z]{2,10}){1,3}", fullmatch=True),
                        st.integers(0, 65535))))


@given(st.binary(max_size=600))
def test_garbage_never_raises(data: bytes) -> None:
    assert isinstance(parse_request(data), TrojanRequest | Incomplete | NotTrojan)


@given(requests, st.binary(max_size=64), st.binary(max_size=400))
def test_garbage_after_a_hash_never_raises(request: bytes, middle: bytes, tail: bytes) -> None:
    for data in (HEX + b"\r\n" + middle, request[:-2] + middle + tail, request + tail):
        assert isinstance(parse_request(data), TrojanRequest | Incomplete | NotTrojan)


@given(requests, st.binary(max_size=200), st.data())
def test_a_request_is_complete_exactly_at_its_end(request: bytes, payload: bytes,
                                                  data: st.DataObject) -> None:
    wire = request + payload
    cut = data.draw(st.integers(0, len(wire)))
    result = parse_request(wire[:cut])
    if cut < len(request):
        assert isinstance(result, Incomplete)
    else:
        assert isinstance(result, TrojanRequest) and result.size == len(request)
    assert len(request) <= MAX_REQUEST_SIZE


# ------------------------------------------------------------------ UDP packets
def test_udp_packets_encode_to_exact_bytes() -> None:
    assert encode_udp_packet(Address("1.2.3.4", 53), b"hi") == (
        b"\x01\x01\x02\x03\x04\x00\x35" + b"\x00\x02" + b"\r\n" + b"hi")
    with pytest.raises(ValueError, match="65,535"):
        encode_udp_packet(Address("1.2.3.4", 53), bytes(65536))


udp_packets = st.lists(st.tuples(
    st.one_of(st.builds(Address, st.ip_addresses().map(str), st.integers(0, 65535)),
              st.builds(Address, st.sampled_from(["dns.example", "a.b"]), st.integers(0, 65535))),
    st.binary(max_size=1500)), max_size=8)


@given(udp_packets, st.data())
def test_udp_stream_decodes_the_same_however_it_is_cut(
        packets: list[tuple[Address, bytes]], data: st.DataObject) -> None:
    stream = b"".join(encode_udp_packet(a, p) for a, p in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = UdpPacketDecoder()
    got: list[tuple[Address, bytes]] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += decoder.feed(stream[start:end])
    assert got == packets


@given(st.binary(min_size=1, max_size=300))
def test_udp_garbage_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        UdpPacketDecoder().feed(data)


def test_a_packet_without_crlf_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError):
        UdpPacketDecoder().feed(b"\x01\x01\x02\x03\x04\x00\x35\x00\x02XXhi")


# ------------------------------------------------------------------ links
def test_links_round_trip_and_read_what_other_apps_write() -> None:
    link = TrojanLink(Address("vpn.example.org", 8443), "p@ss:word/#?", "cdn.example",
                      insecure=True, pin=bytes(range(32)), label="alice phone")
    assert TrojanLink.parse(link.to_uri()) == link
    other = TrojanLink.parse("trojan://secret@[2001:db8::1]?peer=x.example&allowInsecure=0#n")
    assert other == TrojanLink(Address("2001:db8::1", 443), "secret", "x.example", False, None,
                               "n")
    assert TrojanLink.parse("trojan://a:b@h:1").password == "a:b"
    for bad in ("veil://x@h:1", "trojan://h:1", "trojan://p@h:1?pin=abc", "trojan://p@h:99999"):
        with pytest.raises(ConfigError):
            TrojanLink.parse(bad)


# ------------------------------------------------------------------ the way in
class FakeTransport(asyncio.Transport):
    """The way in must not touch the transport: anything it tries fails the test."""

    def write(self, data: object) -> None:
        raise AssertionError("the way in wrote")

    def close(self) -> None:
        raise AssertionError("the way in closed")


def directory(*users: User) -> UserDirectory:
    return build_directory(users, {}, 10.0, password_hash_for_secret)


ACTIVE = User("active", SECRET, Credential.from_secret(SECRET).key_id, 1.0)
GONE = User("gone", bytes(32), Credential.from_secret(bytes(32)).key_id, 1.0, revoked_at=2.0)


@pytest.fixture
def way_in():  # type: ignore[no-untyped-def]
    served: list[tuple[str, TrojanRequest, bytes]] = []
    return TrojanWayIn(directory(ACTIVE, GONE),
                       lambda t, u, r, rest: served.append((u.name, r, rest))), served


def test_the_way_in_accepts_only_an_active_users_complete_request(way_in) -> None:  # type: ignore[no-untyped-def]
    check, served = way_in
    transport = FakeTransport()
    request = build_request(DIGEST, Command.CONNECT, Address("example.com", 80))
    verdict = check.check(request + b"GET /", transport)
    assert isinstance(verdict, Accept) and verdict.user.name == "active"
    verdict.take_over(transport)
    assert served == [("active", parse_request(request), b"GET /")]
    assert check.check(request[:70], transport) == Wait()
    assert check.check(request[:40], transport) == Reject(None)
    gone = build_request(password_hash_for_secret(bytes(32)), Command.CONNECT,
                         Address("example.com", 80))
    assert check.check(gone, transport) == Reject("trojan_revoked")
    assert check.check(gone[:60], transport) == Reject("trojan_revoked")
    stranger = build_request("ab" * 28, Command.CONNECT, Address("example.com", 80))
    assert check.check(stranger, transport) == Reject("trojan_unknown_password")
    assert check.check(stranger[:60], transport) == Reject("trojan_unknown_password")
    assert check.check(b"GET / HTTP/1.1\r\n\r\n", transport) == Reject(None)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=400),
                 st.builds(lambda h, rest: h + b"\r\n" + rest,
                           st.text("0123456789abcdef", min_size=56, max_size=56).map(str.encode),
                           st.binary(max_size=300))))
def test_nothing_without_the_password_is_ever_accepted(data: bytes) -> None:
    verdict = TrojanWayIn(directory(ACTIVE), lambda *a: None).check(data, FakeTransport())
    assert isinstance(verdict, Reject)
