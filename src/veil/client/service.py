"""The veil client: one tunnel, the local inbounds that use it, and their lifetime."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
from dataclasses import dataclass, field
from typing import Protocol

from veil.client.forward import ForwardSpec, parse_forward_spec, start_forward
from veil.client.http_proxy import HttpProxyInbound
from veil.client.socks5 import Credentials, Socks5Inbound
from veil.errors import ConfigError, VeilError
from veil.net.client_session import ClientTunnel
from veil.net.trojan_client import TrojanDialer
from veil.protocol.accesskey import AccessKey
from veil.protocol.address import Address
from veil.protocol.session import SessionConfig
from veil.protocol.shaping import DEFAULT_SHAPING, NO_SHAPING
from veil.protocol.trojan import TrojanLink

log = logging.getLogger("veil.client")

# How long to wait for the first session before saying the server cannot be reached (the
# client keeps trying afterwards; this only decides when to tell the user).
FIRST_CONNECT_REPORT_S = 10.0


class Inbound(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ClientOptions:
    key: AccessKey | TrojanLink
    socks: Address | None = None
    socks_credentials: Credentials | None = None
    http: Address | None = None
    forwards: tuple[ForwardSpec, ...] = field(default_factory=tuple)
    #: The HTTP proxy's username/password (Proxy-Authorization: Basic).
    http_credentials: Credentials | None = None
    #: Let other machines use a proxy without a password, or a forward (which has none):
    #: refused by default, since that is an open proxy into the tunnel for the whole network.
    allow_lan: bool = False
    pool: int = 1
    tls_stack: str = "browser"
    shaping: bool = True
    #: Full-device tunnel (``--tun``, Linux): a TUN device instead of local proxies.
    tun: bool = False
    tun_exclude: tuple[str, ...] = ()
    #: Ping after this many idle seconds; the server is dead after the second figure more.
    keepalive: tuple[float, float] = (15.0, 10.0)

    def __post_init__(self) -> None:
        if self.allow_lan:
            return
        open_ = []
        if self.socks is not None and self.socks_credentials is None and not _local(self.socks):
            open_.append(f"--socks {self.socks} (add --socks-auth)")
        if self.http is not None and self.http_credentials is None and not _local(self.http):
            open_.append(f"--http {self.http} (add --http-auth)")
        open_ += [f"--forward {spec.listen}" for spec in self.forwards if not _local(spec.listen)]
        if open_:
            raise ConfigError("these listen beyond this machine with no password, an open proxy "
                              "into the tunnel for anyone who can reach them: "
                              + "; ".join(open_) + ". Say --allow-lan if that is meant")

    def session_config(self) -> SessionConfig:
        interval, timeout = self.keepalive
        return SessionConfig(keepalive_interval=interval, keepalive_timeout=timeout,
                             shaping=DEFAULT_SHAPING if self.shaping else NO_SHAPING)

    @classmethod
    def from_args(cls, key: AccessKey | TrojanLink, *, socks: Address | None, http: Address | None,
                  forwards: list[str], socks_auth: str | None, pool: int,
                  default_socks: Address, tls_stack: str = "browser",
                  shaping: bool = True, tun: bool = False,
                  tun_exclude: tuple[str, ...] = (),
                  keepalive: str | None = None, http_auth: str | None = None,
                  allow_lan: bool = False) -> ClientOptions:
        specs = tuple(parse_forward_spec(text) for text in forwards)
        if socks is None and http is None and not specs and not tun:
            socks = default_socks
        return cls(key, socks=socks, socks_credentials=_credentials("--socks-auth", socks_auth),
                   http=http, forwards=specs,
                   http_credentials=_credentials("--http-auth", http_auth), allow_lan=allow_lan,
                   pool=pool, tls_stack=tls_stack, shaping=shaping, tun=tun,
                   tun_exclude=tun_exclude,
                   keepalive=parse_keepalive(keepalive) if keepalive else (15.0, 10.0))


def _credentials(flag: str, text: str | None) -> Credentials | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{flag} takes USER:PASSWORD")
    try:
        return Credentials(user.encode(), password.encode())
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from exc


def _local(address: Address) -> bool:
    """Only this machine can connect: a loopback address or name."""
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False


def parse_keepalive(text: str) -> tuple[float, float]:
    """``INTERVAL[:TIMEOUT]`` in seconds; the timeout defaults to two thirds of the interval."""
    interval_text, _, timeout_text = text.partition(":")
    try:
        interval = float(interval_text)
        timeout = float(timeout_text) if timeout_text else interval * 2 / 3
    except ValueError as exc:
        raise ConfigError(f"--keepalive takes SECONDS[:TIMEOUT], not {text!r}") from exc
    if not (0.5 <= interval <= 3600 and 0.5 <= timeout <= 3600):
        raise ConfigError("--keepalive: both figures must be between 0.5 and 3600 seconds")
    return interval, timeout


def parse_key(text: str) -> AccessKey | TrojanLink:
    """A veil access key (``veil://``) or a Trojan link (``trojan://``, any Trojan server)."""
    if text.strip().lower().startswith("trojan://"):
        return TrojanLink.parse(text)
    return AccessKey.parse(text)


async def run_client(options: ClientOptions, stop: asyncio.Event) -> None:
    if options.tun:
        await _run_tun(options, stop)
        return
    tunnel: ClientTunnel | TrojanDialer
    if isinstance(options.key, TrojanLink):
        tunnel = TrojanDialer(options.key)  # a connection per stream: --pool does not apply
    else:
        tunnel = ClientTunnel(options.key, pool_size=options.pool, tls_stack=options.tls_stack,
                              session_config=options.session_config())
    inbounds: list[Socks5Inbound | HttpProxyInbound] = []
    if options.socks is not None:
        inbounds.append(Socks5Inbound(tunnel, options.socks,
                                      credentials=options.socks_credentials))
    if options.http is not None:
        inbounds.append(HttpProxyInbound(tunnel, options.http,
                                         credentials=options.http_credentials))
    started: list[Inbound] = []
    try:
        for inbound in inbounds:
            try:
                await inbound.start()
            except OSError as exc:
                raise VeilError(f"cannot listen: {exc.strerror or exc}") from exc
            started.append(inbound)
        for spec in options.forwards:
            try:
                started.append(await start_forward(tunnel, spec))
            except OSError as exc:
                raise VeilError(f"cannot listen for --forward {spec}: "
                                f"{exc.strerror or exc}") from exc
        tunnel.start()
        # The address actually bound, not the one asked for: with port 0 the system picks the
        # port, and this line is how a caller (or a test) learns it.
        for proxy in inbounds:
            what = "SOCKS5" if isinstance(proxy, Socks5Inbound) else "HTTP"
            log.warning("%s proxy on %s", what, proxy.address)
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
        for running in started:
            await running.close()
        await tunnel.close()


async def _run_tun(options: ClientOptions, stop: asyncio.Event) -> None:
    if sys.platform == "linux":
        from veil.client.tun import TunClientOptions, run_tun  # noqa: PLC0415
    else:
        from veil.client.tun_unsupported import TunClientOptions, run_tun  # noqa: PLC0415

    if not isinstance(options.key, AccessKey):
        raise ConfigError("--tun needs a veil:// key (Trojan has no IP tunnel)")
    if options.socks or options.http or options.forwards:
        raise ConfigError("--tun replaces --socks, --http and --forward: use one or the other")
    await run_tun(options.key, TunClientOptions.parse(options.tun_exclude), stop,
                  tls_stack=options.tls_stack, session_config=options.session_config())


def tun_cleanup(exclude: tuple[str, ...] = ()) -> bool:
    """Undo what a ``--tun`` client that did not exit cleanly left in this network namespace;
    False when it left nothing."""
    if sys.platform == "linux":
        from veil.client.tun import TunClientOptions, cleanup  # noqa: PLC0415
    else:
        from veil.client.tun_unsupported import TunClientOptions, cleanup  # noqa: PLC0415

    return cleanup(TunClientOptions.parse(exclude))
