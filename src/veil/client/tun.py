"""Full-device tunnel on the client (``veil connect KEY --tun``), Linux.

What it changes on the machine (in its network namespace), in this order, each step written
to a state file first so that a crash is undone by the next start (or ``--tun-cleanup``):

0. every way in of the key (its HOST:PORT, each ``tls://`` way, each CDN way's host) is
   resolved once, before anything below (afterwards the LAN's resolver is out of reach, or
   the tunnel's is the only one); the tunnel dials those addresses and no others, whatever
   DNS says later (ClientTunnel's ``pinned``; a CDN way keeps its name in SNI and Host), so
   failover between the ways works here as in the proxy modes. A way whose name does not
   resolve is left out with a warning; none resolving is an error;
1. a host route to each way's address via the gateway it is reached by now, and a route for
   each ``--exclude`` range via its current gateway (so they stay outside the tunnel);
2. the kill switch: nftables table ``veil-killswitch`` whose output chain lets packets leave
   only through the TUN device, to each way's ip:port, on loopback, to excluded ranges and
   for DHCP / IPv6 neighbour discovery; everything else is rejected locally, before it
   reaches a wire. It stays while the client reconnects, so nothing leaks around a dropped
   tunnel. Its forward chain does the same for what the machine forwards (containers, VMs,
   a hotspot's clients, IPv6 included): out through the TUN device or to excluded ranges,
   nothing else; and it clamps TCP MSS to the TUN's MTU;
3. the TUN device ``veil0`` (offloads on), once the server has said which addresses it has:
   addresses, MTU, and routes 0.0.0.0/1 + 128.0.0.0/1 (::/1 + 8000::/1 with IPv6) through
   it. Without an IPv6 address from the server, IPv6 is not routed into the tunnel and the
   kill switch rejects it: blocked, never leaked;
4. /etc/resolv.conf, rewritten in place (its previous content is in the state file) to name
   the resolvers the server announced, which are reached through the tunnel.

With ``--rules`` (split routing, docs/routing.md "TUN mode"; the plan is
veil.client.tun_rules, sans-IO):

1'. the rules' DIRECT ranges (first match wins, private ranges of ``GEOIP,PRIVATE`` and the
   ``cn`` preset's networks included) get routes via the original default gateway, all in
   one ``ip -batch`` and all with protocol ROUTE_PROTO, so one flush removes them (on exit
   and after a crash: the state file says ``proto_routes``); the original resolver (the
   first non-loopback nameserver of resolv.conf) gets a host route the same way;
2'. the kill switch holds the DIRECT ranges and BLOCK ranges as nftables interval sets
   (thousands of elements, one lookup): blocked ranges are rejected, direct ones let out, the
   original resolver is reachable on port 53; the ``dns_direct`` sets hold the addresses of
   DIRECT names (below), let out before blocked ranges are refused (the name decided);
4'. resolv.conf names veil's own resolver (veil.client.tun_dns, on 127.0.77.53, UDP and
   TCP; dnspython is imported only then): a name a
   DIRECT rule matches is resolved by the original resolver outside the tunnel, and each
   address of its answer gets a host route via the original gateway and a ``dns_direct`` set
   entry before the answer is handed back (held for its TTL within 30 min .. 24 h, at most
   4,096 at once: tun_rules.DirectHosts); a BLOCK name gets NXDOMAIN; every other name is
   asked of the server's resolvers, whose addresses get host routes into the TUN device so no
   direct range can take a query around the tunnel.

2''. port/network BLOCK rules (QUIC,BLOCK; DST-PORT/NETWORK with BLOCK) before any rule
   that does not block are the kill switch's chain ``port_blocks``: TCP reset, ICMP
   port-unreachable, for new flows leaving through the TUN device or direct, after veil's
   own flows (ways in, marked resolver queries), DHCP and ``--exclude`` are let out.

Rules a route cannot apply (other port or network tests, MATCH other than TUNNEL, GEOIP
other than PRIVATE) are refused before anything changes.

A clean exit (SIGINT, SIGTERM) undoes all of it in reverse order; closing the device removes
its addresses and routes with it.

The IP stream lives as long as the tunnel, on one session: when the way in use changes (a
better way works again), it moves to a session on the new way once that one is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.client.rules import RuleSet
from veil.client.tun_rules import (
    RESOLVER_HOST,
    DirectHosts,
    PortBlock,
    TunRoutePlan,
    plan_routes,
    split_port_blocks,
)
from veil.errors import ConfigError, LocalProtocolError, VeilError
from veil.net.client_session import ClientTunnel, usable_way
from veil.net.driver import SessionDriver
from veil.net.tun_linux import (
    PacketPump,
    TunDevice,
    TunError,
    add_route,
    configure_link,
    delete_route,
    flush_addresses,
    netns_id,
    nft,
    nft_delete_table,
    read_sysctl,
    route_get,
    write_sysctl,
)
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address, NeedMoreData
from veil.protocol.frames import ResetCode, StreamKind
from veil.protocol.ip import MAX_CONFIG_SIZE, IpConfig
from veil.protocol.session import SessionConfig

if TYPE_CHECKING:
    from veil.client.tun_dns import SplitResolver

log = logging.getLogger("veil.client")

DEVICE_NAME = "veil0"
KILLSWITCH_TABLE = "veil-killswitch"
#: A site gateway's kill switch (``--tun --site``): the other sites' subnets leave through
#: the TUN device or not at all. Its sets are filled from the server's config.
SITE_TABLE = "veil-site"
SITE_SETS = {4: "sites4", 6: "sites6"}
STATE_DIR = Path("/run/veil")
RESOLV_CONF = Path("/etc/resolv.conf")
# Routes that together cover everything yet are more specific than any default route, so the
# original default route stays as it was (and comes back into use the moment ours go).
SPLIT_V4 = ("0.0.0.0/1", "128.0.0.0/1")
SPLIT_V6 = ("::/1", "8000::/1")
# How long to wait for the server's IP config after opening the IP stream; past it the
# session is treated as broken and the tunnel reconnects.
CONFIG_TIMEOUT_S = 10.0
# How often to look for a new session while reconnecting.
SESSION_POLL_S = 0.1
# After the server refused or ended an IP stream on a live session, ask again this much later.
LINK_RETRY_S = 5.0
# A session's TLS write buffer may hold this much before the device stops being read.
SESSION_WRITE_HIGH_WATER = 4 * 1024 * 1024
ANY = Address("0.0.0.0", 0)
#: The routing protocol number veil's split-routing routes carry (``ip route ... proto 118``):
#: all of them, thousands with ``--rules cn``, are removed by one flush of this number, also
#: after a crash; a route someone else made never has it. Not in iproute2's rt_protos list.
ROUTE_PROTO = 118
#: Where a lookup of the original route per family starts, when no way in is of that family:
#: any public address does; no packet is sent.
ROUTE_PROBES = {4: "1.0.0.1", 6: "2400::1"}
#: SO_MARK of the split-routing resolver's queries to the domestic resolver: the kill switch
#: lets port 53 out to it with this mark only (any value; "veil" in ASCII, unlikely to clash).
DIRECT_RESOLVER_MARK = 0x7665696C
#: Kill-switch sets of the rules' direct and blocked ranges, and of DIRECT names' addresses.
DIRECT_SETS = {4: "direct4", 6: "direct6"}
BLOCK_SETS = {4: "block4", 6: "block6"}
DNS_DIRECT_SETS = {4: "dns_direct4", 6: "dns_direct6"}
# How often the addresses of DIRECT names are looked at for expiry (their hold is >= 30 min).
DIRECT_SWEEP_S = 60.0
COMMAND_TIMEOUT_S = 30.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TunClientOptions:
    exclude: tuple[IPNetwork, ...] = ()
    device: str = DEVICE_NAME
    state_dir: Path = STATE_DIR
    resolv_conf: Path = RESOLV_CONF
    #: ``--rules``: split routing (veil.client.tun_rules); None sends everything in. Without
    #: its port/network BLOCK rules (the kill switch applies those: ``plan.port_blocks``), so
    #: that the resolver decides a name as the traffic that is left (a query has no port).
    rules: RuleSet | None = None
    #: What ``rules`` make of addresses (computed by :meth:`parse`).
    plan: TunRoutePlan = field(default_factory=TunRoutePlan)
    #: ``--site``: an office's gateway (see :class:`TunClient`'s site mode).
    site: bool = False

    @classmethod
    def parse(cls, exclude: Iterable[str], rules: RuleSet | None = None, *,
              site: bool = False) -> TunClientOptions:
        nets: list[IPNetwork] = []
        for text in exclude:
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise ConfigError(f"--exclude takes a CIDR: {exc}") from exc
        plan = TunRoutePlan()
        if rules is not None:
            rules, port_blocks = split_port_blocks(rules)
            plan = plan_routes(rules)
            plan = TunRoutePlan(plan.direct, plan.block, port_blocks)
        return cls(tuple(nets), rules=rules, plan=plan, site=site)


# ---------------------------------------------------------------- the state file
@dataclass(slots=True)
class TunState:
    """What this client changed on the machine; enough to undo it after a crash."""

    path: Path
    pid: int = field(default_factory=os.getpid)
    routes: list[dict[str, Any]] = field(default_factory=list)
    nft_tables: list[str] = field(default_factory=list)
    resolv_conf: str | None = None  # path of the file we rewrote
    resolv_backup: str | None = None  # its content before
    #: Routes with protocol ROUTE_PROTO may exist (split routing): flushed on restore.
    proto_routes: bool = False
    #: Sysctls changed (a site gateway's forwarding): name -> the value before.
    sysctls: dict[str, str] = field(default_factory=dict)
    #: A site gateway's last announced subnets: the next start blocks them at once, before
    #: the server is reached again (after a crash the LAN's packets for them would otherwise
    #: take the default route until then).
    site_routes: list[str] = field(default_factory=list)

    def save(self) -> None:
        data = {"pid": self.pid, "routes": self.routes, "nft_tables": self.nft_tables,
                "resolv_conf": self.resolv_conf, "resolv_backup": self.resolv_backup,
                "proto_routes": self.proto_routes, "sysctls": self.sysctls,
                "site_routes": self.site_routes}
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            raise TunError(f"cannot write {self.path}: {exc.strerror} (--tun needs root)") from exc

    @classmethod
    def load(cls, path: Path) -> TunState | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise VeilError(f"unreadable TUN state file {path}: {exc}") from exc
        return cls(path, int(data.get("pid", 0)), list(data.get("routes", [])),
                   list(data.get("nft_tables", [])), data.get("resolv_conf"),
                   data.get("resolv_backup"), bool(data.get("proto_routes", False)),
                   {str(k): str(v) for k, v in dict(data.get("sysctls", {})).items()},
                   [str(net) for net in data.get("site_routes", [])])


def state_path(options: TunClientOptions) -> Path:
    # One file per network namespace: what is changed is per namespace, and two namespaces
    # (containers, tests) may each run a client.
    return options.state_dir / f"tun-{netns_id()}.json"


def restore(state: TunState) -> None:
    """Undo what ``state`` records, in reverse order of doing; safe to run twice."""
    if state.resolv_conf is not None and state.resolv_backup is not None:
        try:
            _write_in_place(Path(state.resolv_conf), state.resolv_backup)
        except OSError as exc:
            log.error("cannot restore %s: %s", state.resolv_conf, exc)
        else:
            state.resolv_conf = state.resolv_backup = None
    for table in reversed(state.nft_tables):
        nft_delete_table("inet", table)
    state.nft_tables.clear()
    if state.proto_routes:
        flush_proto_routes()
        state.proto_routes = False
    for route in reversed(state.routes):
        delete_route(route["dst"], oif=route.get("oif"), gateway=route.get("gateway"))
    state.routes.clear()
    for key, value in state.sysctls.items():
        try:
            write_sysctl(key, value)
        except TunError as exc:
            log.error("%s", exc)
    state.sysctls.clear()
    with contextlib.suppress(FileNotFoundError):
        state.path.unlink()


def cleanup(options: TunClientOptions) -> bool:
    """Restore what a client that did not exit cleanly left; False when there was nothing."""
    path = state_path(options)
    state = TunState.load(path)
    if state is None:
        return False
    if state.pid != os.getpid() and _alive(state.pid):
        raise VeilError(f"another veil --tun (pid {state.pid}) runs in this network namespace")
    log.warning("restoring routes, firewall and DNS left by a veil that did not exit cleanly")
    restore(state)
    return True


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"veil" in cmdline


def _write_in_place(path: Path, text: str) -> None:
    # In place (no rename): /etc/resolv.conf may be a bind mount (ip netns exec, containers),
    # which a rename cannot replace.
    with open(path, "r+" if path.exists() else "w") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


# ---------------------------------------------------------------- split routing's routes
def _ip_command() -> str:
    program = shutil.which("ip") or "/usr/sbin/ip"
    if not Path(program).exists():
        raise TunError("--tun --rules needs iproute2's ip")
    return program


def ip_batch(lines: Sequence[str]) -> list[str]:
    """Run ``ip`` commands in one process (``ip -force -batch -``: thousands of routes in a
    fraction of a second, where one netlink round trip each takes seconds); the error lines of
    those that failed (a route already there is left as it is)."""
    if not lines:
        return []
    proc = subprocess.run([_ip_command(), "-force", "-batch", "-"], input="".join(
        line + "\n" for line in lines), capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_S, check=False)
    return [line for line in proc.stderr.splitlines() if line.strip()]


def flush_proto_routes() -> None:
    """Remove every route of split routing (protocol ROUTE_PROTO), both families."""
    for family in ("-4", "-6"):  # ip -batch takes no family option per line
        subprocess.run([_ip_command(), family, "route", "flush", "proto", str(ROUTE_PROTO)],
                       capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)


def original_route(destination: str) -> tuple[str | None, str] | None:
    """(gateway or None when on-link, device name) the kernel uses for ``destination`` now,
    None when there is no route."""
    proc = subprocess.run([_ip_command(), "-j", "route", "get", destination],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                          check=False)
    try:
        found = json.loads(proc.stdout)[0] if proc.returncode == 0 else None
    except (ValueError, IndexError):
        found = None
    if not found or "dev" not in found:
        return None
    return found.get("gateway"), str(found["dev"])


def route_lines(verb: str, networks: Iterable[IPNetwork | str],
                via: tuple[str | None, str]) -> list[str]:
    """``ip -batch`` lines that add (or delete) ``networks`` via ``via`` with veil's
    protocol number."""
    gateway, dev = via
    hop = f"via {gateway} dev {dev}" if gateway else f"dev {dev}"
    return [f"route {verb} {net} {hop} proto {ROUTE_PROTO}" for net in networks]


def direct_elements_batch(ips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address], *,
                          remove: bool) -> str:
    """One nftables batch (atomic: all or nothing) that adds ``ips`` to, or removes them
    from, the kill switch's sets of DIRECT names' addresses. A removal adds each element
    first: ``delete`` fails on an element that is not there, and one failing line would undo
    the whole batch (nft 1.0.6, Debian 12's, has no ``destroy``)."""
    lines: list[str] = []
    for ip in ips:
        element = f"inet {KILLSWITCH_TABLE} {DNS_DIRECT_SETS[ip.version]} {{ {ip} }}"
        lines.append(f"add element {element}")
        if remove:
            lines.append(f"delete element {element}")
    return "".join(line + "\n" for line in lines)


def _set_block(name: str, version: int, elements: Sequence[IPNetwork], *,
               interval: bool) -> list[str]:
    kind = "ipv4_addr" if version == 4 else "ipv6_addr"
    flags = "flags interval; " if interval else ""
    body = f"  set {name} {{ type {kind}; {flags}"
    if elements:
        body += "elements = { " + ", ".join(map(str, elements)) + " }; "
    return [body + "}"]


# ---------------------------------------------------------------- the kill switch
def port_block_rules(blocks: Sequence[PortBlock]) -> list[str]:
    """The rules of the ``port_blocks`` chain: each block's TCP refused with a reset, its UDP
    with ICMP port-unreachable, so that the application learns at once (a browser's QUIC
    attempt falls back to TCP without waiting for its timeout). Only new flows (a reply of a
    server on this machine is no connection the rules decide), and never veil's own
    resolver's queries (marked), which go through the tunnel to the server's resolvers."""
    rules = [f"meta mark {DIRECT_RESOLVER_MARK:#x} return"]
    for block in blocks:
        ports = ""
        if block.ports:
            listed = ", ".join(str(low) if low == high else f"{low}-{high}"
                               for low, high in block.ports)
            ports = f" th dport {{ {listed} }}"
        for network in block.networks:
            how = "tcp reset" if network == "tcp" else "icmpx type port-unreachable"
            rules.append(f"meta l4proto {network}{ports} ct state new reject with {how}")
    return rules


def killswitch_ruleset(device: str, servers: Iterable[Address], exclude: Iterable[IPNetwork],
                       mtu_clamp: bool = True, *, plan: TunRoutePlan | None = None,
                       direct_resolvers: Sequence[str] = ()) -> str:
    """The kill switch's table; ``servers``: the ip:port of each way in (the server's own
    ports, a CDN's), the only connections allowed around the tunnel. With ``plan`` (split
    routing): its direct ranges and the addresses of DIRECT names (the dns_direct sets,
    filled at run time) are let out, its blocked ranges rejected, its port blocks rejected
    whichever way they would leave (chain ``port_blocks``), and ``direct_resolvers`` (the
    original resolvers) are reachable on port 53.

    Order of the output chain: loopback, then veil's own flows (its marked queries to the
    original resolver, its connections to the ways in), DHCP and neighbour discovery, the
    ``--exclude`` ranges; then what the rules refuse or let out; then the TUN device; then
    nothing. So no rule can block the client's own traffic, and ``--exclude`` takes
    precedence over the rules."""
    rules = ['oifname "lo" accept']
    sets: list[str] = []
    split: list[str] = []
    forward_split: list[str] = []
    port_blocks = plan.port_blocks if plan is not None else ()
    check_ports = ["jump port_blocks"] if port_blocks else []
    if plan is not None:
        for resolver in dict.fromkeys(direct_resolvers):
            family = "ip" if ipaddress.ip_address(resolver).version == 4 else "ip6"
            # Only veil's own resolver's queries (marked): any other process asking the
            # domestic resolver directly would leak the names it asks about.
            rules.append(f"meta mark {DIRECT_RESOLVER_MARK:#x} {family} daddr {resolver} "
                         "meta l4proto { tcp, udp } th dport 53 accept")
        split += check_ports
        if port_blocks:
            forward_split.append(f'oifname "{device}" jump port_blocks')
        for version, family in ((4, "ip"), (6, "ip6")):
            direct, block = plan.family(version)
            sets += _set_block(DIRECT_SETS[version], version, direct, interval=True)
            sets += _set_block(BLOCK_SETS[version], version, block, interval=True)
            sets += _set_block(DNS_DIRECT_SETS[version], version, (), interval=False)
            # A DIRECT name's addresses go out first (the name decided, as in the proxy
            # modes), then blocked ranges are refused, then direct ranges leave.
            split.append(f"{family} daddr @{DNS_DIRECT_SETS[version]} accept")
            split.append(f"{family} daddr @{BLOCK_SETS[version]} reject with icmpx type "
                         "admin-prohibited")
            split.append(f"{family} daddr @{DIRECT_SETS[version]} accept")
            forward_split.append(f"{family} daddr @{BLOCK_SETS[version]} reject with icmpx "
                                 "type admin-prohibited")
            if port_blocks:
                forward_split += [f"{family} daddr @{DIRECT_SETS[version]} jump port_blocks",
                                  f"{family} daddr @{DNS_DIRECT_SETS[version]} jump "
                                  "port_blocks"]
            forward_split += [
                f"{family} daddr @{DIRECT_SETS[version]} accept",
                f"{family} saddr @{DIRECT_SETS[version]} accept",
                f"{family} daddr @{DNS_DIRECT_SETS[version]} accept",
                f"{family} saddr @{DNS_DIRECT_SETS[version]} accept"]
    for server in dict.fromkeys(servers):  # each pair once, in order
        server_ip = ipaddress.ip_address(server.host)
        family = "ip" if server_ip.version == 4 else "ip6"
        rules.append(f"{family} daddr {server_ip} tcp dport {server.port} accept")
    rules += [
        # The LAN lease must survive an hour-long tunnel; DHCP carries no user data.
        "udp sport 68 udp dport 67 accept",
        "udp sport 546 udp dport 547 accept",
        # Without neighbour discovery an IPv6 server (or gateway) is unreachable.
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept",
    ]
    for net in exclude:
        rules.append(f"{'ip' if net.version == 4 else 'ip6'} daddr {net} accept")
    rules += split
    rules += [
        f'oifname "{device}" accept',
        # Rejected locally: applications fail at once instead of timing out, and nothing
        # is sent.
        "reject with icmpx type admin-prohibited",
    ]
    forward = [f'oifname "{device}" tcp flags syn tcp option maxseg size set rt mtu'] if (
        mtu_clamp) else []
    # What this machine forwards for others (containers, VMs, a hotspot) leaves the same ways
    # as its own traffic, never around the tunnel: also before the TUN device is up, while
    # the client reconnects, and for IPv6 when the server gives none.
    forward += forward_split
    forward += [f'oifname "{device}" accept', f'iifname "{device}" accept']
    for net in exclude:
        family_ = "ip" if net.version == 4 else "ip6"
        forward += [f"{family_} daddr {net} accept", f"{family_} saddr {net} accept"]
    forward.append("reject with icmpx type admin-prohibited")
    lines = [f"table inet {KILLSWITCH_TABLE} {{",
             *sets]
    if port_blocks:
        lines += ["  chain port_blocks {",
                  *(f"    {r}" for r in port_block_rules(port_blocks)),
                  "  }"]
    lines += ["  chain output {",
              "    type filter hook output priority filter; policy accept;",
              *(f"    {r}" for r in rules),
              "  }",
              "  chain forward {",
              "    type filter hook forward priority filter; policy accept;",
              *(f"    {r}" for r in forward),
              "  }",
              "}", ""]
    return "\n".join(lines)


def site_ruleset(device: str) -> str:
    """A site gateway's table: what is for another site leaves through the TUN device, or is
    rejected (also while the tunnel is down, and after a crash, when the device and its
    routes are gone but this table is not: then the default route would carry the LAN's
    packets for the other offices to the Internet). The sets are filled at run time with
    the subnets the server announces. MSS is clamped on the device as in the full tunnel."""
    refuse = []
    for version, family in ((4, "ip"), (6, "ip6")):
        refuse.append(f'oifname != "{device}" {family} daddr @{SITE_SETS[version]} reject '
                      "with icmpx type admin-prohibited")
    return "\n".join([
        f"table inet {SITE_TABLE} {{",
        *_set_block(SITE_SETS[4], 4, (), interval=True),
        *_set_block(SITE_SETS[6], 6, (), interval=True),
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        *(f"    {r}" for r in refuse),
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f'    oifname "{device}" tcp flags syn tcp option maxseg size set rt mtu',
        *(f"    {r}" for r in refuse),
        "  }",
        "}", ""])


def site_elements_batch(networks: Iterable[IPNetwork]) -> str:
    """One nftables batch (atomic) that makes the site sets hold exactly ``networks``."""
    lines = [f"flush set inet {SITE_TABLE} {name}" for name in SITE_SETS.values()]
    for version in (4, 6):
        these = [str(net) for net in networks if net.version == version]
        if these:
            lines.append(f"add element inet {SITE_TABLE} {SITE_SETS[version]} "
                         f"{{ {', '.join(these)} }}")
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------- the client
class TunClient:
    """Runs the full-device tunnel over a :class:`ClientTunnel` until stopped."""

    def __init__(self, key: AccessKey, options: TunClientOptions, *, tls_stack: str = "browser",
                 session_config: SessionConfig | None = None) -> None:
        self.key = key
        self.options = options
        self.tls_stack = tls_stack
        self.session_config = session_config
        self.state = TunState(state_path(options))
        self.device: TunDevice | None = None
        self.config: IpConfig | None = None
        self._pump: PacketPump | None = None
        self._link: _IpLink | None = None
        # Split routing (--rules): the original route per family, the original resolver,
        # the resolver of ours that resolv.conf names, and the addresses of DIRECT names.
        self._original: dict[int, tuple[str | None, str]] = {}
        self._direct_resolver: str | None = None
        self._resolver: SplitResolver | None = None
        self.direct_hosts = DirectHosts()
        self._sweeper: asyncio.Task[None] | None = None
        # Site mode: the routes of other sites on the device, and config updates in flight.
        self._site_routes: set[IPNetwork] = set()
        self._device_index = 0
        self._applying = asyncio.Lock()
        self._updates: set[asyncio.Future[None]] = set()
        self._remembered: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        if self.options.site:
            # What a crashed run had learnt, blocked again by _prepare_site.
            previous = await asyncio.to_thread(TunState.load, self.state.path)
            self._remembered = previous.site_routes if previous is not None else []
        # Before anything of ours is in the way: a crash's kill switch would block DNS.
        await asyncio.to_thread(cleanup, self.options)
        # Every way in is resolved now, before the kill switch and resolv.conf's rewrite (then
        # the LAN's resolver is out of reach, or the tunnel's is the only one); the tunnel
        # dials these addresses, and only these, whatever DNS says later: they are what the
        # kill switch lets through.
        pinned, addresses = await resolve_ways(self.key)
        tunnel = ClientTunnel(self.key, pool_size=1, tls_stack=self.tls_stack,
                              session_config=self.session_config, pinned=pinned)
        try:
            await asyncio.to_thread(self._prepare, addresses)
            if self.options.rules is not None:
                # Imported here: only split routing needs a DNS library (dnspython).
                from veil.client.tun_dns import SplitResolver  # noqa: PLC0415

                self._resolver = SplitResolver(self.options.rules, self._direct_resolver,
                                               self._route_direct_names)
                self._resolver.direct_mark = DIRECT_RESOLVER_MARK
                # The ways in never get a direct host route from a DIRECT answer.
                self._resolver.never_direct |= {address.host for address in addresses}
                await self._resolver.start()
                self._sweeper = asyncio.ensure_future(self._sweep_direct_names())
            self.device = TunDevice(self.options.device)
            self._pump = PacketPump(self.device, self._from_device,
                                    on_batch_end=self._flush)
            tunnel.start()
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await self._serve(tunnel, stopping)
            finally:
                stopping.cancel()
        finally:
            if self._sweeper is not None:
                self._sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._sweeper
            if self._resolver is not None:
                await self._resolver.close()
                log.info("dns: %s", ", ".join(f"{what} {count}" for what, count
                                                in self._resolver.counts.items()))
            if self.options.rules is not None:
                for line in self.options.rules.counters():
                    log.info("rule %s", line)
            # A route update in flight finishes first: restore() must come after it.
            await asyncio.gather(*self._updates, return_exceptions=True)
            await tunnel.close()
            if self._pump is not None:
                self._pump.pause()
            if self.device is not None:
                self.device.close()
                self.device = None
            await asyncio.to_thread(restore, self.state)
            log.warning("TUN mode ended; routes, firewall and DNS restored")

    def _prepare(self, servers: list[Address]) -> None:
        """Host routes and the kill switch, before any packet of ours could leave."""
        self.state.save()
        if self.options.site:
            self._prepare_site()
            return
        for ip in dict.fromkeys(server.host for server in servers):
            self._route_like(f"{ip}/{32 if ':' not in ip else 128}", ip)
        for net in self.options.exclude:
            self._route_like(str(net), str(net.network_address))
        plan: TunRoutePlan | None = None
        resolvers: list[str] = []
        if self.options.rules is not None:
            plan = self.options.plan
            self._prepare_split(servers, plan)
            if self._direct_resolver is not None:
                resolvers.append(self._direct_resolver)
        self.state.nft_tables.append(KILLSWITCH_TABLE)
        self.state.save()
        nft_delete_table("inet", KILLSWITCH_TABLE)
        nft(killswitch_ruleset(self.options.device, servers, self.options.exclude,
                               plan=plan, direct_resolvers=resolvers))

    def _prepare_site(self) -> None:
        """A site gateway: its kill switch (for the other sites only: the office's own
        traffic to the Internet is not ours) and forwarding on. No host routes: the default
        route stays, and the server is reached by it as before."""
        self.state.nft_tables.append(SITE_TABLE)
        self.state.save()
        nft_delete_table("inet", SITE_TABLE)
        nft(site_ruleset(self.options.device))
        if self._remembered:
            self.state.site_routes = self._remembered
            self.state.save()
            nft(site_elements_batch(ipaddress.ip_network(net) for net in self._remembered))
            log.warning("site gateway: %s blocked until the server says what is reachable",
                        " ".join(self._remembered))
        self._forward("net.ipv4.ip_forward")

    def _forward(self, key: str) -> None:
        """Turn forwarding on (recorded first: restored on exit or by the next start)."""
        old = read_sysctl(key)
        if old != "1":
            self.state.sysctls[key] = old
            self.state.save()
            write_sysctl(key, "1")

    def _prepare_split(self, servers: list[Address], plan: TunRoutePlan) -> None:
        """The rules' direct ranges routed the way the kernel routes each family now (via
        the original default gateway; more specific routes, like the LAN's, still win),
        and the original resolver reachable outside the tunnel."""
        for version in (4, 6):
            probe = next((s.host for s in servers if ipaddress.ip_address(s.host).version
                          == version), ROUTE_PROBES[version])
            found = original_route(probe)
            if found is not None:
                self._original[version] = found
        self.state.proto_routes = True
        self.state.save()
        lines: list[str] = []
        for version in (4, 6):
            direct, _ = plan.family(version)
            if direct and version not in self._original:
                log.warning("no IPv%d route now: the rules' %d direct IPv%d ranges stay "
                            "blocked", version, len(direct), version)
            elif direct:
                lines += route_lines("add", direct, self._original[version])
        errors = ip_batch(lines)
        if errors:
            log.info("split routing: %d direct ranges already had a route (left as they "
                     "are)", len([e for e in errors if "exists" in e]))
        log.warning("split routing: %d direct and %d blocked ranges", len(plan.direct),
                    len(plan.block))
        for block in plan.port_blocks:
            log.warning("rule %s: the kill switch rejects it for all traffic, tunnelled or "
                        "direct, before any routing (its hits are not counted)", block.origin)
        self._direct_resolver = self._original_resolver()
        if self._direct_resolver is not None:
            ip = self._direct_resolver
            self._route_like(f"{ip}/{32 if ':' not in ip else 128}", ip)
        else:
            log.warning("split routing: resolv.conf names no resolver outside this machine; "
                        "names DIRECT rules match are resolved through the tunnel")

    def _original_resolver(self) -> str | None:
        """The first non-loopback nameserver of resolv.conf before veil rewrites it."""
        try:
            text = self.options.resolv_conf.read_text()
        except OSError:
            return None
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                try:
                    ip = ipaddress.ip_address(fields[1].split("%")[0])
                except ValueError:
                    continue
                if not ip.is_loopback:
                    return str(ip)
        return None

    async def _route_direct_names(self, answered: list[tuple[ipaddress.IPv4Address
                                                             | ipaddress.IPv6Address, int]]
                                  ) -> None:
        """Host routes and kill-switch entries for the addresses of a DIRECT name, before
        its answer is handed to the application."""
        usable = [(ip, ttl) for ip, ttl in answered if ip.version in self._original]
        new, evicted = self.direct_hosts.add(usable, time.monotonic())
        if new or evicted:
            await asyncio.to_thread(self._change_direct_hosts, new, evicted)

    def _change_direct_hosts(self, new: Sequence[ipaddress.IPv4Address
                                                 | ipaddress.IPv6Address],
                             gone: Sequence[ipaddress.IPv4Address
                                            | ipaddress.IPv6Address]) -> None:
        """Unroute ``gone`` (a failure is logged: they are forgotten either way), then route
        ``new``: one ``ip`` and one ``nft`` run for each, whatever their count. Raises
        TunError when the kill switch refused ``new``: then none of them is routed and
        ``direct_hosts`` forgets them, so their connections go into the tunnel (the answer
        is not direct) and a later answer tries them again."""
        if gone:
            try:
                self._unroute_direct_hosts(gone)
            except (TunError, OSError, subprocess.SubprocessError) as exc:
                log.warning("split routing: cannot unroute %d direct addresses: %s",
                            len(gone), exc)
        if new:
            try:
                nft(direct_elements_batch(new, remove=False))
            except TunError:
                for ip in new:
                    self.direct_hosts.until.pop(ip, None)
                raise
            # After the kill switch's entries: until then a new address's packets go into
            # the tunnel, never to a gateway the kill switch would refuse.
            ip_batch([line for ip in new for line in route_lines(
                "add", [f"{ip}/{32 if ip.version == 4 else 128}"], self._original[ip.version])])

    def _unroute_direct_hosts(self, gone: Sequence[ipaddress.IPv4Address
                                                   | ipaddress.IPv6Address]) -> None:
        """Routes first, then the kill switch's entries (one ``ip``, one ``nft`` run): in
        between, packets to a gone address go into the tunnel, not refused at the gateway."""
        ip_batch([line for ip in gone for line in route_lines(
            "del", [f"{ip}/{32 if ip.version == 4 else 128}"], self._original[ip.version])])
        nft(direct_elements_batch(gone, remove=True))

    async def _sweep_direct_names(self) -> None:
        """Every DIRECT_SWEEP_S, unroute the DIRECT names' addresses whose time is up, until
        cancelled. A sweep that fails does not end the sweeping (the task would die, and
        addresses would stay direct for good): its exception is logged, once for a run of
        failed sweeps (each would log the same every minute), and the next sweep goes on."""
        failing = False
        while True:
            await asyncio.sleep(DIRECT_SWEEP_S)
            try:
                gone = self.direct_hosts.expire(time.monotonic())
                if gone:
                    await asyncio.to_thread(self._unroute_direct_hosts, gone)
            except Exception:
                if not failing:
                    log.warning("split routing: a sweep of direct addresses failed; the next "
                                "ones go on (a run of failures is logged once)", exc_info=True)
                failing = True
            else:
                failing = False

    def _route_like(self, destination: str, probe: str) -> None:
        """Route ``destination`` the way the kernel routes ``probe`` now (outside the tunnel)."""
        try:
            gateway, oif = route_get(probe)
        except Exception as exc:  # pyroute2 raises NetlinkError and others
            log.warning("no route to %s now; it will not bypass the tunnel: %s", probe, exc)
            return
        # Recorded before it is made, so a crash in between still gets it undone (deleting a
        # route that is not there is fine); forgotten again if one was there already (on-link
        # ranges have their connected route): that one is not ours to delete.
        route = {"dst": destination, "gateway": gateway, "oif": oif}
        self.state.routes.append(route)
        self.state.save()
        if not add_route(destination, oif=oif, gateway=gateway):
            self.state.routes.remove(route)
            self.state.save()

    async def _serve(self, tunnel: ClientTunnel, stopping: asyncio.Future[Any]) -> None:
        announced = False
        while not stopping.done():
            driver = tunnel._pick()  # the live session, if any (the tunnel reconnects)
            if driver is None or driver.closed.done():
                if not announced and tunnel.last_error:
                    log.error("not connected: %s; still trying (traffic is blocked)",
                              tunnel.last_error)
                    announced = True
                await asyncio.wait([stopping], timeout=SESSION_POLL_S)
                continue
            try:
                link = _IpLink(self, driver)
            except LocalProtocolError:  # the session closed under us: wait for the next
                await asyncio.wait([stopping], timeout=SESSION_POLL_S)
                continue
            self._link = link
            try:
                await asyncio.wait([stopping, driver.closed, link.done, link.configured],
                                   timeout=CONFIG_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
                if stopping.done() or driver.closed.done() or link.done.done():
                    pass
                elif link.config is None:
                    log.warning("no IP config from the server; reconnecting")
                    driver.close()
                else:
                    await self._apply(link.config)
                    link.start()
                    announced = False
                    moved = asyncio.ensure_future(tunnel.moved_from(driver))
                    try:
                        await asyncio.wait([stopping, driver.closed, link.done, moved],
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        moved.cancel()
                    if moved.done() and not moved.cancelled():
                        # Another way in is in use (a better one works again) and a session
                        # on it is up: the IP stream moves there; this session, left without
                        # streams, is closed.
                        log.warning("moving the tunnel to the way in use")
                        continue
            finally:
                self._link = None
                if self._pump is not None:
                    self._pump.pause()
                link.close()
            if stopping.done():
                break
            log.warning("tunnel interrupted; traffic is blocked until it is back")
            if not driver.closed.done():
                # The server ended the IP stream but not the session (it refused the tunnel):
                # ask again later rather than in a tight loop.
                await asyncio.wait([stopping], timeout=LINK_RETRY_S)

    async def _apply(self, config: IpConfig) -> None:
        async with self._applying:
            if config == self.config:
                return  # a reconnect that got the same addresses: nothing to change
            assert self.device is not None
            if self.options.site:
                await asyncio.to_thread(self._configure_site, self.device.name, config)
                self.config = config
                log.warning("TUN %s up: %s%s, site gateway, routes %s", self.device.name,
                            config.ipv4 or "", f" {config.ipv6}" if config.ipv6 else "",
                            " ".join(map(str, config.routes)) or "none (no other site)")
                return
            if self.config is not None and dataclasses.replace(
                    config, routes=self.config.routes) == self.config:
                return  # only the sites changed: covered by the split routes already
            await asyncio.to_thread(self._configure, self.device.name, config)
            self.config = config
            log.warning("TUN %s up: %s%s, MTU %d, DNS %s", self.device.name, config.ipv4 or "",
                        f" {config.ipv6}" if config.ipv6 else " (IPv6 blocked)",
                        config.mtu, ", ".join(map(str, config.dns)) or "unchanged")

    def new_config(self, link: _IpLink, config: IpConfig) -> None:
        """The server sent the config again on a running link (the sites changed)."""
        if link is self._link and self.options.site:
            task = asyncio.ensure_future(self._apply(config))
            self._updates.add(task)
            task.add_done_callback(self._updated)

    def _updated(self, task: asyncio.Future[None]) -> None:
        self._updates.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cannot apply the server's new routes: %s", task.exception())

    def _configure_site(self, name: str, config: IpConfig) -> None:
        """Addresses (the pool's prefix routes the tunnel's clients, for replies to them),
        then the routes of the other sites into the device and their kill-switch sets; a
        route no longer announced is removed. Never a default route, never DNS."""
        old = self.config
        if old is None or (old.ipv4, old.ipv6, old.mtu) != (config.ipv4, config.ipv6,
                                                             config.mtu):
            if old is not None:
                flush_addresses(name)
            # The other sites' routes stay: they name the device, not an address.
            index = configure_link(name, [a for a in (config.ipv4, config.ipv6)
                                          if a is not None], config.mtu)
        else:
            index = self._device_index
        self._device_index = index
        if any(net.version == 6 for net in config.routes):
            # Only when there is an IPv6 site to reach: forwarding makes Linux ignore router
            # advertisements (accept_ra 1), which may be how this gateway has its IPv6.
            self._forward("net.ipv6.conf.all.forwarding")
        wanted = set(config.routes)
        for net in self._site_routes - wanted:
            delete_route(str(net), oif=index)
        for net in wanted:
            add_route(str(net), oif=index, replace=True)  # removed with the device
        self._site_routes = wanted
        nft(site_elements_batch(config.routes))
        self.state.site_routes = [str(net) for net in config.routes]
        self.state.save()

    def _configure(self, name: str, config: IpConfig) -> None:
        if self.config is not None:
            flush_addresses(name)
        addresses = [a for a in (config.ipv4, config.ipv6) if a is not None]
        index = configure_link(name, addresses, config.mtu)
        splits = (SPLIT_V4 if config.ipv4 else ()) + (SPLIT_V6 if config.ipv6 else ())
        for dst in splits:
            add_route(dst, oif=index, replace=True)  # removed with the device
        dns = [ip for ip in config.dns if ip.version == 4 or config.ipv6 is not None]
        if self._resolver is not None:
            # Split routing: our resolver answers, and asks the server's resolvers through
            # the tunnel (a host route each, so no direct range can take them around it).
            for ip in dns:
                add_route(f"{ip}/{32 if ip.version == 4 else 128}", oif=index, replace=True)
            self._resolver.tunnel_servers = [str(ip) for ip in dns]
            self._resolver.never_direct |= {str(ip) for ip in dns}
            self._set_resolvers([ipaddress.ip_address(RESOLVER_HOST)])
        elif dns:
            self._set_resolvers(dns)

    def _set_resolvers(self, dns: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
        path = self.options.resolv_conf
        if self.state.resolv_backup is None:
            try:
                backup = path.read_text()
            except FileNotFoundError:
                backup = ""
            self.state.resolv_conf = str(path)
            self.state.resolv_backup = backup
            self.state.save()
        text = ("# written by veil --tun; restored when it exits\n"
                + "".join(f"nameserver {ip}\n" for ip in dns))
        _write_in_place(path, text)

    # ------------------------------------------------------------------ packets
    def _from_device(self, packet: bytes) -> None:
        link = self._link
        if link is not None:
            link.send(packet)

    def _flush(self) -> None:
        link = self._link
        if link is not None:
            link.driver.flush()

    def resume_pump(self) -> None:
        if self._pump is not None:
            self._pump.resume()

    def pause_pump(self) -> None:
        if self._pump is not None:
            self._pump.pause()


class _IpLink:
    """The IP stream of one session (a PacketHandler for the session driver)."""

    def __init__(self, client: TunClient, driver: SessionDriver) -> None:
        self.client = client
        self.driver = driver
        self.config: IpConfig | None = None
        loop = asyncio.get_running_loop()
        self.configured: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._buffer = bytearray()
        self._started = False
        self._closed = False
        self.stream_id = driver.session.open_stream(StreamKind.IP, ANY)
        driver.attach(self.stream_id, self)
        transport = driver.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=SESSION_WRITE_HIGH_WATER)
        driver.flush()

    def start(self) -> None:
        self._started = True
        if not self.driver.writing_paused:
            self.client.resume_pump()

    def send(self, packet: bytes) -> None:
        try:
            self.driver.session.send_packet(self.stream_id, packet)
        except LocalProtocolError:
            self._finish()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.driver.detach(self.stream_id)
        if not self.driver.session.closed:
            self.driver.session.reset(self.stream_id, ResetCode.CANCELLED)
            self.driver.flush()
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    # PacketHandler
    def on_packet(self, packet: bytes) -> None:
        device = self.client.device
        if device is not None:
            device.write(packet)

    def on_data(self, data: bytes) -> None:
        # The config comes first; the server sends it again when the sites a client reaches
        # change (only its routes then differ).
        self.driver.session.consume(self.stream_id, len(data))
        self._buffer += data
        while self._buffer:
            try:
                config, used = IpConfig.decode(self._buffer)
            except NeedMoreData:
                if len(self._buffer) > MAX_CONFIG_SIZE + 2:
                    self._bad("IP config too long")
                return
            except ValueError as exc:
                self._bad(f"bad IP config: {exc}")
                return
            del self._buffer[:used]
            first = self.config is None
            self.config = config  # before the link starts, _serve applies the latest
            if first:
                self.configured.set_result(None)  # wakes _serve to apply it
            elif self._started:
                self.client.new_config(self, config)

    def _bad(self, why: str) -> None:
        log.error("%s; reconnecting", why)
        self.driver.close()

    def on_eof(self) -> None:
        self._finish()

    def on_reset(self, code: ResetCode) -> None:
        if code is ResetCode.REFUSED_DESTINATION:
            log.error("the server refused the tunnel (no TUN mode there, or no free address)")
        self._closed = True
        self._finish()

    def on_writable(self) -> None:
        pass

    def on_datagram(self, address: Address, payload: bytes) -> None:
        pass

    def pause_source(self) -> None:
        self.client.pause_pump()

    def resume_source(self) -> None:
        if self._started:
            self.client.resume_pump()


async def resolve_ways(key: AccessKey) -> tuple[dict[str, str], list[Address]]:
    """Each usable way in's host -> the address to dial for it, and the ip:port of every way.
    A way whose name does not resolve is left out with a warning; none resolving is an
    error."""
    loop = asyncio.get_running_loop()
    ways = [way for way in key.ways() if usable_way(key, way) and way.address is not None]
    pinned: dict[str, str] = {}
    addresses: list[Address] = []
    failed: set[str] = set()
    for way in ways:
        address = way.address
        assert address is not None
        if address.host in failed:
            continue
        if address.host not in pinned:
            if address.ip is not None:
                pinned[address.host] = address.host
            else:
                try:
                    infos = await loop.getaddrinfo(address.host, address.port,
                                                   type=socket.SOCK_STREAM)
                except OSError as exc:
                    log.warning("cannot resolve %s (%s); --tun leaves the way in %s out",
                                address.host, exc, way)
                    failed.add(address.host)
                    continue
                pinned[address.host] = str(infos[0][4][0])
        pair = Address(pinned[address.host], address.port)
        if pair not in addresses:
            addresses.append(pair)
    if not pinned:
        raise TunError("cannot resolve any way in of the key: "
                       + ", ".join(sorted(failed)) + " (is DNS working?)")
    return pinned, addresses


async def run_tun(key: AccessKey, options: TunClientOptions, stop: asyncio.Event, *,
                  tls_stack: str = "browser", session_config: SessionConfig | None = None) -> None:
    await TunClient(key, options, tls_stack=tls_stack, session_config=session_config).run(stop)

