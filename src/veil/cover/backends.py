"""Cover sites: what everybody without a valid key gets from the gate.

Two kinds behind one interface:

- :class:`BuiltinCover`: a small static website served by veil itself, behaving like nginx
  (see :mod:`veil.cover.http1`).
- :class:`UrlCover`: a real web server the operator runs (``--cover http://127.0.0.1:8080``
  or ``--cover https://127.0.0.1:8443``). Bytes are relayed to it untouched, so probers get
  that server's exact answers, close behaviour and timeouts. With an ``https://`` cover,
  connections that are not for the tunnel at the TLS level (plain text on the port, a foreign
  SNI) are relayed raw, so that server's own TLS stack answers them too.
"""

from __future__ import annotations

import abc
import asyncio
import socket
import ssl
import weakref
from typing import cast
from urllib.parse import urlsplit

from veil.cover.adapters import CoverProtocol, H2CoverProtocol, RequestClaim
from veil.cover.generate import SiteSeed
from veil.cover.http1 import CoverMode
from veil.cover.http2 import SERVER_PREFACE
from veil.cover.nginx import KEEPALIVE_TIMEOUT, LINGERING_TIME, LINGERING_TIMEOUT
from veil.cover.site import CoverSite
from veil.errors import ConfigError
from veil.net.direct import DirectDialer
from veil.protocol.address import Address

# nginx's client_header_timeout default.
NGINX_HEADER_TIMEOUT_S = 60.0


class Cover(abc.ABC):
    """Serves connections the gate did not accept."""

    #: ALPN protocols the server may offer for this cover (it must speak each of them).
    alpn_protocols: tuple[str, ...] = ("http/1.1",)

    #: Seconds a connection may stay silent before the cover closes it.
    header_timeout: float = NGINX_HEADER_TIMEOUT_S
    #: Whether TLS ClientHellos for other server names should be relayed raw (https covers).
    forwards_foreign_tls: bool = False

    @abc.abstractmethod
    async def serve_plain(self, sock: socket.socket, started_at: float) -> None:
        """A connection whose first byte is not TLS; nothing has been consumed from ``sock``.

        ``started_at`` (loop time) is when it was accepted: timeouts count from there.
        """

    async def serve_raw(self, sock: socket.socket) -> None:
        """A TLS connection for another name; nothing has been consumed from ``sock``."""
        sock.close()

    def greeting(self, transport: asyncio.BaseTransport) -> bytes:
        """What this site says on a fresh TLS connection before the client says anything
        (nginx's HTTP/2 SETTINGS); the gate sends it if the client stays silent briefly."""
        return b""

    @abc.abstractmethod
    def serve_tls(self, transport: asyncio.Transport, initial: bytes, started_at: float,
                  *, greeted: bool = False) -> None:
        """Take over a TLS connection whose first decrypted bytes were ``initial``.

        The gate also calls this with ``initial=b""`` when the client stayed silent for
        ``header_timeout`` after the accept, so the cover closes it its own way.
        ``greeted``: the gate already sent :meth:`greeting`.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release whatever the cover holds."""


class BuiltinCover(Cover):
    """The built-in site (:mod:`veil.cover.http1`), over HTTP/1.1 or, when the client
    negotiated it by ALPN, HTTP/2 (:mod:`veil.cover.http2`), as nginx with ``http2`` on.

    The timeouts are nginx's defaults; tests shorten them (and nginx's) to compare both.
    """

    #: ALPN protocols this cover can speak, the server's preference first.
    alpn_protocols: tuple[str, ...] = ("h2", "http/1.1")

    def __init__(self, site: CoverSite | SiteSeed | None = None, *,
                 header_timeout: float = NGINX_HEADER_TIMEOUT_S,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 lingering_timeout: float = LINGERING_TIMEOUT,
                 lingering_time: float = LINGERING_TIME,
                 claim: RequestClaim | None = None) -> None:
        # ``claim``: what may take HTTP/1.1 requests over (the CDN carrier's secret paths;
        # h2 is not offered to it: CDNs and reverse proxies reach origins over HTTP/1.1).
        self.claim = claim
        # A seed (the install's) gives its generated site; nothing gives a fresh one.
        self.site = site if isinstance(site, CoverSite) else CoverSite.builtin(site)
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.lingering_timeout = lingering_timeout
        self.lingering_time = lingering_time
        # The TLS connections served, weakly: close() cuts those still open (a proxy's idle
        # keep-alive connections, the CDN ways' carriers), as a stopping nginx does.
        self._served: weakref.WeakSet[asyncio.Transport] = weakref.WeakSet()

    def close(self) -> None:
        for transport in list(self._served):
            if not transport.is_closing():
                transport.abort()

    async def serve_plain(self, sock: socket.socket, started_at: float) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(
            lambda: CoverProtocol(self.site, mode=CoverMode.PLAIN_ON_TLS_PORT,
                                  started_at=started_at, header_timeout=self.header_timeout,
                                  keepalive_timeout=self.keepalive_timeout,
                                  lingering_timeout=self.lingering_timeout,
                                  lingering_time=self.lingering_time), sock)

    def greeting(self, transport: asyncio.BaseTransport) -> bytes:
        return SERVER_PREFACE if negotiated_alpn(transport) == "h2" else b""

    def serve_tls(self, transport: asyncio.Transport, initial: bytes, started_at: float,
                  *, greeted: bool = False) -> None:
        self._served.add(transport)
        if negotiated_alpn(transport) == "h2":
            H2CoverProtocol.take_over(
                transport, initial, self.site, started_at=started_at, preface_sent=greeted,
                header_timeout=self.header_timeout, keepalive_timeout=self.keepalive_timeout,
                lingering_timeout=self.lingering_timeout, lingering_time=self.lingering_time)
        else:
            CoverProtocol.take_over(
                transport, initial, self.site, started_at=started_at,
                header_timeout=self.header_timeout, keepalive_timeout=self.keepalive_timeout,
                lingering_timeout=self.lingering_timeout, lingering_time=self.lingering_time,
                claim=self.claim)


def negotiated_alpn(transport: asyncio.BaseTransport) -> str | None:
    """The ALPN protocol of a TLS transport (None without TLS or without ALPN)."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    return cast(str | None, sslobj.selected_alpn_protocol())


class UrlCover(Cover):
    """Relays to a real web server."""

    def __init__(self, url: str, seed: SiteSeed | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--cover must be an http:// or https:// URL, not {url!r}")
        self.tls = parts.scheme == "https"
        try:
            port = parts.port or (443 if self.tls else 80)
        except ValueError as exc:
            raise ConfigError(f"bad port in --cover {url!r}") from exc
        self.address = Address(parts.hostname, port)
        self.forwards_foreign_tls = self.tls
        self._plain = DirectDialer()
        self._builtin_plain = BuiltinCover(seed) if not self.tls else None
        if self.tls:
            # The cover is the operator's own server (often self-signed or behind a name we
            # do not present); we relay probers' bytes to it and learn nothing secret back.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["http/1.1"])
            self._tls = DirectDialer(ssl_context=context, server_hostname=parts.hostname)

    async def serve_plain(self, sock: socket.socket, started_at: float) -> None:
        if self._builtin_plain is not None:
            # An http:// cover has no TLS port of its own to show; answer as nginx would.
            await self._builtin_plain.serve_plain(sock, started_at)
        else:
            await self.serve_raw(sock)

    async def serve_raw(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        transport, hold = await loop.connect_accepted_socket(_Hold, sock)
        # uvloop may already have read (and delivered) bytes by now: they go first.
        self._plain.open_tcp(self.address, transport, b"".join(hold.early))

    def serve_tls(self, transport: asyncio.Transport, initial: bytes, started_at: float,
                  *, greeted: bool = False) -> None:
        # The real server's own timeouts start when it gets the connection: a silent prober
        # waits the gate's header timeout plus the server's (probers give up after ~10 s).
        dialer = self._tls if self.tls else self._plain
        dialer.open_tcp(self.address, transport, initial)

    def close(self) -> None:
        self._plain.close()
        if self.tls:
            self._tls.close()
        if self._builtin_plain is not None:
            self._builtin_plain.close()


class _Hold(asyncio.Protocol):
    """Keeps what arrives on a fresh transport until it is handed to a relay."""

    def __init__(self) -> None:
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).pause_reading()

    def data_received(self, data: bytes) -> None:
        self.early.append(data)


def make_cover(url: str | None, seed: SiteSeed | None = None,
               claim: RequestClaim | None = None) -> Cover:
    """The cover for ``--cover URL``, or the install's own built-in site for ``seed``;
    ``claim`` takes the requests it wants (the CDN carrier's secret paths) from the built-in
    site (a URL cover relays bytes it does not parse: it takes none)."""
    return BuiltinCover(seed, claim=claim) if url is None else UrlCover(url, seed)
