"""Authentication messages, the replay filter, access keys and the destination policy."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.errors import ConfigError, RemoteProtocolError
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address, NeedMoreData, parse_host_port
from veil.protocol.auth import AUTH_SIZE, Credential, ReplayFilter, build_auth, verify_auth
from veil.server.clienthello import record_length, server_name
from veil.server.policy import DestinationPolicy, local_addresses

SECRET = bytes(range(32))
BINDING = b"b" * 12
NOW = 1_800_000_000.0


def test_a_fresh_message_is_accepted_once() -> None:
    cred = Credential.from_secret(SECRET)
    msg = build_auth(cred, BINDING, NOW)
    assert len(msg) == AUTH_SIZE
    replay = ReplayFilter()
    assert verify_auth(msg, cred, BINDING, NOW + 1, replay) is None
    assert verify_auth(msg, cred, BINDING, NOW + 2, replay) == "replay"


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: m[:-1] + bytes([m[-1] ^ 1]), "bad_tag"),
    (lambda m: bytes([m[0] ^ 1]) + m[1:], "bad_tag"),
    (lambda m: m[:16] + bytes([m[16] ^ 1]) + m[17:], "bad_tag"),
    (lambda m: m[:40], "bad_length"),
])
def test_altered_messages_are_rejected(mutate, reason: str) -> None:
    cred = Credential.from_secret(SECRET)
    msg = build_auth(cred, BINDING, NOW)
    assert verify_auth(mutate(msg), cred, BINDING, NOW, ReplayFilter()) == reason


def test_another_connection_binding_is_rejected() -> None:
    cred = Credential.from_secret(SECRET)
    msg = build_auth(cred, BINDING, NOW)
    assert verify_auth(msg, cred, b"other tls connection", NOW, ReplayFilter()) == "bad_tag"


def test_stale_and_future_timestamps_are_rejected() -> None:
    cred = Credential.from_secret(SECRET)
    assert verify_auth(build_auth(cred, BINDING, NOW - 121), cred, BINDING, NOW,
                       ReplayFilter()) == "stale"
    assert verify_auth(build_auth(cred, BINDING, NOW + 121), cred, BINDING, NOW,
                       ReplayFilter()) == "stale"
    assert verify_auth(build_auth(cred, BINDING, NOW - 119), cred, BINDING, NOW,
                       ReplayFilter()) is None


def test_access_key_round_trip() -> None:
    key = AccessKey(Address("2001:db8::1", 443), os.urandom(32), os.urandom(32), "a.example",
                    "alice smith")
    assert AccessKey.parse(key.to_uri()) == key
    assert key.to_uri().startswith("veil://") and "[2001:db8::1]:443" in key.to_uri()


@pytest.mark.parametrize("uri", [
    "", "veil://", "http://x@h:1", "veil://AAAA@h:1?pin=" + "A" * 43,
    "veil://" + "A" * 43 + "@h:1", "veil://" + "A" * 43 + "@h:99999?pin=" + "A" * 43,
    "veil://" + "A" * 43 + "@h?pin=" + "A" * 43, "veil://!!!@h:1?pin=" + "A" * 43,
])
def test_bad_access_keys_raise_config_errors(uri: str) -> None:
    with pytest.raises(ConfigError):
        AccessKey.parse(uri)


@given(st.text(max_size=200))
def test_access_key_parser_never_crashes(text: str) -> None:
    try:
        AccessKey.parse(text)
    except ConfigError:
        pass


@given(st.binary(max_size=300))
def test_address_decoder_never_crashes(data: bytes) -> None:
    try:
        Address.decode(data)
    except (NeedMoreData, ValueError, RemoteProtocolError):
        pass


def test_host_port_parsing() -> None:
    assert parse_host_port("[::1]:80") == Address("::1", 80)
    assert parse_host_port("example.org", 443) == Address("example.org", 443)
    for bad in ("::1:80", "host:", ":80", "host:x", "[::1"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_policy_refuses_private_ranges_by_default() -> None:
    strict, lax = DestinationPolicy(), DestinationPolicy(allow_private=True)
    for text in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.1.1", "::1", "fe80::1",
                 "fc00::1", "224.0.0.1", "0.0.0.0", "100.64.0.1", "::ffff:127.0.0.1"):
        ip = ipaddress.ip_address(text)
        assert not strict.allows(ip), text
        assert lax.allows(ip)
    for text in ("1.1.1.1", "2606:4700:4700::1111"):
        assert strict.allows(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", [
    "2002:7f00:1::1", "2002:a00:1::", "2002:c0a8:101::1",  # 6to4 of 127.0.0.1, 10/8, 192.168/16
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",  # NAT64 of loopback, of cloud metadata
    "64:ff9b:1::1",  # local-use NAT64
    "::127.0.0.1", "::ffff:169.254.169.254",  # IPv4-compatible, IPv4-mapped
    "192.0.0.9", "192.0.0.200", "fec0::1", "168.63.129.16", "2001:0:4136:e378::1",
    "198.18.0.1", "100::1", "255.255.255.255"])
def test_policy_refuses_what_hides_a_private_address(text: str) -> None:
    # The table decides, not Python's is_private (3.11.2 and 3.11.7 disagree on several).
    assert not DestinationPolicy().allows(ipaddress.ip_address(text))


@pytest.mark.parametrize("text", ["2002:808:808::1", "64:ff9b::808:808", "::ffff:8.8.8.8",
                                  "9.9.9.9", "2a00:1450:4001::1"])
def test_policy_lets_public_addresses_through_whatever_their_form(text: str) -> None:
    assert DestinationPolicy().allows(ipaddress.ip_address(text))


@pytest.mark.skipif(sys.platform != "linux", reason="netlink lists addresses on Linux only")
def test_local_addresses_are_listed_inside_a_running_event_loop() -> None:
    # The server builds its policy inside its loop, where pyroute2's own loop cannot start.
    async def inside() -> list[str]:
        return local_addresses()

    assert "127.0.0.1" in asyncio.run(inside())
    assert "127.0.0.1" in local_addresses()


def test_policy_refuses_the_servers_own_addresses() -> None:
    policy = DestinationPolicy.for_server(False, ["0.0.0.0", "vpn.example.org", "9.9.9.9",
                                                  "2a00:1450:4001::1", "fe80::1%eth0"])
    for text in ("9.9.9.9", "2a00:1450:4001::1", "::ffff:9.9.9.9", "2002:909:909::1"):
        assert not policy.allows(ipaddress.ip_address(text)), text
    assert policy.allows(ipaddress.ip_address("8.8.8.8"))
    lax = DestinationPolicy.for_server(True, ["9.9.9.9"])
    assert lax.allows(ipaddress.ip_address("9.9.9.9"))


def client_hello(sni: str | None) -> bytes:
    ext = b""
    if sni:
        name = sni.encode()
        entry = b"\x00" + len(name).to_bytes(2, "big") + name
        body = len(entry).to_bytes(2, "big") + entry
        ext = b"\x00\x00" + len(body).to_bytes(2, "big") + body
    hello = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
             + len(ext).to_bytes(2, "big") + ext)
    handshake = b"\x01" + len(hello).to_bytes(3, "big") + hello
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def test_sni_is_read_from_a_client_hello() -> None:
    record = client_hello("Example.ORG")
    assert record_length(record[:5]) == len(record)
    assert server_name(record) == "example.org"
    assert server_name(client_hello(None)) is None
    assert record_length(b"GET /") is None


@given(st.binary(max_size=600))
def test_client_hello_parser_never_crashes(data: bytes) -> None:
    server_name(b"\x16\x03\x01\x00\x00" + data)
