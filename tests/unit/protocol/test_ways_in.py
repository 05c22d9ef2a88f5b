"""Several ways in per key: the ``via=`` parameters of a veil:// key (protocol/endpoint.py)."""

from __future__ import annotations

import os
import re

import pytest

from veil.errors import ConfigError
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.endpoint import MAX_VIA, parse_endpoint, tls_endpoint

SECRET = "A" * 43
PIN = "A" * 43
OLD_KEY = f"veil://{SECRET}@198.51.100.1:443?pin={PIN}#alice"
CDN_PATH = "/Zm9vYmFyYmF6cXV4cXV1eA/"


def key_with(*via: str) -> AccessKey:
    return AccessKey(Address("198.51.100.1", 443), os.urandom(32), os.urandom(32), "a.example",
                     "alice", tuple(parse_endpoint(text) for text in via))


def test_a_key_with_ways_in_round_trips_on_one_line() -> None:
    key = key_with("tls://203.0.113.7:8443", "tls://[2001:db8::7]:443",
                   "h3://cdn.example.org/p?a=1&b=2#x", f"https://cdn.example.org{CDN_PATH}")
    uri = key.to_uri()
    assert "\n" not in uri and " " not in uri
    assert "&via=tls://203.0.113.7:8443&via=tls://%5B2001:db8::7%5D:443&" in uri
    # What could end the parameter or the key is escaped: & # ? + in a future scheme's URL.
    assert "via=h3://cdn.example.org/p%3Fa%3D1%26b%3D2%23x&" in uri
    assert uri.endswith(f"via=https://cdn.example.org{CDN_PATH}#alice")
    assert AccessKey.parse(uri) == key
    assert [str(way) for way in key.ways()] == [
        "198.51.100.1:443", "203.0.113.7:8443", "[2001:db8::7]:443",
        "h3://cdn.example.org/p?a=1&b=2#x",
        "https://cdn.example.org/..."]  # logs name a CDN way without its secret path


def test_the_briefs_fully_escaped_form_reads_the_same() -> None:
    key = AccessKey.parse(f"{OLD_KEY.split('#')[0]}&via=tls%3A%2F%2F203.0.113.7%3A8443")
    assert key.via == (tls_endpoint(Address("203.0.113.7", 8443)),)


def test_an_old_key_parses_unchanged() -> None:
    key = AccessKey.parse(OLD_KEY)
    assert key.via == ()
    assert key.ways() == (tls_endpoint(Address("198.51.100.1", 443)),)
    assert key.to_uri() == OLD_KEY


def test_unknown_schemes_are_kept_and_marked_unusable() -> None:
    key = AccessKey.parse(f"{OLD_KEY.split('#')[0]}&via=quic%3A%2F%2Fx.example%3A443"
                          "&via=tls://203.0.113.7:8443")
    assert [(way.scheme, way.known) for way in key.via] == [("quic", False), ("tls", True)]
    assert key.via[0].address is None
    assert AccessKey.parse(key.to_uri()) == key


@pytest.mark.parametrize(("via", "reason"), [
    ("tls://203.0.113.7", "expected host:port"),
    ("tls://203.0.113.7:0", "port 0 is not 1-65535"),
    ("tls://203.0.113.7:99999", "port out of range"),
    ("tls://2001:db8::1:443", "IPv6 addresses need brackets"),
    ("tls://[2001:db8::zz]:443", "Only hex digits"),
    ("tls://203.0.113.7:443/path", "tls:// takes HOST:PORT and nothing else"),
    ("tls://u@203.0.113.7:443", "tls:// takes HOST:PORT and nothing else"),
    ("203.0.113.7:443", "is not a URL"),
    ("://x", "is not a URL"),
    ("1tls://x:1", "is not a URL"),
    ("tls://a b:1", "one line of printable ASCII"),
    ("tls://ä.example:1", "one line of printable ASCII"),
    ("https://x/" + "a" * 600, "longer than 512 characters"),
    ("tls://198.51.100.1:443", "repeats a way in"),
])
def test_bad_ways_in_are_refused_with_the_reason(via: str, reason: str) -> None:
    from urllib.parse import quote

    with pytest.raises(ConfigError, match="invalid access key") as info:
        AccessKey.parse(f"{OLD_KEY.split('#')[0]}&via={quote(via, safe='')}")
    assert reason in str(info.value)


def test_a_repeated_way_in_and_too_many_are_refused() -> None:
    base = OLD_KEY.split("#")[0]
    with pytest.raises(ConfigError, match="repeats a way in"):
        AccessKey.parse(f"{base}&via=tls://203.0.113.7:1&via=TLS://203.0.113.7:1")
    many = "".join(f"&via=tls://203.0.113.7:{port}" for port in range(1, MAX_VIA + 2))
    with pytest.raises(ConfigError, match=f"at most {MAX_VIA}"):
        AccessKey.parse(base + many)


@pytest.mark.parametrize(("via", "reason"), [
    ("https://cdn.example.org/short/", "at least 16 characters"),
    ("https://cdn.example.org/Zm9vYmFyYmF6cXV4cXV1eA", "at least 16 characters"),
    ("wss://cdn.example.org/Zm9vYmFy//YmF6cXV4cXV1eA/", "at least 16 characters"),
    ("https://user@cdn.example.org/Zm9vYmFyYmF6cXV4cXV1eA/", "HOST[:PORT]/SECRET/"),
    ("https://cdn.example.org/Zm9vYmFyYmF6cXV4cXV1eA/?x=1", "HOST[:PORT]/SECRET/"),
])
def test_a_cdn_way_needs_a_secret_path_and_nothing_else(via: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        parse_endpoint(via)


def test_a_cdn_way_reads_its_host_port_and_path() -> None:
    way = parse_endpoint("WSS://CDN.example.org:8443/Zm9vYmFyYmF6cXV4cXV1eA/")
    assert (way.scheme, way.address, way.path, way.through_cdn) == (
        "wss", Address("cdn.example.org", 8443), "/Zm9vYmFyYmF6cXV4cXV1eA/", True)
    assert way.url == "wss://cdn.example.org:8443/Zm9vYmFyYmF6cXV4cXV1eA/"
    assert parse_endpoint("https://[2001:db8::1]/Zm9vYmFyYmF6cXV4cXV1eA/").address == Address(
        "2001:db8::1", 443)
