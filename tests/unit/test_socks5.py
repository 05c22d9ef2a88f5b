"""The sans-IO SOCKS5 server: exact bytes in, exact events and replies out."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.client.socks5 import (
    MAX_TRAILING_DATA,
    ConnectRequest,
    Event,
    Reply,
    Socks5Connection,
    State,
    UdpAssociateRequest,
    decode_udp_datagram,
    encode_udp_datagram,
)
from veil.config import Credentials
from veil.errors import AuthError, ConfigError, LocalProtocolError, RemoteProtocolError, VeilError
from veil.protocol.address import Address

CREDS = Credentials(b"alice", b"s3cret")
NO_AUTH = b"\x05\x01\x00"
USERPASS = b"\x05\x01\x02"
LOGIN = b"\x01\x05alice\x06s3cret"
CONNECT_LOCAL_80 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
SUCCESS_UNSPECIFIED = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def refused(
    conn: Socks5Connection, data: bytes, error: type[VeilError] = RemoteProtocolError
) -> VeilError:
    with pytest.raises(error) as info:
        conn.receive_data(data)
    assert conn.state is State.CLOSED
    return info.value


# -- the happy paths, byte for byte ---------------------------------------------------------------


def test_connect_ipv4_without_auth() -> None:
    conn = Socks5Connection()
    assert conn.receive_data(NO_AUTH) == []
    assert conn.data_to_send() == b"\x05\x00"
    assert conn.state is State.REQUEST
    assert conn.receive_data(CONNECT_LOCAL_80) == [ConnectRequest(Address("127.0.0.1", 80))]
    assert conn.state is State.WAIT_REPLY
    assert conn.data_to_send() == b""
    conn.send_reply(Reply.SUCCEEDED)
    assert conn.data_to_send() == SUCCESS_UNSPECIFIED
    assert conn.state is State.ESTABLISHED
    assert conn.trailing_data == b""


def test_connect_domain_and_ipv6() -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH)
    events = conn.receive_data(b"\x05\x01\x00\x03\x0bexample.com\x01\xbb")
    assert events == [ConnectRequest(Address("example.com", 443))]

    conn = Socks5Connection()
    conn.receive_data(NO_AUTH)
    events = conn.receive_data(b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x00\x16")
    assert events == [ConnectRequest(Address("::1", 22))]


def test_picks_no_auth_among_several_methods() -> None:
    conn = Socks5Connection()
    conn.receive_data(b"\x05\x03\x02\x01\x00")
    assert conn.data_to_send() == b"\x05\x00"


def test_udp_associate() -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH)
    conn.data_to_send()
    events = conn.receive_data(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    assert events == [UdpAssociateRequest(Address("0.0.0.0", 0))]
    conn.send_reply(Reply.SUCCEEDED, Address("127.0.0.1", 40000))
    assert conn.data_to_send() == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40"


def test_reply_with_ipv6_bind_address() -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH + CONNECT_LOCAL_80)
    conn.data_to_send()
    conn.send_reply(Reply.SUCCEEDED, Address("::1", 1080))
    assert conn.data_to_send() == b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x04\x38"


def test_username_password() -> None:
    conn = Socks5Connection(CREDS)
    conn.receive_data(b"\x05\x02\x00\x02")
    assert conn.data_to_send() == b"\x05\x02"
    assert conn.state is State.AUTH
    assert conn.receive_data(LOGIN) == []
    assert conn.data_to_send() == b"\x01\x00"
    assert conn.receive_data(CONNECT_LOCAL_80) == [ConnectRequest(Address("127.0.0.1", 80))]


def test_everything_pipelined_with_early_data() -> None:
    conn = Socks5Connection(CREDS)
    events = conn.receive_data(USERPASS + LOGIN + CONNECT_LOCAL_80 + b"GET / HTTP/1.1\r\n")
    assert events == [ConnectRequest(Address("127.0.0.1", 80))]
    assert conn.data_to_send() == b"\x05\x02\x01\x00"
    assert conn.trailing_data == b"GET / HTTP/1.1\r\n"
    assert conn.receive_data(b"more") == []  # arrives while the caller waits: kept as early data
    assert conn.trailing_data == b"GET / HTTP/1.1\r\nmore"


def test_failure_reply_closes() -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH + CONNECT_LOCAL_80)
    conn.data_to_send()
    conn.send_reply(Reply.HOST_UNREACHABLE)
    assert conn.data_to_send() == b"\x05\x04\x00\x01\x00\x00\x00\x00\x00\x00"
    assert conn.state is State.CLOSED


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("password", [b"wrong!", b"s3cre", b"s3cret!", b"S3CRET"])
def test_wrong_password(password: bytes) -> None:
    conn = Socks5Connection(CREDS)
    conn.receive_data(USERPASS)
    conn.data_to_send()
    exc = refused(conn, b"\x01\x05alice" + bytes([len(password)]) + password, AuthError)
    assert exc.code == "bad_credentials"
    assert conn.data_to_send() == b"\x01\x01"


def test_wrong_username() -> None:
    conn = Socks5Connection(CREDS)
    conn.receive_data(USERPASS)
    conn.data_to_send()
    refused(conn, b"\x01\x03bob\x06s3cret", AuthError)
    assert conn.data_to_send() == b"\x01\x01"


def test_password_required_when_configured() -> None:
    conn = Socks5Connection(CREDS)
    exc = refused(conn, NO_AUTH)
    assert exc.code == "no_acceptable_method"
    assert conn.data_to_send() == b"\x05\xff"


@pytest.mark.parametrize("greeting", [USERPASS, b"\x05\x00", b"\x05\x02\x01\x80"])
def test_no_acceptable_method(greeting: bytes) -> None:
    conn = Socks5Connection()
    refused(conn, greeting)
    assert conn.data_to_send() == b"\x05\xff"


@pytest.mark.parametrize("greeting", [b"\x04\x01\x00\x50", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01"])
def test_bad_version_closes_silently(greeting: bytes) -> None:
    conn = Socks5Connection()
    assert refused(conn, greeting).code == "bad_version"
    assert conn.data_to_send() == b""


def test_bad_auth_version() -> None:
    conn = Socks5Connection(CREDS)
    conn.receive_data(USERPASS)
    conn.data_to_send()
    assert refused(conn, b"\x05\x05alice\x06s3cret").code == "bad_version"
    assert conn.data_to_send() == b""


def test_bad_request_version() -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH)
    conn.data_to_send()
    assert refused(conn, b"\x04" + CONNECT_LOCAL_80[1:]).code == "bad_version"
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("command", [2, 0, 4, 0xFF])
def test_unsupported_commands(command: int) -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH)
    conn.data_to_send()
    exc = refused(conn, bytes([5, command]) + CONNECT_LOCAL_80[2:])
    assert exc.code == "command_not_supported"
    assert conn.data_to_send() == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"


def test_unknown_address_type() -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH)
    conn.data_to_send()
    assert refused(conn, b"\x05\x01\x00\x02abcd").code == "bad_address"
    assert conn.data_to_send() == b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"


@pytest.mark.parametrize("name", [b"", b"a b.com", b"evil\x00.com", b"a/b", b"\xff\xfe", b"xn--zz"])
def test_bad_domain_names(name: bytes) -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH)
    conn.data_to_send()
    exc = refused(conn, b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50")
    assert exc.code == "bad_address"
    assert conn.data_to_send() == b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"


def test_trailing_data_is_bounded() -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH + CONNECT_LOCAL_80 + bytes(MAX_TRAILING_DATA))
    assert len(conn.trailing_data) == MAX_TRAILING_DATA
    assert refused(conn, b"x").code == "overflow"


def test_caller_misuse() -> None:
    conn = Socks5Connection()
    with pytest.raises(LocalProtocolError):
        conn.send_reply(Reply.SUCCEEDED)
    refused(conn, b"\x04")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(NO_AUTH)


def test_credentials_validation_and_repr() -> None:
    with pytest.raises(ConfigError):
        Credentials(b"", b"x")
    with pytest.raises(ConfigError):
        Credentials(b"x", b"y" * 256)
    assert "s3cret" not in repr(CREDS)
    assert "alice" in repr(CREDS)


# -- UDP header -----------------------------------------------------------------------------------


def test_udp_datagram_round_trip() -> None:
    packet = encode_udp_datagram(Address("10.0.0.1", 53), b"query")
    assert packet == b"\x00\x00\x00\x01\x0a\x00\x00\x01\x00\x35query"
    assert decode_udp_datagram(packet) == (Address("10.0.0.1", 53), b"query")
    domain = b"\x00\x00\x00\x03\x07example\x00\x35"
    assert decode_udp_datagram(domain) == (Address("example", 53), b"")


@pytest.mark.parametrize(
    ("packet", "code"),
    [
        (b"\x00\x00\x01\x01\x0a\x00\x00\x01\x00\x35data", "fragmented"),
        (b"\x00\x01\x00\x01\x0a\x00\x00\x01\x00\x35data", "bad_udp_header"),
        (b"\x00\x00\x00", "bad_udp_header"),
        (b"\x00\x00\x00\x01\x0a\x00", "bad_udp_header"),
        (b"\x00\x00\x00\x09\x0a\x00\x00\x01\x00\x35", "bad_address"),
    ],
)
def test_udp_datagram_drops(packet: bytes, code: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_udp_datagram(packet)
    assert info.value.code == code


@given(st.binary(max_size=300))
def test_udp_decoder_never_crashes(packet: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_udp_datagram(packet)


# -- property tests -------------------------------------------------------------------------------

addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12),
        min_size=1,
        max_size=4,
    ).map(".".join),
).flatmap(lambda host: st.integers(0, 0xFFFF).map(lambda port: Address(host, port)))


@st.composite
def sessions(draw: st.DrawFn) -> tuple[Credentials | None, bytes, Event]:
    """A valid client flight: greeting, maybe login, request, maybe early data."""
    auth = draw(st.booleans())
    creds = (
        Credentials(
            draw(st.binary(min_size=1, max_size=40)), draw(st.binary(min_size=1, max_size=40))
        )
        if auth
        else None
    )
    needed = 2 if auth else 0
    others = draw(st.lists(st.integers(0, 0xFE).filter(lambda m: m != needed), max_size=10))
    methods = draw(st.permutations([needed, *others]))
    flight = bytes([5, len(methods), *methods])
    if creds is not None:
        flight += bytes([1, len(creds.username)]) + creds.username
        flight += bytes([len(creds.password)]) + creds.password
    dest = draw(addresses)
    command = draw(st.sampled_from([1, 3]))
    flight += bytes([5, command, 0]) + dest.encode()
    event: Event = ConnectRequest(dest) if command == 1 else UdpAssociateRequest(dest)
    return creds, flight + draw(st.binary(max_size=50)), event


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(sessions(), st.lists(st.integers(0, 10_000), max_size=20))
def test_fragmentation_does_not_matter(
    session: tuple[Credentials | None, bytes, Event], cuts: list[int]
) -> None:
    creds, flight, event = session
    whole = Socks5Connection(creds)
    assert whole.receive_data(flight) == [event]
    pieces = Socks5Connection(creds)
    events: list[Event] = []
    sent = b""
    for piece in split(flight, cuts):
        events += pieces.receive_data(piece)
        sent += pieces.data_to_send()
    assert events == [event]
    assert sent == whole.data_to_send()
    assert pieces.trailing_data == whole.trailing_data
    assert pieces.state is whole.state is State.WAIT_REPLY


def _feed_expecting_clean_errors(conn: Socks5Connection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except (RemoteProtocolError, AuthError):
            assert conn.state is State.CLOSED
            return
        conn.data_to_send()


@given(st.booleans(), st.lists(st.binary(max_size=64), max_size=8))
def test_garbage_gives_clean_errors(auth: bool, chunks: list[bytes]) -> None:
    _feed_expecting_clean_errors(Socks5Connection(CREDS if auth else None), chunks)


@given(sessions(), st.integers(0, 10_000), st.integers(0, 255), st.lists(st.integers(0, 10_000)))
def test_corrupted_sessions_give_clean_errors(
    session: tuple[Credentials | None, bytes, Event], where: int, value: int, cuts: list[int]
) -> None:
    creds, flight, _ = session
    corrupted = bytearray(flight)
    corrupted[where % len(flight)] = value
    _feed_expecting_clean_errors(Socks5Connection(creds), split(bytes(corrupted), cuts))


def test_ipv6_events_use_canonical_text() -> None:
    conn = Socks5Connection()
    conn.receive_data(NO_AUTH)
    packed = ipaddress.IPv6Address("2001:db8::1").packed
    (event,) = conn.receive_data(b"\x05\x01\x00\x04" + packed + b"\x00\x50")
    assert event == ConnectRequest(Address("2001:db8::1", 80))
