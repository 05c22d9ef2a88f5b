"""veil.config: the Python API gets the checks the CLI gives, with the CLI's messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from veil.config import (
    DEFAULT_KEEPALIVE,
    ClientOptions,
    ServerOptions,
    parse_keepalive,
    parse_limit,
    parse_port_list,
    parse_rate,
)
from veil.errors import ConfigError
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.session import SessionConfig

LISTEN = Address("127.0.0.1", 8443)
KEY = AccessKey(Address("127.0.0.1", 1), os.urandom(32), os.urandom(32))


@pytest.mark.parametrize(("changes", "message"), [
    ({"cert": Path("c.pem")}, "--cert and --key go together"),
    ({"key": Path("k.pem")}, "--cert and --key go together"),
    ({"max_sessions": 0}, "take a number >= 1"),
    ({"max_sessions_per_user": 0}, "take a number >= 1"),
    ({"user_rate": 100.0}, "too low"),
    ({"pool": "nonsense"}, "bad address pool"),
    ({"pool": "10.9.0.0/31"}, "--pool needs at least a /30"),
    ({"pool6": "fd00::/124"}, "--pool6 needs at least a /120"),
])
def test_server_options_are_checked_when_built(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        ServerOptions(listen=LISTEN, **changes)  # type: ignore[arg-type]


def test_good_server_options() -> None:
    options = ServerOptions(listen=LISTEN, cert=Path("c.pem"), key=Path("k.pem"),
                            user_rate=parse_rate("100Mbit"), pool="10.9.0.0/24", pool6="none")
    assert options.user_rate == 12_500_000


@pytest.mark.parametrize(("changes", "message"), [
    ({"connections": 0}, "--connections takes 1 to 16"),
    ({"connections": 17}, "--connections takes 1 to 16"),
    ({"tls_stack": "schannel"}, "--tls takes browser or openssl"),
    ({"keepalive": (0.1, 10.0)}, "between 0.5 and 3600 seconds"),
    ({"keepalive": (15.0, 4000.0)}, "between 0.5 and 3600 seconds"),
    ({"socks": Address("0.0.0.0", 1080)}, "--socks-auth"),
    ({"http": Address("0.0.0.0", 8118)}, "--http-auth"),
])
def test_client_options_are_checked_when_built(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClientOptions(KEY, **changes)  # type: ignore[arg-type]


def test_from_args_maps_the_flags() -> None:
    options = ClientOptions.from_args(
        KEY, socks=None, http=None, forwards=["8053:9.9.9.9:53/udp"], socks_auth=None,
        connections=4, default_socks=Address("127.0.0.1", 1080), keepalive="30")
    assert options.socks is None and options.forwards[0].udp
    assert options.connections == 4 and options.keepalive == (30.0, 20.0)
    with pytest.raises(ConfigError, match=r"between 0\.5 and 3600"):
        ClientOptions.from_args(KEY, socks=None, http=None, forwards=[], socks_auth=None,
                                connections=1, default_socks=LISTEN, keepalive="0.1")


def test_the_keepalive_default_is_the_sessions() -> None:
    assert ClientOptions(KEY).keepalive == DEFAULT_KEEPALIVE
    config = SessionConfig()
    assert (config.keepalive_interval, config.keepalive_timeout) == DEFAULT_KEEPALIVE
    assert ClientOptions(KEY).session_config().keepalive_interval == DEFAULT_KEEPALIVE[0]
    with pytest.raises(ConfigError, match="SECONDS"):
        parse_keepalive("soon")


def test_parsers() -> None:
    assert parse_limit("50GB") == (50 * 10**9, "month")
    assert parse_limit("1TiB/total") == (2**40, "total")
    assert parse_limit("none") == (None, "month")
    assert parse_rate("20MB") == 20 * 10**6
    with pytest.raises(ConfigError, match="bad rate 'fast'"):
        parse_rate("fast")


def test_connect_pool_is_a_deprecated_alias_of_connections(
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    from veil.cli import main

    assert main(["connect", KEY.to_uri(), "--pool", "0"]) == 2
    assert "veil: error: --connections takes 1 to 16" in capsys.readouterr().err
    assert "connect --pool is deprecated: say --connections 0" in caplog.text
    with pytest.raises(SystemExit):
        main(["connect", "--help"])
    shown = capsys.readouterr().out
    assert "--connections N" in shown and "--pool" not in shown


def test_connect_refuses_a_trojan_websocket_link_with_what_to_use_instead() -> None:
    """The exports hand apps trojan://...&type=ws links for the CDN ways; veil's own Trojan
    client speaks Trojan over TLS only, and says which key reaches that way."""
    from veil.config import parse_key

    plain = "trojan://pw@203.0.113.7:443?sni=example.org#alice"
    assert parse_key(plain).server.port == 443
    ws = ("trojan://pw@cdn.example.org:443?type=ws&path=%2FZm9vYmFyYmF6cXV4cXV1eA%2F"
          "&host=cdn.example.org&sni=cdn.example.org#alice")
    with pytest.raises(ConfigError, match=r"type=ws.*veil:// key"):
        parse_key(ws)


@pytest.mark.parametrize("url", [
    "https://203.0.113.7/s/Zm9vYmFyYmF6cXV4cXV1eA#pin=" + "A" * 43,
    "https://cdn.example.org/Zm9vYmFyYmF6cXV4cXV1eA/s/Zm9vYmFyYmF6cXV4cXV1eA?format=veil",
    "https://[2001:db8::1]:8443/s/Zm9vYmFyYmF6cXV4cXV1eA",
])
def test_a_subscription_url_is_what_user_show_prints(url: str) -> None:
    from veil.config import SubscriptionOptions

    assert SubscriptionOptions(url).url == url


@pytest.mark.parametrize("url", ["https://example.com", "https://example.com/s/",
                                 "https://example.com/page", "https://u@h/s/Zm9vYmFyYmF6cXV4cXV1eA"])
def test_anything_else_is_refused_before_a_fetch(url: str) -> None:
    from veil.config import SubscriptionOptions

    with pytest.raises(ConfigError, match="starts with veil://"):
        SubscriptionOptions(url)


@pytest.mark.parametrize("text, ports", [
    ("25", (25,)), ("none", ()), ("", ()), ("465,25", (25, 465)),
    ("6881-6883, 25", (25, 6881, 6882, 6883))])
def test_refused_port_lists_parse(text: str, ports: tuple[int, ...]) -> None:
    assert parse_port_list(text) == ports


@pytest.mark.parametrize("text", ["smtp", "0", "65536", "30-20", "25,", "-5"])
def test_bad_refused_port_lists_are_one_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--refuse-ports"):
        parse_port_list(text)


# ------------------------------------------------------------------ --workers
def test_workers_take_a_number_or_auto_and_refuse_tun() -> None:
    from veil.config import MAX_WORKERS, parse_workers

    assert parse_workers("3") == 3
    assert parse_workers("auto") == len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match="a number or auto"):
        parse_workers("many")
    listen = Address("127.0.0.1", 0)
    assert ServerOptions(listen=listen).workers == 1  # one process: the path as before
    for count in (0, MAX_WORKERS + 1):
        with pytest.raises(ConfigError, match="--workers takes a number from 1"):
            ServerOptions(listen=listen, workers=count)
    with pytest.raises(ConfigError, match="--tun runs in one process"):
        ServerOptions(listen=listen, workers=2, tun=True)
