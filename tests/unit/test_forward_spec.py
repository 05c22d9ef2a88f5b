"""The ``[LHOST:]LPORT:RHOST:RPORT[/udp]`` forward spec parser."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.config import ForwardSpec, parse_forward_spec
from veil.errors import ConfigError
from veil.protocol.address import Address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "8080:example.com:80",
            ForwardSpec(Address("127.0.0.1", 8080), Address("example.com", 80)),
        ),
        (
            "0.0.0.0:5353:1.1.1.1:53/udp",
            ForwardSpec(Address("0.0.0.0", 5353), Address("1.1.1.1", 53), udp=True),
        ),
        (
            "[::1]:8443:[2001:db8::1]:443",
            ForwardSpec(Address("::1", 8443), Address("2001:db8::1", 443)),
        ),
        (
            "53:[2606:4700:4700::1111]:53/UDP",
            ForwardSpec(Address("127.0.0.1", 53), Address("2606:4700:4700::1111", 53), udp=True),
        ),
        (
            "localhost:2222:git.example:22/tcp",
            ForwardSpec(Address("localhost", 2222), Address("git.example", 22)),
        ),
        (
            "  1:b\u00fccher.example:65535  ",
            ForwardSpec(Address("127.0.0.1", 1), Address("b\u00fccher.example", 65535)),
        ),
    ],
)
def test_valid_specs(text: str, expected: ForwardSpec) -> None:
    assert parse_forward_spec(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "8080",
        "8080:example.com",
        "1:2:3:4:5",
        "8080:example.com:0",
        "8080:example.com:65536",
        "8080:example.com:99999999999999999999999",
        "http:example.com:80",
        "8080:example.com:80/sctp",
        "8080:example.com:80/",
        "[::1:8080:example.com:80",
        "::1]:8080:example.com:80",
        "::1:8080:example.com:80",
        "[[::1]]:8080:example.com:80",
        "[example.com]:8080:example.com:80",
        "8080:[]:80",
        "8080::80",
        ":8080:example.com:80",
        "8080:exa mple.com:80",
        "8080:example.com:\uff18\uff10",
        "8080:example.com:+80",
        "8080:" + "a" * 300 + ":80",
        "8080:" + "a" * 64 + ".com:80",
        "8080:exam\nple.com:80",
        "8080:ex[am]ple.com:80",
    ],
)
def test_invalid_specs(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_forward_spec(text)
    message = str(info.value)
    assert "\n" not in message
    assert "[LHOST:]LPORT:RHOST:RPORT[/udp]" in message
    assert info.value.code == "bad_forward"


def test_local_port_0_lets_the_system_pick_but_the_destination_needs_a_port() -> None:
    # A listener may bind port 0 (and logs the port it got); nothing can be sent to port 0.
    assert parse_forward_spec("0:example.com:80") == ForwardSpec(
        Address("127.0.0.1", 0), Address("example.com", 80))
    assert parse_forward_spec("[::1]:0:1.1.1.1:53/udp") == ForwardSpec(
        Address("::1", 0), Address("1.1.1.1", 53), udp=True)
    with pytest.raises(ConfigError, match="RPORT must be a number from 1 to 65535") as info:
        parse_forward_spec("0:example.com:0")
    assert info.value.code == "bad_forward"


def test_long_input_is_shortened_in_the_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse_forward_spec("x" * 10_000)
    assert len(str(info.value)) < 300


def test_str_is_a_spec() -> None:
    spec = parse_forward_spec("[::1]:53:[2606:4700::1111]:53/udp")
    assert str(spec) == "[::1]:53:[2606:4700::1111]:53/udp"
    assert parse_forward_spec(str(spec)) == spec


hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12),
        min_size=1,
        max_size=4,
    ).map(".".join),
)
ports = st.integers(1, 0xFFFF)
local_ports = st.integers(0, 0xFFFF)


@given(hosts, local_ports, hosts, ports, st.booleans())
def test_round_trip(lhost: str, lport: int, rhost: str, rport: int, udp: bool) -> None:
    spec = ForwardSpec(Address(lhost, lport), Address(rhost, rport), udp)
    assert parse_forward_spec(str(spec)) == spec


@given(st.text(max_size=80))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    try:
        spec = parse_forward_spec(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(spec, ForwardSpec)


@given(st.lists(st.sampled_from(["[", "]", ":", "::1", "80", "a", "/udp", "0", "."]), max_size=12))
def test_spec_shaped_text_parses_or_raises_config_error(parts: list[str]) -> None:
    with contextlib.suppress(ConfigError):
        parse_forward_spec("".join(parts))
