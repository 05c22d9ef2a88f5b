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

A clean exit (SIGINT, SIGTERM) undoes all of it in reverse order; closing the device removes
its addresses and routes with it.

The IP stream lives as long as the tunnel, on one session: when the way in use changes (a
better way works again), it moves to a session on the new way once that one is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    route_get,
)
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address, NeedMoreData
from veil.protocol.frames import ResetCode, StreamKind
from veil.protocol.ip import MAX_CONFIG_SIZE, IpConfig
from veil.protocol.session import SessionConfig

log = logging.getLogger("veil.client")

DEVICE_NAME = "veil0"
KILLSWITCH_TABLE = "veil-killswitch"
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

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TunClientOptions:
    exclude: tuple[IPNetwork, ...] = ()
    device: str = DEVICE_NAME
    state_dir: Path = STATE_DIR
    resolv_conf: Path = RESOLV_CONF

    @classmethod
    def parse(cls, exclude: Iterable[str]) -> TunClientOptions:
        nets: list[IPNetwork] = []
        for text in exclude:
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise ConfigError(f"--exclude takes a CIDR: {exc}") from exc
        return cls(tuple(nets))


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

    def save(self) -> None:
        data = {"pid": self.pid, "routes": self.routes, "nft_tables": self.nft_tables,
                "resolv_conf": self.resolv_conf, "resolv_backup": self.resolv_backup}
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
                   data.get("resolv_backup"))


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
    for route in reversed(state.routes):
        delete_route(route["dst"], oif=route.get("oif"), gateway=route.get("gateway"))
    state.routes.clear()
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


# ---------------------------------------------------------------- the kill switch
def killswitch_ruleset(device: str, servers: Iterable[Address], exclude: Iterable[IPNetwork],
                       mtu_clamp: bool = True) -> str:
    """The kill switch's table; ``servers``: the ip:port of each way in (the server's own
    ports, a CDN's), the only connections allowed around the tunnel."""
    rules = ['oifname "lo" accept', f'oifname "{device}" accept']
    for server in dict.fromkeys(servers):  # each pair once, in order
        server_ip = ipaddress.ip_address(server.host)
        family = "ip" if server_ip.version == 4 else "ip6"
        rules.append(f"{family} daddr {server_ip} tcp dport {server.port} accept")
    for net in exclude:
        rules.append(f"{'ip' if net.version == 4 else 'ip6'} daddr {net} accept")
    rules += [
        # The LAN lease must survive an hour-long tunnel; DHCP carries no user data.
        "udp sport 68 udp dport 67 accept",
        "udp sport 546 udp dport 547 accept",
        # Without neighbour discovery an IPv6 server (or gateway) is unreachable.
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept",
        # Rejected locally: applications fail at once instead of timing out, and nothing
        # is sent.
        "reject with icmpx type admin-prohibited",
    ]
    forward = [f'oifname "{device}" tcp flags syn tcp option maxseg size set rt mtu'] if (
        mtu_clamp) else []
    # What this machine forwards for others (containers, VMs, a hotspot) leaves the same ways
    # as its own traffic, never around the tunnel: also before the TUN device is up, while
    # the client reconnects, and for IPv6 when the server gives none.
    forward += [f'oifname "{device}" accept', f'iifname "{device}" accept']
    for net in exclude:
        family_ = "ip" if net.version == 4 else "ip6"
        forward += [f"{family_} daddr {net} accept", f"{family_} saddr {net} accept"]
    forward.append("reject with icmpx type admin-prohibited")
    lines = [f"table inet {KILLSWITCH_TABLE} {{",
             "  chain output {",
             "    type filter hook output priority filter; policy accept;",
             *(f"    {r}" for r in rules),
             "  }",
             "  chain forward {",
             "    type filter hook forward priority filter; policy accept;",
             *(f"    {r}" for r in forward),
             "  }",
             "}", ""]
    return "\n".join(lines)


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

    async def run(self, stop: asyncio.Event) -> None:
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
        for ip in dict.fromkeys(server.host for server in servers):
            self._route_like(f"{ip}/{32 if ':' not in ip else 128}", ip)
        for net in self.options.exclude:
            self._route_like(str(net), str(net.network_address))
        self.state.nft_tables.append(KILLSWITCH_TABLE)
        self.state.save()
        nft_delete_table("inet", KILLSWITCH_TABLE)
        nft(killswitch_ruleset(self.options.device, servers, self.options.exclude))

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
        if config == self.config:
            return  # a reconnect that got the same addresses: nothing to change
        assert self.device is not None
        await asyncio.to_thread(self._configure, self.device.name, config)
        self.config = config
        log.warning("TUN %s up: %s%s, MTU %d, DNS %s", self.device.name,
                    config.ipv4 or "", f" {config.ipv6}" if config.ipv6 else " (IPv6 blocked)",
                    config.mtu, ", ".join(map(str, config.dns)) or "unchanged")

    def _configure(self, name: str, config: IpConfig) -> None:
        if self.config is not None:
            flush_addresses(name)
        addresses = [a for a in (config.ipv4, config.ipv6) if a is not None]
        index = configure_link(name, addresses, config.mtu)
        splits = (SPLIT_V4 if config.ipv4 else ()) + (SPLIT_V6 if config.ipv6 else ())
        for dst in splits:
            add_route(dst, oif=index, replace=True)  # removed with the device
        dns = [ip for ip in config.dns if ip.version == 4 or config.ipv6 is not None]
        if dns:
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
        self.driver.session.consume(self.stream_id, len(data))
        if self.config is not None:
            return  # the config comes once; nothing else is defined on the stream yet
        self._buffer += data
        try:
            config, _ = IpConfig.decode(self._buffer)
        except NeedMoreData:
            if len(self._buffer) > MAX_CONFIG_SIZE + 2:
                self._bad("IP config too long")
            return
        except ValueError as exc:
            self._bad(f"bad IP config: {exc}")
            return
        self.config = config
        self._buffer.clear()
        self.configured.set_result(None)  # wakes _serve to apply it

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

