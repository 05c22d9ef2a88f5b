"""The veil client: one tunnel, the local inbounds that use it, and their lifetime."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

from veil.client import rulefiles, sysproxy
from veil.client.forward import start_forward
from veil.client.http_proxy import HttpProxyInbound
from veil.client.routing import RoutingDialer
from veil.client.ruledata import RuleData
from veil.client.rules import RuleSet
from veil.client.socks5 import Socks5Inbound
from veil.client.subscription import Follower, FollowingTunnel
from veil.client.sysproxy import SystemProxy
from veil.config import ClientOptions, is_local
from veil.errors import ConfigError, VeilError
from veil.net.client_session import ClientTunnel
from veil.net.dialer import Dialer
from veil.net.direct import DirectDialer
from veil.net.trojan_client import TrojanDialer
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.trojan import TrojanLink

log = logging.getLogger("veil.client")

# How long to wait for the first session before saying the server cannot be reached (the
# client keeps trying afterwards; this only decides when to tell the user).
FIRST_CONNECT_REPORT_S = 10.0


class Inbound(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


async def run_client(options: ClientOptions, stop: asyncio.Event, *,
                     follower: Follower | None = None) -> None:
    """``follower``: the started subscription ``options.subscription`` names (its first
    answer is ``options.key``); the tunnel then follows it (veil.client.subscription)."""
    rule_data = follower.rule_data if follower is not None else None
    cn_data = rule_data.current.cn_data if rule_data is not None else rulefiles.CN_DATA
    if options.tun:
        if follower is not None:
            log.warning("--tun keeps the subscription's first key and rule data: they are "
                        "not refreshed")
        await _run_tun(options, stop, cn_data)
        return
    # Rules first: a bad line is reported before anything connects.
    rules = load_client_rules(options.rules, cn_data) if options.rules else None
    tunnel: ClientTunnel | TrojanDialer | FollowingTunnel
    if follower is not None:
        tunnel = FollowingTunnel(follower, lambda key: ClientTunnel(
            key, pool_size=options.connections, tls_stack=options.tls_stack,
            session_config=options.session_config(), stripe=options.stripe))
    elif isinstance(options.key, TrojanLink):
        tunnel = TrojanDialer(options.key)  # a connection per stream: --connections does not apply
    else:
        tunnel = ClientTunnel(options.key, pool_size=options.connections,
                              tls_stack=options.tls_stack,
                              session_config=options.session_config(), stripe=options.stripe)
    dialer: Dialer = tunnel
    routing: RoutingDialer | None = None
    if rules is not None:
        direct = DirectDialer()
        dialer = routing = RoutingDialer(rules, tunnel, direct, close_direct=direct.close)
        log.warning("split routing: %d rules from %s", len(routing.rules),
                    ", ".join(options.rules))
        if rule_data is not None:
            log.warning("rule data for cn: %s", rule_data.current.origin)
            rule_data.listeners.append(_swapper(routing, options.rules))
    try:
        await _run_inbounds(options, stop, tunnel, dialer)
    finally:
        if routing is not None:
            routing.close()
            for line in routing.rules.counters():
                log.info("rule %s", line)
            log.info("names asked of the server's resolver: %d (no answer, so tunnelled: %d)",
                     routing.resolved, routing.unresolved)


def load_client_rules(sources: tuple[str, ...],
                      cn_data: rulefiles.CnData | None = rulefiles.CN_DATA) -> RuleSet:
    """The rule set ``--rules`` names (``cn`` from ``cn_data``, the packaged data unless
    given); ConfigError (naming file:line) when one is bad."""
    return rulefiles.load_rules(sources, cn_data=cn_data)


def _swapper(routing: RoutingDialer,
             sources: tuple[str, ...]) -> Callable[[RuleData], Awaitable[None]]:
    """Rebuilds the rules from new ``cn`` data and puts them in place: new connections
    follow them, open ones keep the route they were given."""
    async def swap(data: RuleData) -> None:
        try:
            # ~0.5 s of CPU with the real lists: off the event loop
            rules = await asyncio.to_thread(load_client_rules, sources, data.cn_data)
        except ConfigError as exc:  # the data was checked: a rules file changed since start
            log.error("rule data: cannot rebuild the rules (%s); keeping the old ones", exc)
            return
        for line in routing.rules.counters():  # what the old rules did, before they go
            log.info("rule %s", line)
        routing.rules = rules
        log.warning("split routing: %d rules from %s, cn data %s", len(rules),
                    ", ".join(sources), data.origin)
    return swap


async def _run_inbounds(options: ClientOptions, stop: asyncio.Event,
                        tunnel: ClientTunnel | TrojanDialer | FollowingTunnel,
                        dialer: Dialer) -> None:
    inbounds: list[Socks5Inbound | HttpProxyInbound] = []
    if options.socks is not None:
        inbounds.append(Socks5Inbound(dialer, options.socks,
                                      credentials=options.socks_credentials))
    if options.http is not None:
        inbounds.append(HttpProxyInbound(dialer, options.http,
                                         credentials=options.http_credentials))
    started: list[Inbound] = []
    system_proxy: SystemProxy | None = None
    try:
        for inbound in inbounds:
            try:
                await inbound.start()
            except OSError as exc:
                raise VeilError(f"cannot listen: {exc.strerror or exc}") from exc
            started.append(inbound)
        for spec in options.forwards:
            try:
                started.append(await start_forward(dialer, spec))
            except OSError as exc:
                raise VeilError(f"cannot listen for --forward {spec}: "
                                f"{exc.strerror or exc}") from exc
        tunnel.start()
        # The address actually bound, not the one asked for: with port 0 the system picks the
        # port, and this line is how a caller (or a test) learns it.
        for proxy in inbounds:
            what = "SOCKS5" if isinstance(proxy, Socks5Inbound) else "HTTP"
            log.info("%s proxy on %s", what, proxy.address)
            open_to = (options.socks_credentials if isinstance(proxy, Socks5Inbound)
                       else options.http_credentials)
            if open_to is None and not is_local(proxy.address):
                # Allowed by --allow-lan, and still worth saying at every start.
                log.warning("the %s proxy on %s takes anyone who can reach it, with no "
                            "password: an open proxy into the tunnel (add --%s-auth)", what,
                            proxy.address, "socks" if what == "SOCKS5" else "http")
        if options.system_proxy:
            system_proxy = _set_system_proxy(inbounds)
        # A stop (SIGTERM) while the first connection is still being tried ends at once.
        ready = asyncio.ensure_future(tunnel.wait_ready(FIRST_CONNECT_REPORT_S))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((ready, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            ready_in_time = ready.result()
            if not ready_in_time:
                log.error("not connected yet: %s; still trying",
                          tunnel.last_error or "no answer")
        ready.cancel()
        await stopping
    finally:
        if system_proxy is not None:
            system_proxy.close()  # before the proxies go: applications then go direct
        for running in started:
            await running.close()
        await tunnel.close()


def _set_system_proxy(inbounds: list[Socks5Inbound | HttpProxyInbound]) -> SystemProxy:
    """--system-proxy: the desktop's settings pointed at the proxies as bound (a wildcard
    listen address is reached at loopback)."""
    def reachable(address: Address) -> Address:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
        return Address(host, address.port)

    http = next(reachable(p.address) for p in inbounds if isinstance(p, HttpProxyInbound))
    socks = next((reachable(p.address) for p in inbounds if isinstance(p, Socks5Inbound)), None)
    system_proxy = SystemProxy(sysproxy.detect(), sysproxy.saved_path())
    system_proxy.apply(sysproxy.ProxySettings(http, socks))
    return system_proxy


async def _run_tun(options: ClientOptions, stop: asyncio.Event,
                   cn_data: rulefiles.CnData | None = rulefiles.CN_DATA) -> None:
    if sys.platform == "linux":
        from veil.client.tun import TunClientOptions, run_tun  # noqa: PLC0415
    else:
        from veil.client.tun_unsupported import TunClientOptions, run_tun  # noqa: PLC0415

    if not isinstance(options.key, AccessKey):
        raise ConfigError("--tun needs a veil:// key (Trojan has no IP tunnel)")
    if options.socks or options.http or options.forwards:
        raise ConfigError("--tun replaces --socks, --http and --forward: use one or the other")
    # Rules first: a bad line, or one routes cannot apply (ports), is reported before anything
    # on the machine changes.
    rules = load_client_rules(options.rules, cn_data) if options.rules else None
    tun_options = TunClientOptions.parse(options.tun_exclude, rules, site=options.tun_site)
    if rules is not None:
        log.warning("split routing: %d rules from %s", len(rules), ", ".join(options.rules))
    await run_tun(options.key, tun_options, stop,
                  tls_stack=options.tls_stack, session_config=options.session_config())


def tun_cleanup(exclude: tuple[str, ...] = ()) -> bool:
    """Undo what a ``--tun`` client that did not exit cleanly left in this network namespace;
    False when it left nothing."""
    if sys.platform == "linux":
        from veil.client.tun import TunClientOptions, cleanup  # noqa: PLC0415
    else:
        from veil.client.tun_unsupported import TunClientOptions, cleanup  # noqa: PLC0415

    return cleanup(TunClientOptions.parse(exclude))
