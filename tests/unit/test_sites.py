"""Site-to-site decisions (veil.server.sites): who owns an address, who may reach it, and
what a gateway is told to route."""

from __future__ import annotations

import ipaddress

from veil.server.sites import SiteTable
from veil.store.base import User

POOL = ipaddress.ip_network("10.77.0.0/16")


def user(name: str, sites: tuple[str, ...] = (), reach: tuple[str, ...] = (),
         revoked: bool = False) -> User:
    return User(name, b"s", name.encode(), 0.0, revoked_at=1.0 if revoked else None,
                sites=sites, reach=reach)


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


TABLE = SiteTable([
    user("sh", ("192.168.10.0/24", "fd10::/64")),
    user("bj", ("192.168.20.0/24", "192.168.20.128/25")),  # longest prefix decides
    user("lab", ("10.9.0.0/16",), reach=("sh",)),
    user("alice", reach=("192.168.20.0/26",)),
    user("bob"),
    user("gone", ("172.16.0.0/24",), revoked=True),
    user("bad", ("10.77.5.0/24",)),  # inside the pool: not routed
], [POOL])


def test_addresses_belong_to_their_site_by_longest_prefix() -> None:
    assert TABLE.site_of(ip("192.168.10.7")) == "sh"
    assert TABLE.site_of(ip("fd10::9")) == "sh"
    assert TABLE.site_of(ip("192.168.20.200")) == "bj"
    assert TABLE.site_of(ip("192.168.30.1")) is None
    assert TABLE.site_of(ip("172.16.0.1")) is None  # a revoked site routes nothing
    assert TABLE.site_of(ip("10.77.5.1")) is None  # nor a subnet over the pool
    assert TABLE.site_of(b"") is None
    assert bool(TABLE) and not SiteTable([user("bob")])


def test_sites_reach_sites_users_only_what_they_are_given() -> None:
    assert TABLE.may_reach("sh", "bj", ip("192.168.20.1"))
    assert not TABLE.may_reach("sh", "sh", ip("192.168.10.1"))
    assert TABLE.may_reach("lab", "sh", ip("192.168.10.1"))
    assert not TABLE.may_reach("lab", "bj", ip("192.168.20.1"))  # its list is all it has
    assert TABLE.may_reach("alice", "bj", ip("192.168.20.5"))
    assert not TABLE.may_reach("alice", "bj", ip("192.168.20.100"))
    assert not TABLE.may_reach("bob", "sh", ip("192.168.10.1"))
    # Replies: bj's host answers lab (lab may not reach bj, but bj reaches lab's sites).
    assert TABLE.allowed("bj", ip("192.168.20.1"), "lab", ip("10.9.0.1"))
    assert TABLE.allowed("lab", ip("10.9.0.1"), "bj", ip("192.168.20.1"))
    # A device is never reached from a site unless it reaches that site itself.
    assert not TABLE.allowed("bob", ip("10.77.0.2"), "sh", ip("192.168.10.1"))


def test_gateways_are_told_the_subnets_they_reach() -> None:
    # A revoked site's subnets stay announced (its traffic is dropped at the server): a
    # route withdrawn would let the LAN's packets for it out by the default route.
    assert TABLE.routes_for("sh") == nets("192.168.20.0/24", "192.168.20.128/25",
                                          "10.9.0.0/16", "172.16.0.0/24")
    # lab reaches sh only, but bj reaches every site, lab's included: the replies to bj's
    # hosts must go back through the tunnel too.
    assert TABLE.routes_for("lab") == nets("192.168.10.0/24", "fd10::/64",
                                           "192.168.20.0/24", "192.168.20.128/25")
    assert TABLE.routes_for("alice") == nets("192.168.20.0/26")
    assert TABLE.routes_for("bob") == ()
