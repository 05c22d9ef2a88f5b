"""veil:// keys and trojan:// links read one URI shape (protocol/uri.py) and agree on it."""

from __future__ import annotations

import pytest

from veil.errors import ConfigError
from veil.protocol.accesskey import AccessKey
from veil.protocol.trojan import TrojanLink
from veil.protocol.uri import UriError, parse_authority_uri

SECRET = "A" * 43  # 32 zero bytes, base64url: a user part both parsers accept
PIN = "A" * 43
QUERY = f"?pin={PIN}"


def both(authority: str) -> tuple[AccessKey | str, TrojanLink | str]:
    """Parse ``SECRET@<authority>`` as a key and as a link; the error message if one fails."""
    results: list[AccessKey | TrojanLink | str] = []
    for parse, scheme in ((AccessKey.parse, "veil"), (TrojanLink.parse, "trojan")):
        try:
            results.append(parse(f"{scheme}://{SECRET}@{authority}{QUERY}#label"))
        except ConfigError as exc:
            results.append(str(exc))
    key, link = results
    assert isinstance(key, AccessKey | str) and isinstance(link, TrojanLink | str)
    return key, link


@pytest.mark.parametrize("authority", [
    "[::]:1@[:x:]:4",  # the "two @" bug: urlsplit checks [::] and hands out :x:
    "[::]:1@[fe80::1::2]:4",
    "[:x:]:4",
    "[2001:db8::1:443",  # an unclosed bracket
    "[::1]:99999",
])
def test_both_reject_a_bad_host_or_port(authority: str) -> None:
    key, link = both(authority)
    assert isinstance(key, str) and key.startswith("invalid access key: ")
    assert isinstance(link, str) and link.startswith("invalid trojan link: ")
    assert key.removeprefix("invalid access key: ") == link.removeprefix("invalid trojan link: ")


@pytest.mark.parametrize(("authority", "host", "port"), [
    ("[2001:db8::1]:443", "2001:db8::1", 443),
    ("[2001:DB8::1]:443", "2001:db8::1", 443),  # lower-cased, as urlsplit does
    ("[::1]:8443", "::1", 8443),
    ("VPN.Example.org:1", "vpn.example.org", 1),
    ("192.0.2.1:8080", "192.0.2.1", 8080),
])
def test_both_read_the_same_host_and_port(authority: str, host: str, port: int) -> None:
    key, link = both(authority)
    assert isinstance(key, AccessKey) and isinstance(link, TrojanLink)
    assert key.server == link.server
    assert (key.server.host, key.server.port) == (host, port)
    assert key.label == link.label == "label"


@pytest.mark.parametrize(("authority", "host"), [
    ("[2001:db8::1]", "2001:db8::1"),
    ("vpn.example.org", "vpn.example.org"),
    ("[2001:db8::1]:", "2001:db8::1"),  # an empty port is no port
])
def test_a_missing_port_is_an_error_in_a_key_and_443_in_a_link(authority: str,
                                                                host: str) -> None:
    assert parse_authority_uri(f"veil://{SECRET}@{authority}", "veil").port is None
    key, link = both(authority)
    assert key == "invalid access key: needs SECRET@HOST:PORT"
    assert isinstance(link, TrojanLink) and (link.server.host, link.server.port) == (host, 443)


def test_the_userinfo_runs_to_the_last_at_sign() -> None:
    parts = parse_authority_uri("trojan://p@[::]:1@[2001:db8::1]:4", "trojan")
    assert (parts.userinfo, parts.host, parts.port) == ("p@[::]:1", "2001:db8::1", 4)
    # What the userinfo means is each parser's: all of it is a Trojan password; an access
    # key's secret is base64url, which has no "@".
    assert TrojanLink.parse("trojan://p@[::]:1@[2001:db8::1]:4").password == "p@[::]:1"
    with pytest.raises(ConfigError, match="not base64url"):
        AccessKey.parse(f"veil://{SECRET}@[::]:1@[2001:db8::1]:4{QUERY}")


@pytest.mark.parametrize(("text", "code"), [
    ("veil://a@h:x", "unreadable"),
    ("trojan://a@h:1", "wrong_scheme"),
    ("veil://h:1", "no_user_or_host"),
    ("veil://a@:1", "no_user_or_host"),
    ("veil://a@[::]:1@[:x:]:4", "bad_ipv6"),
])
def test_shape_errors_have_codes(text: str, code: str) -> None:
    with pytest.raises(UriError) as info:
        parse_authority_uri(text, "veil")
    assert info.value.code == code
