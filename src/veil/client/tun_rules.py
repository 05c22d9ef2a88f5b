"""Split routing in TUN mode (``veil connect KEY --tun --rules ...``), sans-IO.

In TUN mode the client sees packets, not connections, so the rules are applied where the
kernel decides: by routes and the kill switch for addresses, and by the client's own DNS
resolver for names. This module turns a :class:`~veil.client.rules.RuleSet` into

* a :class:`TunRoutePlan`: the address ranges that go direct (routes via the original
  gateway, and the kill switch's allowance) and the ranges that are blocked (rejected by the
  kill switch). First match wins exactly as in :meth:`RuleSet.decide`: the address space is
  cut at every boundary of every CIDR (and of the private ranges for ``GEOIP,PRIVATE``), each
  piece is decided by the rule set, and neighbouring pieces with the same action are merged;
* :func:`dns_action`: what the resolver does with a query's name (domain rules only, as in
  the proxy modes: a name no rule sends direct or blocks is resolved through the tunnel);
* :class:`DirectHosts`: the addresses that DIRECT names resolved to, each kept (route and
  kill-switch entry) for its answer's TTL within bounds, a bounded count of them.

* :class:`PortBlock`: BLOCK rules that test only ports and/or the network (``QUIC,BLOCK``,
  ``DST-PORT,...,BLOCK``, ``NETWORK,UDP,BLOCK``, a sing-box ``{"network": "udp", "port":
  443}`` in a BLOCK rule set), which the kill switch rejects (veil.client.tun) whatever the
  destination and whichever way it leaves (tunnel or direct). They are taken only where no
  rule before them could let such traffic through: every rule before them must itself be a
  BLOCK rule. Then "reject it before routing" is exactly first match wins: traffic they
  match is blocked in the proxy modes too, and traffic they do not match is decided by the
  remaining rules (:func:`split_port_blocks`), as routes and the resolver do.

Rules that a route cannot express are refused with a ConfigError naming the line: other
port and network tests (DIRECT or TUNNEL by port, a port test joined to an address test, a
port BLOCK after a rule that does not block), ``MATCH`` with an action other than TUNNEL
(everything direct is not a tunnel), and GEOIP countries other than PRIVATE (whose networks
could not be listed here).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from veil.client.rules import NETWORKS, PRIVATE_COUNTRY, Action, Condition, Rule, RuleSet
from veil.errors import ConfigError
from veil.protocol.address import Address

__all__ = [
    "DIRECT_HOLD_MAX_S",
    "DIRECT_HOLD_MIN_S",
    "MAX_DIRECT_HOSTS",
    "RESOLVER_HOST",
    "DirectHosts",
    "PortBlock",
    "TunRoutePlan",
    "dns_action",
    "plan_routes",
    "split_port_blocks",
]

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_NETWORK = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Where TUN mode's own resolver listens (veil.client.tun_dns): a loopback address of its own
#: (all of 127/8 is local on Linux), so that a resolver the machine already runs on
#: 127.0.0.1:53 or 127.0.0.53:53 is left be; the kill switch lets loopback through.
RESOLVER_HOST = "127.0.77.53"
#: Addresses answered for DIRECT names that keep a host route and a kill-switch entry at once.
#: Each is a kernel route and a set element; a browsing day touches a few hundred domestic
#: hosts, and a program resolving random names must not grow the routing table without bound:
#: past it the entry that expires first is dropped (its connections then go into the
#: tunnel's route and fail: the server refuses a source address that is not the tunnel's).
MAX_DIRECT_HOSTS = 4096
#: The shortest time a DIRECT name's address keeps its route, whatever the TTL: many
#: answers carry TTLs of seconds to a minute, while a connection opened to the address lives
#: on (a download, a video); removing the route under it would break it.
DIRECT_HOLD_MIN_S = 30 * 60
#: The longest: an address a domestic site stopped using must not stay direct for days.
DIRECT_HOLD_MAX_S = 24 * 3600

#: Never routed via the original gateway even when a DIRECT rule covers them: the kernel
#: keeps these local or on the link (loopback, link-local, multicast, "this network").
_NOT_ROUTED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32",
    "::/127", "fe80::/10", "ff00::/8"))


def _private_boundaries() -> list[_NETWORK]:
    """The ranges ``GEOIP,PRIVATE`` tests (rules._is_private: Python's is_private, loopback,
    link-local, multicast): their edges are where a PRIVATE rule's answer can change."""
    nets: list[_NETWORK] = []
    for constants in ("_IPv4Constants", "_IPv6Constants"):
        holder = getattr(ipaddress, constants, None)
        nets += list(getattr(holder, "_private_networks", ()))
    nets += [ipaddress.ip_network(n) for n in (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")]
    nets += list(_NOT_ROUTED)
    return nets


@dataclass(frozen=True, slots=True)
class PortBlock:
    """Traffic the kill switch rejects before any routing: new connections and datagrams of
    ``networks`` (``tcp``/``udp``) to a destination port in ``ports`` (inclusive, disjoint,
    ascending ranges; empty: any port)."""

    networks: tuple[str, ...]
    ports: tuple[tuple[int, int], ...]
    #: The rule, ``file:line TEXT`` (logged at start: these hits are not counted).
    origin: str = ""


@dataclass(frozen=True, slots=True)
class TunRoutePlan:
    """What the rules make of addresses in TUN mode; each list holds disjoint networks."""

    direct: tuple[_NETWORK, ...] = ()
    block: tuple[_NETWORK, ...] = ()
    port_blocks: tuple[PortBlock, ...] = ()

    def family(self, version: int) -> tuple[list[_NETWORK], list[_NETWORK]]:
        return ([n for n in self.direct if n.version == version],
                [n for n in self.block if n.version == version])


def _tests_port(condition: Condition) -> bool:
    return bool(condition.ports or condition.port_ranges or condition.networks)


def check_tun_rules(rules: RuleSet) -> None:
    """ConfigError for the first rule that routes and the kill switch cannot apply."""
    not_blocking = ""  # the first rule that does not block, once seen
    for rule in rules.rules:
        where = f"{rule.origin} {rule.text}".strip()
        for condition in rule.conditions:
            if _tests_port(condition):
                if condition.has_address or rule.action is not Action.BLOCK:
                    raise ConfigError(
                        f"{where}: --tun routes by address and name only; a port or network "
                        "(tcp/udp) test cannot be applied to packets by routes: only BLOCK "
                        "rules testing nothing but ports and the network (QUIC,BLOCK; "
                        "DST-PORT,...,BLOCK; NETWORK,UDP,BLOCK) are applied, by the kill "
                        "switch (use this rule with --socks/--http, or drop it for --tun)")
                if not_blocking:
                    raise ConfigError(
                        f"{where}: with --tun a port or network BLOCK rule is applied by the "
                        "kill switch to all traffic, before routing, so it must come before "
                        f"every rule that does not block, and {not_blocking} comes first: "
                        "move this rule above it (e.g. --rules quic.txt --rules cn)")
                continue
            if not condition.has_address and rule.action is not Action.TUNNEL:
                raise ConfigError(f"{where}: with --tun only MATCH,TUNNEL can be the catch-all "
                                  "(everything direct or blocked is no tunnel)")
            countries = [c for c in condition.countries if c != PRIVATE_COUNTRY]
            if countries:
                raise ConfigError(f"{where}: --tun cannot route GEOIP {countries[0]} (its "
                                  "networks are not listed); use IP-CIDR rules or --rules cn")
        if rule.action is not Action.BLOCK and not not_blocking:
            not_blocking = where


def _port_block(condition: Condition, origin: str) -> PortBlock:
    spans = sorted([(port, port) for port in condition.ports] + list(condition.port_ranges))
    merged: list[tuple[int, int]] = []
    for low, high in spans:
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    networks = tuple(n for n in NETWORKS if not condition.networks or n in condition.networks)
    return PortBlock(networks, tuple(merged), origin)


def split_port_blocks(rules: RuleSet) -> tuple[RuleSet, tuple[PortBlock, ...]]:
    """The rules without their port/network BLOCK conditions, and those as :class:`PortBlock`.

    Raises ConfigError as :func:`check_tun_rules`. What is left decides the traffic the
    kill switch did not reject, by address (the route plan) and by name (the resolver): the
    port blocks come before every rule that does not block, so for that traffic the first
    rule that matches is among those left. ``rules`` itself comes back when it has no port
    blocks (a rule set is rebuilt only when there is something to take out)."""
    check_tun_rules(rules)
    blocks: list[PortBlock] = []
    kept: list[Rule] = []
    for rule in rules.rules:
        conditions = [c for c in rule.conditions if not _tests_port(c)]
        for condition in rule.conditions:
            if _tests_port(condition):
                origin = condition.origin if condition.origin != rule.origin else ""
                text = f"{rule.origin} {rule.text}".strip()
                blocks.append(_port_block(condition, f"{text} ({origin})" if origin else text))
        if len(conditions) == len(rule.conditions):
            kept.append(rule)
        elif conditions:
            kept.append(Rule(rule.action, tuple(conditions), rule.origin, rule.text))
    if not blocks:
        return rules, ()
    # No country data: check_tun_rules refused every GEOIP test but PRIVATE's.
    return RuleSet(kept), tuple(blocks)


def plan_routes(rules: RuleSet) -> TunRoutePlan:
    """The direct and blocked address ranges, first match wins (see the module docstring),
    and the port blocks. Raises ConfigError for rules TUN mode cannot apply
    (:func:`check_tun_rules`)."""
    rules, port_blocks = split_port_blocks(rules)
    spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    private = False
    for rule in rules.rules:
        for condition in rule.conditions:
            for net in condition.networks_ip:
                spans[net.version].append(_span(net))
            private = private or PRIVATE_COUNTRY in condition.countries
    if private:
        for net in _private_boundaries():
            spans[net.version].append(_span(net))
    if not spans[4] and not spans[6]:
        # no address rule: the routes stay as without --rules
        return TunRoutePlan(port_blocks=port_blocks)
    for net in _NOT_ROUTED:
        spans[net.version].append(_span(net))
    not_routed = {version: [_span(n) for n in _NOT_ROUTED if n.version == version]
                  for version in (4, 6)}
    direct: list[_NETWORK] = []
    block: list[_NETWORK] = []
    for version, items in spans.items():
        runs: list[tuple[int, int, Action]] = []
        for start, end in _pieces(items):
            action = rules.decide(Address(str(_address(version, start)), 0), count=False).action
            if action is Action.DIRECT and any(low <= start and end <= high
                                               for low, high in not_routed[version]):
                continue
            if action is Action.TUNNEL:
                continue
            if runs and runs[-1][2] is action and runs[-1][1] + 1 == start:
                runs[-1] = (runs[-1][0], end, action)
            else:
                runs.append((start, end, action))
        for start, end, action in runs:
            nets = ipaddress.summarize_address_range(_address(version, start),
                                                     _address(version, end))
            (direct if action is Action.DIRECT else block).extend(nets)
    return TunRoutePlan(tuple(direct), tuple(block), port_blocks)


def _span(net: _NETWORK) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def _address(version: int, value: int) -> _IP:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _pieces(spans: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The elementary pieces (inclusive) that ``spans`` cut the covered numbers into: inside a
    piece every address is in the same spans, so one decision holds for all of it."""
    points = sorted({start for start, _ in spans} | {end + 1 for _, end in spans})
    depth: dict[int, int] = {}
    for start, end in spans:
        depth[start] = depth.get(start, 0) + 1
        depth[end + 1] = depth.get(end + 1, 0) - 1
    running = 0
    for index in range(len(points) - 1):
        running += depth.get(points[index], 0)
        if running > 0:
            yield points[index], points[index + 1] - 1


#: A query name as text whose labels hold only what host names hold (letters, digits, hyphens;
#: and underscores, which service names use: ``_sip._tcp``, ``_dmarc``). dnspython writes any
#: other byte of a label escaped (``\.`` for a dot inside a label, ``\032`` for a space),
#: so a backslash never matches here.
_HOST_NAME_TEXT = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


def dns_action(rules: RuleSet, name: str) -> Action:
    """What TUN mode's resolver does with a query for ``name``: DIRECT = ask the original
    (domestic) resolver outside the tunnel, BLOCK = answer NXDOMAIN, TUNNEL = ask the
    server's resolver through the tunnel. Counts the hit, as a proxy-mode stream does.

    A name that is no host name (:data:`_HOST_NAME_TEXT`) is TUNNEL without asking the rules:
    matched as text, ``a\\.example.cn`` (labels ``a.example`` and ``cn``) would pass for a
    name under ``example.cn`` and be sent to the domestic resolver."""
    if not name or name == "." or _HOST_NAME_TEXT.fullmatch(name) is None:
        return Action.TUNNEL
    return rules.decide(Address(name.rstrip(".") or ".", 0)).action


@dataclass(slots=True)
class DirectHosts:
    """Addresses of DIRECT names that have a route outside the tunnel, until when.

    Sans-IO: :meth:`add` and :meth:`expire` take ``now`` and say which addresses to route and
    which to unroute; the caller changes the kernel. At most ``limit`` at once; a new one past
    it pushes out the entry that would expire first.
    """

    limit: int = MAX_DIRECT_HOSTS
    hold_min: float = DIRECT_HOLD_MIN_S
    hold_max: float = DIRECT_HOLD_MAX_S
    until: dict[_IP, float] = field(default_factory=dict)

    def hold(self, ttl: int) -> float:
        return min(max(float(ttl), self.hold_min), self.hold_max)

    def add(self, ips: Iterable[tuple[_IP, int]], now: float) -> tuple[list[_IP], list[_IP]]:
        """Record answered (address, TTL) pairs: (new addresses to route, addresses evicted
        to make room, to unroute). A known address only has its time extended."""
        new: list[_IP] = []
        evicted: list[_IP] = []
        for ip, ttl in ips:
            deadline = now + self.hold(ttl)
            if ip in self.until:
                self.until[ip] = max(self.until[ip], deadline)
                continue
            if len(self.until) >= self.limit:
                oldest = min(self.until, key=self.until.__getitem__)
                del self.until[oldest]
                if oldest in new:
                    new.remove(oldest)
                else:
                    evicted.append(oldest)
            self.until[ip] = deadline
            new.append(ip)
        return new, evicted

    def expire(self, now: float) -> list[_IP]:
        """Addresses whose time is up (removed here; the caller unroutes them)."""
        gone = [ip for ip, deadline in self.until.items() if deadline <= now]
        for ip in gone:
            del self.until[ip]
        return gone

    def next_deadline(self) -> float | None:
        return min(self.until.values()) if self.until else None
