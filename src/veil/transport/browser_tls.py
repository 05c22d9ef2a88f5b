"""TLS 1.3 with a browser's ClientHello, over an asyncio TCP transport.

The asyncio side of :class:`veil.transport.tls13.TlsClient` (sans-IO). It has the interface of
:func:`veil.transport.tls.open_tls_connection`: :func:`open_browser_tls_connection` returns once
the handshake is complete, with an :class:`asyncio.Transport` that offers
``get_extra_info("peer_certificate_der")`` (the server's leaf certificate) and
``get_extra_info("tls_unique")`` (the client's Finished verify_data, as OpenSSL reports it for
TLS 1.3); a failed handshake raises :class:`veil.transport.tls.TlsHandshakeError` whose
``__cause__`` is the TLS error (an :class:`~veil.errors.AuthError` when the server could not
prove it holds its certificate's key).

The read path: the socket is read into one reusable 256 KiB buffer, the client decrypts every
complete record in it into its plaintext buffer, and each run of application data reaches the
protocol in one ``data_received`` call (a view, for protocols with ``accepts_views = True``).
The write path: one ``write`` becomes one buffer of full 16 KiB records sealed in place, and
one ``transport.write``. ``close()`` sends close_notify and closes once it is written,
without waiting for the server's (as browsers do).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

from veil.transport.carrier import (
    NOT_MINE,
    CarrierProtocol,
    CarrierTransport,
    finish_handshake,
)
from veil.transport.tcp import CLIENT_KEEPALIVE, set_keepalive
from veil.transport.tls import TlsHandshakeError
from veil.transport.tls13 import (
    CHROME,
    ApplicationData,
    ClientHelloSpec,
    HandshakeComplete,
    PeerClosed,
    TlsClient,
)
from veil.transport.tls13.errors import TlsAlertReceived, TlsProtocolViolation, TlsServerAuthFailure
from veil.transport.tls13.hello import HelloSealer
from veil.transport.tls13.server import TlsServer
from veil.transport.tls13.wire import CipherSuite

# The socket is read into one reusable buffer; the TLS client copies only partial records.
_CIPHER_READ = 256 * 1024
_FAILURES = (TlsAlertReceived, TlsProtocolViolation, TlsServerAuthFailure)


class _BrowserTlsCarrier(CarrierProtocol):
    """The protocol on the TCP transport: drives the TLS client, relays to the app protocol."""

    def __init__(self, tls: TlsClient | TlsServer,
                 app_factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self.tls = tls
        self._app_factory = app_factory
        self.app: asyncio.Protocol | None = None
        self.raw: asyncio.Transport | None = None
        self.app_transport: BrowserTlsTransport | None = None
        self.handshake: asyncio.Future[BrowserTlsTransport] = (
            asyncio.get_running_loop().create_future())
        # A failure after the caller stopped waiting (its timeout) is nobody's to report.
        self.handshake.add_done_callback(_retrieve)
        self._cipher = memoryview(bytearray(_CIPHER_READ))
        self._views = False
        self.closing = False
        self._app_eof = False
        self._error: Exception | None = None
        self.received = 0  # bytes from the server, for error messages

    # ------------------------------------------------------------------ TCP side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        self.tls.connect()
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._cipher

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        self._take_turns(nbytes, len(self._cipher))
        tls = self.tls
        try:
            tls.receive_data(self._cipher[:nbytes])
        except _FAILURES as exc:
            self._fail(exc)
            return
        while (event := tls.next_event()) is not None:
            if type(event) is ApplicationData:
                app = self.app
                if app is not None and not self.closing:
                    app.data_received(event.data if self._views  # type: ignore[arg-type]
                                      else bytes(event.data))
            elif type(event) is HandshakeComplete:
                self._handshake_done()
            elif type(event) is PeerClosed:
                self._peer_closed()
        self._flush()  # KeyUpdate answers

    def eof_received(self) -> bool:
        if self.app is None:
            self._fail_handshake(TlsHandshakeError(
                f"the server closed the connection during the TLS handshake, after "
                f"{self.received} bytes (truncated handshake)"))
            return False
        if not self._app_eof:
            self._app_eof = True
            # A FIN without close_notify (a "ragged" EOF): report it as an EOF all the same.
            return bool(self.app.eof_received())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.app is None:
            error = TlsHandshakeError(
                f"connection lost during the TLS handshake: {exc or 'closed'}")
            error.__cause__ = exc  # a reset says more than its text: the client classifies it
            self._fail_handshake(error)
            return
        app, self.app = self.app, None
        app.connection_lost(exc or self._error)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        self._unsent_drained()
        if self.app is not None:
            self.app.resume_writing()

    def set_app(self, protocol: asyncio.Protocol) -> None:
        self.app = protocol
        self._views = bool(getattr(protocol, "accepts_views", False))

    # ------------------------------------------------------------------ TLS
    def _flush(self) -> None:
        data = self.tls.data_to_send()
        if data and self.raw is not None:
            self._write_raw(data)

    def _handshake_done(self) -> None:
        self._flush()  # our Finished before anything the application writes
        self.app_transport = BrowserTlsTransport(self)
        self.set_app(cast(asyncio.Protocol, self._app_factory()))
        assert self.app is not None
        if not self.handshake.done():
            self.handshake.set_result(self.app_transport)
        self.app.connection_made(self.app_transport)

    def _peer_closed(self) -> None:
        if self._app_eof or self.app is None:
            return
        self._app_eof = True
        if not self.app.eof_received():
            self.close()

    def _fail(self, exc: Exception) -> None:
        self._flush()  # the alert that says why, as a browser sends it
        self._error = exc
        self.closing = True
        if self.app is None:
            error = TlsHandshakeError(f"TLS handshake failed: {exc}")
            error.__cause__ = exc
            self._fail_handshake(error)
        if self.raw is not None:
            self.raw.close()

    # ------------------------------------------------------------------ app side
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.raw is None or not data or self._writing_ended:
            return
        self._write_raw(self.tls.send(data))

    def _close_notify(self) -> None:
        self.tls.close()


def _retrieve(future: asyncio.Future[BrowserTlsTransport]) -> None:
    if not future.cancelled():
        future.exception()


class BrowserTlsTransport(CarrierTransport):
    """The application's view of the TLS connection."""

    _carrier: _BrowserTlsCarrier

    def _own_info(self, name: str) -> Any:
        tls = self._carrier.tls
        if name == "tls_unique":
            return tls.tls_unique
        if name == "peer_certificate_der":
            return tls.peer_certificate_der
        if name == "alpn_protocol":
            return tls.alpn
        if name == "cipher":
            return CipherSuite(tls.cipher_suite).name, "TLSv1.3", None
        if name == "tls_group":
            return tls.group
        if name == "tls_client" and isinstance(tls, TlsClient):
            return tls
        return NOT_MINE


async def open_browser_tls_connection(host: str, port: int,
                                      app_factory: Callable[[], asyncio.BaseProtocol], *,
                                      server_hostname: str | None, handshake_timeout: float,
                                      spec: ClientHelloSpec = CHROME,
                                      sealer: HelloSealer | None = None,
                                      ) -> BrowserTlsTransport:
    """Connect and run a TLS 1.3 handshake with ``spec``'s ClientHello; raise on failure.

    ``server_hostname`` goes into the SNI unless it is an IP literal (as in a browser).
    ``sealer``: the hello is sealed for a server with a borrowed identity, which proves itself
    by the sealed hello's secret instead of a certificate (``tls13/server.py``).
    """
    loop = asyncio.get_running_loop()
    carrier = _BrowserTlsCarrier(TlsClient(server_hostname, spec=spec, sealer=sealer),
                                 app_factory)
    raw, _ = await loop.create_connection(lambda: carrier, host, port)
    set_keepalive(raw.get_extra_info("socket"), CLIENT_KEEPALIVE)
    return await finish_handshake(raw, carrier.handshake, handshake_timeout)


async def accept_mirrored_tls(sock: socket.socket, tls: TlsServer,
                              app_factory: Callable[[], asyncio.BaseProtocol],
                              handshake_timeout: float) -> BrowserTlsTransport:
    """Run a borrowed identity's server handshake (``tls13/server.py``) on an accepted socket
    whose ClientHello ``tls`` was built from (and was consumed); raise on failure."""
    loop = asyncio.get_running_loop()
    carrier = _BrowserTlsCarrier(tls, app_factory)
    raw, _ = await loop.connect_accepted_socket(lambda: carrier, sock)
    return await finish_handshake(raw, carrier.handshake, handshake_timeout)
