"""The server's side of full-device tunnels (``veil serve --tun``), Linux only.

One TUN device (``veils0``) for all clients. Each IP stream a client opens gets an address
from the pool (IPv4, and IPv6 from ``--pool6``), announced in an :class:`IpConfig`; packets
from the stream go to the device only when their source is that address (no spoofing), and
packets the device hands us go to the stream that owns their destination. The kernel does
the rest: forwarding, NAT (masquerade) to the outside, and, through our nftables table
``veil``, refusing client-to-client traffic, the server's own private networks (unless
``--allow-private``) and clamping TCP MSS to the route's MTU.

Everything set up here lives in the server's network namespace and is removed by
:meth:`TunServer.stop`: the device (closing it deletes it and its routes), the ``veil``
table, and the forwarding sysctls (restored to what they were).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from veil.config import DEFAULT_TUN_POOL, DEFAULT_TUN_POOL6, parse_tun_pools
from veil.errors import ConfigError, LocalProtocolError
from veil.net.driver import DatagramStreamHandler, SessionDriver
from veil.net.tun_linux import (
    PacketPump,
    TunDevice,
    configure_link,
    nft,
    nft_delete_table,
    read_sysctl,
    write_sysctl,
)
from veil.protocol.address import Address
from veil.protocol.events import StreamOpened
from veil.protocol.frames import ResetCode
from veil.protocol.ip import (
    MAX_ROUTES,
    IPAddress,
    IpConfig,
    packet_destination,
    packet_source,
)
from veil.server.policy import REFUSED_V4, REFUSED_V6_ALL
from veil.server.sites import SiteTable
from veil.store.base import User

log = logging.getLogger("veil.server")

DEVICE_NAME = "veils0"
NFT_TABLE = "veil"
# The tunnel's MTU: packets ride in TLS over TCP, so nothing below limits it; 1500 is what
# the Internet behind the server takes without fragmentation or PMTU discovery.
TUN_MTU = 1500
# Resolvers announced when the server's own resolv.conf has none a client could reach
# (only loopback stubs such as systemd-resolved's 127.0.0.53).
FALLBACK_DNS = ("1.1.1.1", "2606:4700:4700::1111")
# A session's TLS write buffer may hold this much before its packets are dropped, as a
# router's queue would: 4 super-packets' worth keeps one bulk TCP flow at full speed.
SESSION_WRITE_HIGH_WATER = 4 * 1024 * 1024
# The ranges clients may not reach through the tunnel without --allow-private: the same table
# DestinationPolicy refuses streams by (IPv6 with the 6to4 and NAT64 forms of the IPv4 ones).
PRIVATE_V4 = REFUSED_V4
PRIVATE_V6 = REFUSED_V6_ALL


@dataclass(frozen=True, slots=True)
class TunServerOptions:
    pool: ipaddress.IPv4Network = field(default_factory=lambda: ipaddress.IPv4Network(
        DEFAULT_TUN_POOL))
    pool6: ipaddress.IPv6Network | None = field(default_factory=lambda: ipaddress.IPv6Network(
        DEFAULT_TUN_POOL6))
    allow_private: bool = False
    #: TCP destination ports refused to clients (``--refuse-ports``), as streams are.
    refused_tcp_ports: tuple[int, ...] = ()
    #: Let clients reach each other's tunnel addresses.
    client_to_client: bool = False
    dns: tuple[IPAddress, ...] | None = None  # None: from /etc/resolv.conf
    device: str = DEVICE_NAME

    @classmethod
    def parse(cls, pool: str | None, pool6: str | None, *, allow_private: bool = False,
              refused_tcp_ports: tuple[int, ...] = ()) -> TunServerOptions:
        """From the CLI's ``--pool``/``--pool6`` (``none`` turns IPv6 off)."""
        net4, net6 = parse_tun_pools(pool, pool6)
        return cls(net4, net6, allow_private, refused_tcp_ports)


class AddressPool:
    """Addresses for sessions: index 1 is the server, 2.. the clients; IPv4 and IPv6 share
    the index. A user gets back the address it had last, when no live session holds it."""

    def __init__(self, net4: ipaddress.IPv4Network, net6: ipaddress.IPv6Network | None) -> None:
        self.net4 = net4
        self.net6 = net6
        size = net4.num_addresses - 2  # no network or broadcast address
        if net6 is not None:
            size = min(size, net6.num_addresses - 1)
        self.last = size  # highest usable index
        self._used: set[int] = set()
        self._next = 2
        self._preferred: dict[str, int] = {}  # user -> the index it had last
        self._owner: dict[int, str] = {}  # and back

    def server(self) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv6Interface | None]:
        return self.interfaces(1)

    def interfaces(self, index: int) -> tuple[ipaddress.IPv4Interface,
                                              ipaddress.IPv6Interface | None]:
        v4 = ipaddress.IPv4Interface((int(self.net4.network_address) + index,
                                      self.net4.prefixlen))
        v6 = None
        if self.net6 is not None:
            v6 = ipaddress.IPv6Interface((int(self.net6.network_address) + index,
                                          self.net6.prefixlen))
        return v4, v6

    def allocate(self, user: str) -> int | None:
        """An index for a session of ``user``, or None when the pool is used up."""
        preferred = self._preferred.get(user)
        if preferred is not None and preferred not in self._used:
            self._used.add(preferred)
            return preferred
        index = self._next_free(remembered_ok=False) or self._next_free(remembered_ok=True)
        if index is None:
            return None
        owner = self._owner.pop(index, None)
        if owner is not None:
            del self._preferred[owner]  # its user had not come back: the address is reused
        if preferred is not None:
            del self._owner[preferred]
        self._used.add(index)
        self._preferred[user] = index
        self._owner[index] = user
        return index

    def _next_free(self, *, remembered_ok: bool) -> int | None:
        # Round robin from after the last allocation: a released address is not handed to
        # somebody else at once, so packets still in flight to it do not reach a stranger.
        for _ in range(self.last - 1):
            index = self._next
            self._next = 2 if index >= self.last else index + 1
            if index not in self._used and (remembered_ok or index not in self._owner):
                return index
        return None

    def release(self, index: int) -> None:
        self._used.discard(index)


def resolvers_from(path: Path = Path("/etc/resolv.conf")) -> tuple[IPAddress, ...]:
    """The resolvers of the server's resolv.conf that a client can reach through NAT."""
    found: list[IPAddress] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            if not ip.is_loopback and not ip.is_link_local:
                found.append(ip)
    if not found:
        found = [ipaddress.ip_address(a) for a in FALLBACK_DNS]
    return tuple(found[:3])


class TunServer:
    """The server's TUN device, address pool and per-session packet relays."""

    def __init__(self, options: TunServerOptions) -> None:
        if sys.platform != "linux":
            raise ConfigError("--tun is supported on Linux only")
        self.options = options
        self.pool = AddressPool(options.pool, options.pool6)
        self.dns = options.dns if options.dns is not None else resolvers_from()
        self.device: TunDevice | None = None
        self._pump: PacketPump | None = None
        self._routes: dict[bytes, _IpRelay] = {}  # packed client address -> its relay
        self._relays: set[_IpRelay] = set()
        self._dirty: set[SessionDriver] = set()
        self._flush_scheduled = False
        self._sysctls: dict[str, str] = {}
        #: Site-to-site (veil.server.sites): who owns which subnets, who reaches what.
        self.sites = SiteTable(())
        #: Each site's live relays, oldest first: the newest carries the site's traffic (a
        #: gateway that just (re)connected is the one that works), the others stand by.
        self._site_relays: dict[str, list[_IpRelay]] = {}
        self.spoofed = 0  # packets dropped for a wrong source address
        self.dropped = 0  # packets dropped for a congested session or no session
        self.filtered = 0  # site packets dropped by --reach or for leaving the sites

    async def start(self) -> None:
        device = TunDevice(self.options.device)
        self.device = device
        try:
            await asyncio.to_thread(self._configure, device.name)
        except BaseException:
            device.close()
            self.device = None
            await asyncio.to_thread(self._unconfigure)
            raise
        self._pump = PacketPump(device, self._from_device, on_batch_end=self._flush_dirty)
        self._pump.resume()
        v4, v6 = self.pool.server()
        log.info("TUN %s up: %s%s, offloads %s, %d addresses", device.name, v4,
                 f", {v6}" if v6 else "", "on" if device.offload else "off", self.pool.last - 1)

    def _configure(self, name: str) -> None:
        v4, v6 = self.pool.server()
        configure_link(name, [a for a in (v4, v6) if a is not None], TUN_MTU)
        wanted = {"net.ipv4.ip_forward": "1"}
        if v6 is not None:
            wanted["net.ipv6.conf.all.forwarding"] = "1"
        for key, value in wanted.items():
            old = read_sysctl(key)
            if old != value:
                self._sysctls[key] = old
                write_sysctl(key, value)
        nft_delete_table("inet", NFT_TABLE)  # a crashed server's table, if any
        nft(self.ruleset(name))

    def ruleset(self, name: str) -> str:
        """The ``veil`` nftables table (see the module docstring)."""
        opts = self.options
        forward = []
        if not opts.client_to_client:
            forward.append(f'iifname "{name}" oifname "{name}" drop')
        input_rules = [f'iifname "{name}" ct state established,related accept',
                       f'iifname "{name}" meta l4proto {{ icmp, ipv6-icmp }} accept']
        if not opts.allow_private:
            forward.append(f'iifname "{name}" ip daddr {{ {", ".join(PRIVATE_V4)} }} drop')
            forward.append(f'iifname "{name}" ip6 daddr {{ {", ".join(PRIVATE_V6)} }} drop')
            # The server itself is a private destination too (its other services).
            input_rules.append(f'iifname "{name}" drop')
        if opts.refused_tcp_ports:
            # A reset, as a refused stream gets: the application fails at once, not after
            # its connect timeout.
            ports = ", ".join(map(str, opts.refused_tcp_ports))
            forward.append(f'iifname "{name}" tcp dport {{ {ports} }} reject with tcp reset')
        forward.append("tcp flags syn tcp option maxseg size set rt mtu")
        nat = [f'oifname != "{name}" ip saddr {opts.pool} masquerade']
        if opts.pool6 is not None:
            nat.append(f'oifname != "{name}" ip6 saddr {opts.pool6} masquerade')

        def chain(name_: str, hook: str, rules: list[str]) -> list[str]:
            return [f"  chain {name_} {{", f"    {hook}", *(f"    {r}" for r in rules), "  }"]

        return "\n".join([
            f"table inet {NFT_TABLE} {{",
            *chain("forward", "type filter hook forward priority filter; policy accept;",
                   forward),
            *chain("input", "type filter hook input priority filter; policy accept;",
                   input_rules),
            *chain("postrouting", "type nat hook postrouting priority srcnat; policy accept;",
                   nat),
            "}", ""])

    def _unconfigure(self) -> None:
        nft_delete_table("inet", NFT_TABLE)
        for key, value in self._sysctls.items():
            try:
                write_sysctl(key, value)
            except OSError as exc:
                log.warning("cannot restore %s: %s", key, exc)
        self._sysctls.clear()

    # ------------------------------------------------------------------ sessions
    def open(self, driver: SessionDriver, event: StreamOpened, user: str) -> None:
        """A client opened an IP stream: assign addresses, announce them, start relaying."""
        device = self.device
        index = self.pool.allocate(user) if device is not None else None
        if device is None or index is None:
            if device is not None:
                log.warning("address pool exhausted; refusing a tunnel for user %s", user)
            driver.session.reset(event.stream_id, ResetCode.REFUSED_DESTINATION)
            driver.flush()
            return
        v4, v6 = self.pool.interfaces(index)
        relay = _IpRelay(self, driver, event.stream_id, index, v4, v6, user)
        relay.routes = self._routes_for(user)
        config = IpConfig(v4, v6, TUN_MTU, self.dns, relay.routes)
        driver.attach(event.stream_id, relay)
        transport = driver.transport
        if transport is not None:
            transport.set_write_buffer_limits(high=SESSION_WRITE_HIGH_WATER)
        for key in relay.keys:
            old = self._routes.get(key)
            if old is not None:
                old.close()
            self._routes[key] = relay
        self._relays.add(relay)
        self._site_relays.setdefault(user, []).append(relay)
        driver.session.send_data(event.stream_id, config.encode())
        driver.flush()
        log.info("tunnel for user %s: %s%s%s", user, v4.ip, f", {v6.ip}" if v6 else "",
                 f", site {' '.join(map(str, self.sites.subnets[user]))}"
                 if self.sites.is_site(user) else "")

    def set_users(self, users: Iterable[User]) -> None:
        """A new directory: rebuild the site table, and send a config again to every tunnel
        whose reachable subnets changed (a site gateway routes what it is told)."""
        pools = [net for net in (self.options.pool, self.options.pool6) if net is not None]
        self.sites = SiteTable(users, pools)
        for relay in list(self._relays):
            routes = self._routes_for(relay.user)
            if routes != relay.routes:
                relay.routes = routes
                relay.send_config(IpConfig(relay.v4, relay.v6, TUN_MTU, self.dns, routes))

    def _routes_for(self, user: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                              ...]:
        routes = self.sites.routes_for(user)
        if len(routes) > MAX_ROUTES:
            log.error("user %s reaches %d site subnets; its tunnel is told the first %d "
                      "(join subnets)", user, len(routes), MAX_ROUTES)
        return routes[:MAX_ROUTES]

    def forget(self, relay: _IpRelay) -> None:
        self._relays.discard(relay)
        for key in relay.keys:
            if self._routes.get(key) is relay:
                del self._routes[key]
        relays = self._site_relays.get(relay.user)
        if relays is not None:
            if relay in relays:
                relays.remove(relay)
            if not relays:
                del self._site_relays[relay.user]
        self.pool.release(relay.index)

    # ------------------------------------------------------------------ site-to-site
    def from_session(self, relay: _IpRelay, packet: bytes) -> None:
        """A packet from a client's IP stream, when there are sites (else on_packet's fast
        path): to another session directly when it is for a site (or from one), else to
        the device. Decided here, never by the kernel: no packet for a site subnet reaches
        the server's own networks, whatever they are."""
        sites = self.sites
        source = packet_source(packet)
        user = relay.user
        if source not in relay.keys and sites.site_of(source) != user:
            self.spoofed += 1  # neither its tunnel address nor its site's subnets
            return
        destination = packet_destination(packet)
        site = sites.site_of(destination)
        if site is not None:
            target = self._site_relay(site)
            if target is None or target.user == user:
                self.dropped += 1  # the site's gateway is not connected
            elif not sites.allowed(user, source, site, destination):
                self.filtered += 1
            else:
                self._relay_to(target, packet)
            return
        if not sites.is_site(user):
            self.write(packet)  # a device's tunnel: the Internet, as ever
            return
        # A site reaches the other sites and the tunnel's clients allowed to, nothing else:
        # its LAN's traffic never leaves through the server (no NAT for it).
        target = self._routes.get(destination)
        if target is None or target.user == user or not (
                sites.may_reach(target.user, user, source)
                or (sites.is_site(target.user) and sites.may_reach(user, target.user,
                                                                   destination))):
            self.filtered += 1
            return
        self._relay_to(target, packet)

    def _site_relay(self, site: str) -> _IpRelay | None:
        relays = self._site_relays.get(site)
        return relays[-1] if relays else None

    def _relay_to(self, relay: _IpRelay, packet: bytes) -> None:
        """Queue a packet on another session; sent once this batch of frames is handled."""
        if self._send(relay, packet) and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_dirty)

    def _from_device(self, packet: bytes) -> None:
        relay = self._routes.get(packet_destination(packet))
        if relay is None:
            self.dropped += 1
            return
        self._send(relay, packet)

    def _send(self, relay: _IpRelay, packet: bytes) -> bool:
        driver = relay.driver
        if driver.writing_paused:
            self.dropped += 1  # congested: drop, as a router with a full queue does
            return False
        try:
            driver.session.send_packet(relay.stream_id, packet)
        except LocalProtocolError:  # the session is closing: drop the packet
            self.dropped += 1
            return False
        self._dirty.add(driver)
        return True

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for driver in dirty:
            driver.flush()

    def write(self, packet: bytes) -> None:
        if self.device is not None:
            self.device.write(packet)

    async def stop(self) -> None:
        for relay in list(self._relays):
            relay.close()
        if self._pump is not None:
            self._pump.pause()
        if self.device is not None:
            self.device.close()  # deletes the device and its routes
            self.device = None
        await asyncio.to_thread(self._unconfigure)


class _IpRelay(DatagramStreamHandler):
    """One client's IP stream on the server (a PacketHandler for the session driver)."""

    def __init__(self, server: TunServer, driver: SessionDriver, stream_id: int, index: int,
                 v4: ipaddress.IPv4Interface, v6: ipaddress.IPv6Interface | None,
                 user: str) -> None:
        self.server = server
        self.driver = driver
        self.stream_id = stream_id
        self.index = index
        self.v4 = v4
        self.v6 = v6
        self.user = user
        self.keys = (v4.ip.packed,) + ((v6.ip.packed,) if v6 is not None else ())
        #: The site subnets last announced to this client.
        self.routes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
        self._closed = False

    def on_packet(self, packet: bytes) -> None:
        server = self.server
        if server.sites:
            server.from_session(self, packet)
        # Anti-spoofing: a client sends only from its own addresses.
        elif packet_source(packet) in self.keys:
            server.write(packet)
        else:
            server.spoofed += 1

    def send_config(self, config: IpConfig) -> None:
        """Tell the client again (its reachable subnets changed)."""
        if self._closed:
            return
        try:
            self.driver.session.send_data(self.stream_id, config.encode())
        except LocalProtocolError:
            return  # closing
        self.driver.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.server.forget(self)
        self.driver.cancel(self.stream_id)

    # StreamHandler
    def on_data(self, data: bytes) -> None:
        self.driver.session.consume(self.stream_id, len(data))

    def on_eof(self) -> None:
        self.close()

    def on_reset(self, code: ResetCode) -> None:
        if not self._closed:
            self._closed = True
            self.server.forget(self)

    def on_datagram(self, address: Address, payload: bytes) -> None:
        pass  # the session gives IP streams packets, never addressed datagrams
