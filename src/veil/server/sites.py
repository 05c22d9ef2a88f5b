"""Site-to-site routing decisions (docs/site-to-site.md), without I/O.

A *site* is a user with subnets (``veil user add office-sh --site 192.168.10.0/24``): its
gateway runs ``veil connect KEY --tun --site`` and the server hands every packet for those
subnets to that site's live session. :class:`SiteTable` is a snapshot of the users that says,
for one packet, which site owns an address (longest prefix) and whether the packet may pass.

The rule (``--reach``): a user whose reach list is empty reaches every other site if it is a
site itself, and no site otherwise; a reach list (CIDRs, site names) is exactly what it
reaches. A reach grants a two-way path between the two ends (replies must come back, and the
server keeps no per-flow state): a packet between X and Y passes when X may reach Y's
address or Y may reach X's. A one-way policy inside that path is the gateway's firewall's.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from veil.store.base import User

log = logging.getLogger("veil.server")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class _Reach:
    networks: tuple[IPNetwork, ...]
    sites: frozenset[str]


class SiteTable:
    """Which site owns which subnet, and who may reach which; immutable once built."""

    def __init__(self, users: Iterable[User],
                 pools: Iterable[IPNetwork] = ()) -> None:
        pools = tuple(pools)
        #: Each site's subnets (those that do not overlap the server's pools).
        self.subnets: dict[str, tuple[IPNetwork, ...]] = {}
        # Revoked (or expired...) sites' subnets: still announced to the gateways that
        # reach them, so those keep routing them into the tunnel, where they are dropped:
        # withdrawn, the routes would let the LAN's packets for them out by the default
        # route, to the Internet.
        self._dormant: dict[str, tuple[IPNetwork, ...]] = {}
        self._reach: dict[str, _Reach] = {}
        # Per address length (4 or 16 bytes): (prefix length, {masked address: site}),
        # longest prefix first: one dict lookup per distinct prefix length.
        self._by_length: dict[int, list[tuple[int, int, dict[int, str]]]] = {4: [], 16: []}
        tables: dict[tuple[int, int], dict[int, str]] = {}
        for user in users:
            if user.reach:
                nets: list[IPNetwork] = []
                names: set[str] = set()
                for value in user.reach:
                    try:
                        nets.append(ipaddress.ip_network(value))
                    except ValueError:
                        names.add(value)
                self._reach[user.name] = _Reach(tuple(nets), frozenset(names))
            if not user.sites:
                continue
            if not user.active:
                self._dormant[user.name] = tuple(map(ipaddress.ip_network, user.sites))
                continue
            mine: list[IPNetwork] = []
            for value in user.sites:
                net = ipaddress.ip_network(value)
                if any(net.version == pool.version and net.overlaps(pool) for pool in pools):
                    # The store cannot know every server's --pool: refused here, loudly.
                    log.error("site %s: subnet %s overlaps the tunnel's address pool; not "
                              "routed", user.name, net)
                    continue
                mine.append(net)
                size = 4 if net.version == 4 else 16
                tables.setdefault((size, net.prefixlen), {})[int(net.network_address)] = (
                    user.name)
            if mine:
                self.subnets[user.name] = tuple(mine)
        for (size, prefixlen), table in tables.items():
            bits = size * 8
            mask = ((1 << prefixlen) - 1) << (bits - prefixlen) if prefixlen else 0
            self._by_length[size].append((prefixlen, mask, table))
        for entries in self._by_length.values():
            entries.sort(reverse=True, key=lambda entry: entry[0])

    def __bool__(self) -> bool:
        return bool(self.subnets)

    def site_of(self, address: bytes) -> str | None:
        """The site whose subnet holds ``address`` (packed, 4 or 16 bytes), or None."""
        entries = self._by_length.get(len(address))
        if not entries:
            return None
        value = int.from_bytes(address, "big")
        for _, mask, table in entries:
            site = table.get(value & mask)
            if site is not None:
                return site
        return None

    def is_site(self, user: str) -> bool:
        return user in self.subnets

    def may_reach(self, user: str, site: str, address: bytes) -> bool:
        """Whether ``user`` may reach ``address`` of ``site`` (the address is the site's:
        one of its subnets, or its gateway's tunnel address)."""
        if user == site:
            return False
        reach = self._reach.get(user)
        if reach is None:
            return self.is_site(user)  # sites reach sites; others, what they are given
        if site in reach.sites:
            return True
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in reach.networks)

    def allowed(self, user: str, source: bytes, site: str, destination: bytes) -> bool:
        """Whether a packet of ``user``'s session from ``source`` to ``destination`` of
        ``site`` passes: either end may reach the other (see the module docstring)."""
        if self.may_reach(user, site, destination):
            return True
        return self.is_site(user) and self.may_reach(site, user, source)

    def routes_for(self, user: str) -> tuple[IPNetwork, ...]:
        """The site subnets ``user`` reaches (or that reach it): what its gateway routes
        into the tunnel. A reach CIDR inside a site's subnet is announced as itself."""
        routes: list[IPNetwork] = []
        reach = self._reach.get(user)
        for site, nets in (*self.subnets.items(), *self._dormant.items()):
            if site == user:
                continue
            whole = (reach is None and self.is_site(user)) or (
                reach is not None and site in reach.sites) or self._reaches_all(site, user)
            for net in nets:
                if whole:
                    routes.append(net)
                    continue
                for cidr in reach.networks if reach is not None else ():
                    if cidr.version == net.version and cidr.overlaps(net):
                        routes.append(cidr if cidr.subnet_of(net) else net)  # type: ignore[arg-type]
        return tuple(dict.fromkeys(routes))

    def _reaches_all(self, site: str, user: str) -> bool:
        """Whether ``site`` reaches every address of ``user``'s own site."""
        if not self.is_site(user):
            return False
        reach = self._reach.get(site)
        if reach is None:
            return self.is_site(site)
        return user in reach.sites
