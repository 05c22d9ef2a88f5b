"""TLS over an asyncio TCP transport, with OpenSSL's record layer driven through memory BIOs.

Why not the event loop's own TLS (``loop.create_connection(ssl=...)``)? Both asyncio's and
uvloop's drop whatever OpenSSL queued when a handshake fails — the alert a real web server
sends back to a malformed ClientHello — and a prober can tell a server that never answers
from nginx, which does. Here every byte OpenSSL produces is written before the connection
closes. It also keeps the hot path lean: ciphertext is read into one reusable buffer, and
records are decrypted into another and handed on in batches.

The carrier knows nothing of what it carries. :func:`start_tls_server` and
:func:`open_tls_connection` return once the handshake is complete; the application protocol
then sees an ordinary :class:`asyncio.Transport` offering ``get_extra_info("tls_unique")``
and ``("peer_certificate_der")``. A protocol with ``accepts_views = True`` gets
``data_received(memoryview)`` over the carrier's buffer, valid only during the call.
``close()`` sends close_notify and closes the TCP connection once it is written, without
waiting for the peer's close_notify (as nginx and browsers do).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, cast

from veil.errors import TransportError
from veil.transport.carrier import (
    NOT_MINE,
    CarrierProtocol,
    CarrierTransport,
    ReadHold,
    finish_handshake,
)
from veil.transport.ratelimit import Limiter
from veil.transport.tcp import CLIENT_KEEPALIVE, set_keepalive

# One SSL read returns at most one record's plaintext (16 KiB). Records are decrypted into one
# reusable buffer and handed on in batches of up to _BATCH bytes: no allocation per record,
# and one call (often one send() syscall downstream) per batch instead of per record.
_RECORD = 16 * 1024
_BATCH = 256 * 1024
# The socket is read into one reusable buffer too; OpenSSL copies it into its BIO at once.
_CIPHER_READ = 256 * 1024
# Where every connection starts (see _TlsCarrier.__init__); one full read or batch grows it.
_SMALL_READ = 16 * 1024
_SMALL_BATCH = 16 * 1024
_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


# Until a connection moves bulk data it reads into one buffer shared by every connection of
# its thread: buffer_updated() copies each read into OpenSSL's BIO before anything else runs,
# so the bytes never outlive the call. A server holding thousands of silent or probing
# connections then holds no read buffer for them (16 KiB each before).
_shared = threading.local()


def _shared_small_read() -> memoryview:
    buffer: memoryview | None = getattr(_shared, "cipher", None)
    if buffer is None:
        buffer = _shared.cipher = memoryview(bytearray(_SMALL_READ))
    return buffer


class TlsHandshakeError(TransportError, ConnectionError):
    """The TLS handshake failed; whatever OpenSSL had to say was sent to the peer first.

    Also a ``ConnectionError``: the dialers and the gate catch a failed connect as an
    ``OSError``, and a handshake that fails is one.
    """

    code = "tls_handshake"


class _TlsCarrier(CarrierProtocol):
    """The protocol on the TCP transport: feeds OpenSSL and relays to the app protocol."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None,
                 app_factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                       server_hostname=server_hostname)
        self._app_factory = app_factory
        self.app: asyncio.Protocol | None = None
        self.raw: asyncio.Transport | None = None
        self.app_transport: TlsTransport | None = None
        self.handshake: asyncio.Future[TlsTransport] = asyncio.get_running_loop().create_future()
        # None until needed, then small until the connection moves bulk data: a server holds
        # thousands of idle or probing connections, and 512 KiB each would be most of its
        # memory. The plaintext buffer waits for the first application record (a connection
        # silent after its handshake never gets one); the ciphertext one for bulk data.
        self._plain: memoryview | None = None
        self._cipher: memoryview | None = None
        self.closing = False
        self._app_eof = False
        # Application bytes in each direction, read by the server's usage accounting
        # (extra info "byte_counts"); two integer adds per batch is all they cost.
        self.bytes_received = 0
        self.bytes_sent = 0
        # Optional rate limits (server: a user's buckets, shared by the user's connections).
        # Reading pauses while anything holds it (ReadHold: the app, the limiter, unsent
        # output); the app's sources pause while either the socket is congested or the
        # limiter says so.
        self.read_limit: Limiter | None = None
        self.write_limit: Limiter | None = None
        self._congested = False
        self._write_throttled = False
    # ------------------------------------------------------------------ TCP side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        self._handshake_step()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._cipher if self._cipher is not None else _shared_small_read()

    def buffer_updated(self, nbytes: int) -> None:
        if self.read_limit is not None:
            wait = self.read_limit.take(nbytes)
            if wait > 0 and not self._read_holds & ReadHold.THROTTLE:
                self._throttle_read(wait)
        cipher = self._cipher if self._cipher is not None else _shared_small_read()
        self._incoming.write(cipher[:nbytes])
        self._take_turns(nbytes, len(cipher))
        if nbytes == len(cipher) < _CIPHER_READ:
            self._cipher = memoryview(bytearray(_CIPHER_READ))  # a full read: bulk data
        if self.app is None:
            self._handshake_step()
            if self.app is None:
                return
        self._read_records()

    def eof_received(self) -> bool:
        if self.app is None:
            self._fail_handshake(TlsHandshakeError("peer closed during the TLS handshake"))
            return False
        if not self._app_eof:
            self._app_eof = True
            # A FIN without close_notify (a "ragged" EOF): report it as an EOF all the same.
            keep_open = self.app.eof_received()
            return bool(keep_open)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.app is None:
            error = TlsHandshakeError(f"connection lost during handshake: {exc}")
            error.__cause__ = exc  # a reset says more than its text: the client classifies it
            self._fail_handshake(error)
            return
        app, self.app = self.app, None
        app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._congested = True
        if self.app is not None and not self._write_throttled:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        self._congested = False
        self._unsent_drained()
        if self.app is not None and not self._write_throttled:
            self.app.resume_writing()

    # ------------------------------------------------------------------ rate limits
    def _throttle_read(self, wait: float) -> None:
        self.hold_reading(ReadHold.THROTTLE)
        asyncio.get_running_loop().call_later(wait, self._end_read_throttle)

    def _end_read_throttle(self) -> None:
        # Bytes that were already on their way while paused count too: wait off that debt.
        if self.read_limit is not None and (wait := self.read_limit.take(0)) > 0:
            asyncio.get_running_loop().call_later(wait, self._end_read_throttle)
            return
        self.release_reading(ReadHold.THROTTLE)

    def _throttle_write(self, wait: float) -> None:
        self._write_throttled = True
        if self.app is not None and not self._congested:
            self.app.pause_writing()
        asyncio.get_running_loop().call_later(wait, self._end_write_throttle)

    def _end_write_throttle(self) -> None:
        if self.write_limit is not None and (wait := self.write_limit.take(0)) > 0:
            asyncio.get_running_loop().call_later(wait, self._end_write_throttle)
            return
        self._write_throttled = False
        if self.app is not None and not self._congested:
            self.app.resume_writing()

    # ------------------------------------------------------------------ TLS
    def _flush(self) -> None:
        if self._outgoing.pending and self.raw is not None:
            self._write_raw(self._outgoing.read())

    def _handshake_step(self) -> None:
        try:
            self.sslobj.do_handshake()
        except _AGAIN:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError) as exc:
            # Send the alert OpenSSL queued (as nginx does), then close.
            self._flush()
            self._fail_handshake(TlsHandshakeError(f"TLS handshake failed: {exc}"))
            if self.raw is not None:
                self.raw.close()
            return
        self._flush()
        assert self.raw is not None
        self.app_transport = TlsTransport(self)
        app = self._app_factory()
        self.app = cast(asyncio.Protocol, app)
        if not self.handshake.done():
            self.handshake.set_result(self.app_transport)
        self.app.connection_made(self.app_transport)
        if self._incoming.pending:
            self._read_records()

    def _read_records(self) -> None:
        sslobj, plain = self.sslobj, self._plain
        if plain is None:
            if not self._incoming.pending and not sslobj.pending():
                # Nothing to decrypt (the read that ended the handshake ended with the peer's
                # Finished): let OpenSSL write what follows a handshake (session tickets)
                # without a buffer for records that are not there.
                with contextlib.suppress(ssl.SSLError):
                    sslobj.read(1)
                self._flush()
                return
            plain = self._plain = memoryview(bytearray(_SMALL_BATCH + _RECORD))
        filled = 0
        eof = False
        while True:
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                count = cast(int, sslobj.read(_RECORD, plain[filled : filled + _RECORD]))
            except _AGAIN:
                break
            except ssl.SSLZeroReturnError:  # close_notify
                eof = True
                break
            except ssl.SSLError:
                self._flush()  # the alert, if OpenSSL made one
                if self.raw is not None:
                    self.raw.close()
                self.closing = True
                break
            if not count:
                # With a buffer, read() reports the peer's close_notify as 0, not as
                # SSLZeroReturnError: it is an EOF all the same.
                eof = True
                break
            filled += count
            if filled + _RECORD > len(plain):
                if len(plain) < _BATCH + _RECORD:
                    # Bulk data: deliver what we have, then batch in the big buffer.
                    self._deliver(filled)
                    filled = 0
                    plain = self._plain = memoryview(bytearray(_BATCH + _RECORD))
                    continue
                self._deliver(filled)
                filled = 0
        if filled:
            self._deliver(filled)
        if eof and not self._app_eof and self.app is not None:
            self._app_eof = True
            self._flush()
            if not self.app.eof_received():
                self.close()
        self._flush()  # post-handshake messages (tickets, key updates)

    def _deliver(self, filled: int) -> None:
        app = self.app
        if app is None or self.closing:
            return
        self.bytes_received += filled
        assert self._plain is not None  # filled by _read_records
        view = self._plain[:filled]
        # A protocol that promises not to keep the buffer past the call gets it as it is.
        app.data_received(view if getattr(app, "accepts_views", False)  # type: ignore[arg-type]
                          else bytes(view))

    # ------------------------------------------------------------------ app side
    def set_app(self, protocol: asyncio.Protocol) -> None:
        self.app = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.raw is None or self._writing_ended:
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError:
            self.raw.abort()
            return
        self.bytes_sent += len(data)
        if self.write_limit is not None:
            wait = self.write_limit.take(len(data))
            if wait > 0 and not self._write_throttled:
                self._throttle_write(wait)
        self._write_raw(self._outgoing.read())

    def _close_notify(self) -> None:
        # unwrap() queues our close_notify, then says "want read": we do not wait for the
        # peer's close_notify.
        with contextlib.suppress(ssl.SSLError, ValueError, OSError):
            self.sslobj.unwrap()


class TlsTransport(CarrierTransport):
    """The application's view of a TLS connection."""

    _carrier: _TlsCarrier

    def set_rate_limits(self, read: Limiter | None, write: Limiter | None) -> None:
        """Hold this connection to these buckets (shared with other connections, or None)."""
        self._carrier.read_limit, self._carrier.write_limit = read, write

    def _own_info(self, name: str) -> Any:
        # "tls_unique" and "peer_certificate_der" are what veil's layers ask for; every TLS
        # carrier here provides them under these names.
        sslobj = self._carrier.sslobj
        if name == "tls_unique":
            return sslobj.get_channel_binding("tls-unique")
        if name == "peer_certificate_der":
            return sslobj.getpeercert(binary_form=True)
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return sslobj.context
        if name == "peercert":
            return sslobj.getpeercert()
        if name == "cipher":
            return sslobj.cipher()
        if name == "byte_counts":
            return (self._carrier.bytes_received, self._carrier.bytes_sent)
        return NOT_MINE


async def start_tls_server(sock: socket.socket, context: ssl.SSLContext,
                           app_factory: Callable[[], asyncio.BaseProtocol],
                           handshake_timeout: float) -> TlsTransport:
    """Run the server side of a handshake on an accepted socket; raise on failure."""
    loop = asyncio.get_running_loop()
    carrier = _TlsCarrier(context, server_side=True, server_hostname=None,
                          app_factory=app_factory)
    raw, _ = await loop.connect_accepted_socket(lambda: carrier, sock)
    return await finish_handshake(raw, carrier.handshake, handshake_timeout)


async def open_tls_connection(host: str, port: int, context: ssl.SSLContext,
                              app_factory: Callable[[], asyncio.BaseProtocol], *,
                              server_hostname: str | None, handshake_timeout: float,
                              ) -> TlsTransport:
    """Connect and run the client side of a handshake; raise on failure."""
    loop = asyncio.get_running_loop()
    carrier = _TlsCarrier(context, server_side=False, server_hostname=server_hostname or None,
                          app_factory=app_factory)
    raw, _ = await loop.create_connection(lambda: carrier, host, port)
    set_keepalive(raw.get_extra_info("socket"), CLIENT_KEEPALIVE)
    return await finish_handshake(raw, carrier.handshake, handshake_timeout)
