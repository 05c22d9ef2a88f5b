"""TUN mode's pure parts: the address pool, the nftables rulesets, the crash-recovery file."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from pathlib import Path

import pytest

if sys.platform != "linux":
    pytest.skip("TUN mode is Linux only", allow_module_level=True)

from veil.client.tun import (
    KILLSWITCH_TABLE,
    TunClientOptions,
    TunState,
    killswitch_ruleset,
    resolve_ways,
)
from veil.errors import ConfigError
from veil.net.tun_linux import TunError
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.endpoint import parse_endpoint
from veil.server.tun import AddressPool, TunServer, TunServerOptions, resolvers_from


def pool(v4: str = "10.77.0.0/29", v6: str | None = "fd77::/64") -> AddressPool:
    return AddressPool(ipaddress.IPv4Network(v4), ipaddress.IPv6Network(v6) if v6 else None)


def test_the_server_has_index_1_and_clients_share_the_index_across_families() -> None:
    p = pool()
    assert p.server() == (ipaddress.IPv4Interface("10.77.0.1/29"),
                          ipaddress.IPv6Interface("fd77::1/64"))
    index = p.allocate("alice")
    assert p.interfaces(index) == (ipaddress.IPv4Interface("10.77.0.2/29"),
                                   ipaddress.IPv6Interface("fd77::2/64"))


def test_a_user_gets_its_address_back_and_two_sessions_get_two() -> None:
    p = pool()
    a1 = p.allocate("alice")
    a2 = p.allocate("alice")  # a second device with the same key
    b = p.allocate("bob")
    assert len({a1, a2, b}) == 3
    p.release(a2)
    p.release(b)
    assert p.allocate("bob") == b  # stable per user
    assert p.allocate("alice") == a2


def test_the_pool_runs_out_then_reuses_addresses_of_users_gone() -> None:
    p = pool()  # /29: 8 addresses, minus network, broadcast and the server: 5 clients
    got = [p.allocate(f"u{i}") for i in range(5)]
    assert sorted(i for i in got if i is not None) == [2, 3, 4, 5, 6]
    assert p.allocate("late") is None
    p.release(got[0])  # type: ignore[arg-type]
    assert p.allocate("late") == got[0]  # u0 is gone: its remembered address is taken
    p.release(got[1])  # type: ignore[arg-type]
    assert p.allocate("u0") == got[1]  # and u0 comes back to a free one


def test_pool_options_are_validated() -> None:
    opts = TunServerOptions.parse("10.9.0.0/24", "none")
    assert opts.pool6 is None and str(opts.pool) == "10.9.0.0/24"
    for bad in (("10.9.0.0/31", None), ("nonsense", None), (None, "fd00::/124")):
        with pytest.raises(ConfigError):
            TunServerOptions.parse(*bad)


def test_server_ruleset() -> None:
    server = TunServer(TunServerOptions.parse(None, None))
    rules = server.ruleset("veils0")
    assert rules.startswith("table inet veil {")
    assert 'iifname "veils0" oifname "veils0" drop' in rules  # no client-to-client
    assert 'oifname != "veils0" ip saddr 10.77.0.0/16 masquerade' in rules
    assert 'oifname != "veils0" ip6 saddr fd77::/64 masquerade' in rules
    assert "192.168.0.0/16" in rules and "tcp option maxseg size set rt mtu" in rules
    open_rules = TunServer(TunServerOptions.parse(None, None, allow_private=True)).ruleset("t")
    assert "192.168.0.0/16" not in open_rules and 'iifname "t" drop' not in open_rules
    assert "dport" not in open_rules  # no port refused unless asked
    smtp = TunServer(TunServerOptions.parse(None, None, refused_tcp_ports=(25, 465)))
    assert 'iifname "t" tcp dport { 25, 465 } reject with tcp reset' in smtp.ruleset("t")


def test_resolvers_skip_loopback_stubs(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver 9.9.9.9\nnameserver fe80::1%eth0\n")
    assert resolvers_from(conf) == (ipaddress.ip_address("9.9.9.9"),)
    conf.write_text("nameserver 127.0.0.53\n")
    assert ipaddress.ip_address("1.1.1.1") in resolvers_from(conf)


def test_killswitch_ruleset() -> None:
    excl = TunClientOptions.parse(["192.168.1.0/24", "fd00::/8"]).exclude
    rules = killswitch_ruleset("veil0", [Address("203.0.113.9", 443)], excl)
    assert rules.startswith(f"table inet {KILLSWITCH_TABLE} {{")
    lines = [line.strip() for line in rules.splitlines()]
    assert lines.index('oifname "veil0" accept') < lines.index(
        "reject with icmpx type admin-prohibited")
    assert "ip daddr 203.0.113.9 tcp dport 443 accept" in lines
    assert "ip daddr 192.168.1.0/24 accept" in lines and "ip6 daddr fd00::/8 accept" in lines
    v6 = killswitch_ruleset("veil0", [Address("2001:db8::9", 8443)], ())
    assert "ip6 daddr 2001:db8::9 tcp dport 8443 accept" in v6
    with pytest.raises(ConfigError):
        TunClientOptions.parse(["not-a-cidr"])


def _output_rules(ruleset: str) -> list[str]:
    lines = [line.strip() for line in ruleset.splitlines()]
    return lines[lines.index("chain output {") + 2:lines.index("chain forward {") - 1]


def test_killswitch_lets_every_way_in_through_and_nothing_else() -> None:
    """Each way's ip:port, IPv4 and IPv6, once each (two ways on one address:port share a
    rule); no rule that accepts more (no bare address, no other port)."""
    ways = [Address("203.0.113.9", 8443), Address("198.51.100.7", 443),
            Address("2001:db8::9", 443), Address("203.0.113.9", 443),
            Address("198.51.100.7", 443)]
    rules = _output_rules(killswitch_ruleset("veil0", ways, ()))
    accepted = [r for r in rules if "daddr" in r]
    assert accepted == ["ip daddr 203.0.113.9 tcp dport 8443 accept",
                        "ip daddr 198.51.100.7 tcp dport 443 accept",
                        "ip6 daddr 2001:db8::9 tcp dport 443 accept",
                        "ip daddr 203.0.113.9 tcp dport 443 accept"]
    assert rules[-1] == "reject with icmpx type admin-prohibited"


SECRET_PATH = "/" + "s" * 22 + "/"


def _key() -> AccessKey:
    return AccessKey(Address("veil.example", 8443), bytes(32), bytes(32), via=(
        parse_endpoint("tls://198.51.100.7:443"),
        parse_endpoint(f"https://cdn.example{SECRET_PATH}"),
        parse_endpoint(f"wss://cdn.example{SECRET_PATH}"),
        parse_endpoint(f"https://gone.example{SECRET_PATH}"),
        parse_endpoint("quic://later.example:443")), noise_key=bytes(32))


def _fake_dns(monkeypatch: pytest.MonkeyPatch, names: dict[str, str]) -> list[str]:
    asked: list[str] = []

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[object]:
        asked.append(host)
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_every_way_is_resolved_once_and_a_name_that_fails_is_left_out(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    asked = _fake_dns(monkeypatch, {"veil.example": "203.0.113.9",
                                    "cdn.example": "192.0.2.44"})
    pinned, addresses = asyncio.run(resolve_ways(_key()))
    assert pinned == {"veil.example": "203.0.113.9", "198.51.100.7": "198.51.100.7",
                      "cdn.example": "192.0.2.44"}
    assert addresses == [Address("203.0.113.9", 8443), Address("198.51.100.7", 443),
                         Address("192.0.2.44", 443)]  # the https:// and wss:// way: one
    assert sorted(asked) == ["cdn.example", "gone.example", "veil.example"]  # once per name
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "gone.example" in warnings[0], warnings


def test_no_way_resolving_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {})
    key = AccessKey(Address("veil.example", 8443), bytes(32), bytes(32), via=(
        parse_endpoint(f"https://cdn.example{SECRET_PATH}"),), noise_key=bytes(32))
    with pytest.raises(TunError, match="cannot resolve any way in"):
        asyncio.run(resolve_ways(key))


def test_state_file_round_trip(tmp_path: Path) -> None:
    state = TunState(tmp_path / "run" / "tun-1.json")
    state.routes.append({"dst": "203.0.113.9/32", "gateway": "10.0.0.1", "oif": 2})
    state.nft_tables.append(KILLSWITCH_TABLE)
    state.resolv_conf, state.resolv_backup = "/etc/resolv.conf", "nameserver 10.0.0.1\n"
    state.save()
    loaded = TunState.load(state.path)
    assert loaded == state
    assert TunState.load(tmp_path / "missing.json") is None
