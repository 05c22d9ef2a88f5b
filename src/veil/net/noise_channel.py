"""veil's session over a carrier that others can read (the CDN path): Noise NK around it.

On the direct way in, TLS is veil's own: the client pins the server's certificate and binds
its authenticator to the TLS connection (``tls_unique``). Through a CDN, TLS ends at the CDN,
which sees whatever the carrier (``veil.transport.cdn``) carries. So the session rides inside
Noise NK (``veil.protocol.noise``): the client knows the server's static key from its access
key, so only the server can read the first message, and the server proves itself by
answering. The first message's payload is veil's ordinary authenticator (``protocol.auth``),
bound to the client's ephemeral key instead of ``tls_unique``: one seen before is refused by
the server's replay filter, and it cannot be moved to another handshake.

:class:`SealedTransport` is what the session driver then sees: an ``asyncio.Transport``
whose ``write`` seals and whose protocol receives opened plaintext, with flow control,
close and abort passed through to the carrier.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from veil.errors import AuthError, TransportError
from veil.protocol.noise import (
    FrameDecoder,
    NoiseError,
    NoiseInitiator,
    NoiseResponder,
    NoiseStreamReader,
    NoiseStreamWriter,
    NoiseTransport,
    frame,
)

#: Bound into every handshake (Noise's prologue): a handshake meant for anything else, or
#: for another version of this channel, fails.
PROLOGUE = b"veil/1 cdn"
#: Bytes a responder takes before the client's first message is whole: that message is the
#: ephemeral key, the authenticator and their tags (under 200 bytes); anything far larger
#: is not a veil client.
MAX_REQUEST_BYTES = 4096


class SealedTransport(asyncio.Transport):
    """The session's view of the channel: plaintext in and out, Noise on the carrier."""

    def __init__(self, carrier: asyncio.Transport, noise: NoiseTransport,
                 decoder: FrameDecoder) -> None:
        super().__init__({"noise_handshake_hash": noise.handshake_hash})
        self._carrier = carrier
        self._noise = noise
        self._writer = NoiseStreamWriter(noise)
        self._reader = NoiseStreamReader(noise, decoder)
        self._protocol: asyncio.Protocol | None = None
        # Plaintext that came before the protocol took over (see release).
        self._pending: list[bytes] = []
        # The session's bytes each way, as the TLS way in counts them ("byte_counts": the
        # user's usage and quota).
        self._received = 0
        self._sent = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "byte_counts":
            return (self._received, self._sent)
        mine = super().get_extra_info(name, None)
        return mine if mine is not None else self._carrier.get_extra_info(name, default)

    # -------------------------------------------------------------- asyncio.Transport
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._carrier.is_closing():
            self._sent += len(data)
            self._carrier.write(self._writer.encode(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("the channel cannot half-close")

    def is_closing(self) -> bool:
        return self._carrier.is_closing()

    def close(self) -> None:
        self._carrier.close()

    def abort(self) -> None:
        self._carrier.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    @property
    def protocol(self) -> asyncio.Protocol | None:
        return self._protocol

    def is_reading(self) -> bool:
        return self._carrier.is_reading()

    def pause_reading(self) -> None:
        self._carrier.pause_reading()

    def resume_reading(self) -> None:
        self._carrier.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._carrier.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._carrier.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        # A CDN carrier's bounds are fixed (its uplink's or downlink's high water mark,
        # veil.transport.cdn): a session that asks for more buffering (a full-device tunnel's
        # IP stream, either end) keeps the carrier's instead of failing.
        with contextlib.suppress(NotImplementedError):
            self._carrier.set_write_buffer_limits(high, low)

    def release(self) -> None:
        """The protocol has been told of the connection: hand it what came before."""
        pending, self._pending = self._pending, []
        for plaintext in pending:
            self._hand_up(plaintext)

    # -------------------------------------------------------------- from the carrier
    def open_messages(self, messages: list[bytes]) -> None:
        """Whole messages that came with the handshake's last one."""
        try:
            plaintexts = [self._noise.open(message) for message in messages]
        except NoiseError:
            self._carrier.abort()
            return
        for plaintext in plaintexts:
            self._hand_up(plaintext)

    def carrier_data(self, data: bytes) -> None:
        """Open what arrived and hand it up; a forged or damaged message cuts the channel."""
        try:
            plaintexts = self._reader.feed(data)
        except NoiseError:
            self._carrier.abort()
            return
        for plaintext in plaintexts:
            self._hand_up(plaintext)

    def _hand_up(self, plaintext: bytes) -> None:
        if self._carrier.is_closing() or not plaintext:
            return
        self._received += len(plaintext)
        if self._protocol is None:
            self._pending.append(plaintext)
        else:
            self._protocol.data_received(plaintext)


class _Channel(asyncio.Protocol):
    """The carrier's protocol: the handshake first, then a pipe to the sealed transport's."""

    def __init__(self) -> None:
        self.carrier: asyncio.Transport | None = None
        self.sealed: SealedTransport | None = None
        self.decoder = FrameDecoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.carrier = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.sealed is not None:
            self.sealed.carrier_data(data)
        else:
            self.handshake_data(data)

    def handshake_data(self, data: bytes) -> None:
        raise NotImplementedError

    def _app(self) -> asyncio.Protocol | None:
        return None if self.sealed is None else self.sealed.protocol

    def eof_received(self) -> bool | None:
        app = self._app()
        return app.eof_received() if app is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        app = self._app()
        if app is not None:
            app.connection_lost(exc)
        else:
            self.handshake_lost(exc)

    def handshake_lost(self, exc: Exception | None) -> None:
        pass

    def pause_writing(self) -> None:
        if (app := self._app()) is not None:
            app.pause_writing()

    def resume_writing(self) -> None:
        if (app := self._app()) is not None:
            app.resume_writing()


#: The server's decision on a handshake's authenticator (its payload, and the client's
#: ephemeral key as the binding): a callable that takes the sealed transport over (sets its
#: protocol, then calls its ``release``), or why the key is refused, which the answer
#: carries inside Noise (only the holder of the server's key could have written it, and only
#: whoever knows that key, a key holder, can have asked).
OnRequest = Callable[[bytes, bytes], "Callable[[SealedTransport], None] | str"]
#: AuthError's code when the server answered that it refuses the key.
KEY_REFUSED = "key_refused"
#: How a refusal's answer payload starts; the reason follows.
REFUSED = b"refused "


class NoiseServerChannel(_Channel):
    """The server's end: reads the client's first message, asks ``on_request`` (the
    authenticator, bound to the client's ephemeral key) and answers, or cuts the carrier."""

    def __init__(self, static_private: bytes, on_request: OnRequest) -> None:
        super().__init__()
        self._responder = NoiseResponder(static_private, PROLOGUE)
        self._on_request = on_request

    def handshake_data(self, data: bytes) -> None:
        carrier = self.carrier
        assert carrier is not None
        try:
            messages = self.decoder.feed(data)
        except NoiseError:
            carrier.abort()
            return
        if not messages:
            if self.decoder.buffered > MAX_REQUEST_BYTES:
                carrier.abort()
            return
        request, *early = messages
        try:
            payload = self._responder.read_request(request)
        except NoiseError:
            carrier.abort()  # not for this server's key, or not Noise at all
            return
        accept = self._on_request(payload, self._responder.remote_ephemeral)
        if isinstance(accept, str):
            answer, _ = self._responder.write_response(REFUSED + accept.encode()[:64])
            carrier.write(frame(answer))
            carrier.close()
            return
        answer, noise = self._responder.write_response()
        carrier.write(frame(answer))
        sealed = SealedTransport(carrier, noise, self.decoder)
        self.sealed = sealed
        sealed.open_messages(early)
        accept(sealed)


class NoiseClientChannel(_Channel):
    """The client's end: sends the first message with ``authenticator(binding)`` as its
    payload once the carrier is up; :attr:`ready` resolves to the sealed transport when the
    server's answer proves it holds the key the access key names."""

    def __init__(self, server_public: bytes, authenticator: Callable[[bytes], bytes]) -> None:
        super().__init__()
        self._initiator = NoiseInitiator(server_public, PROLOGUE)
        self._authenticator = authenticator
        self.ready: asyncio.Future[SealedTransport] = (
            asyncio.get_running_loop().create_future())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        payload = self._authenticator(self._initiator.ephemeral_public)
        self.carrier.write(frame(self._initiator.write_request(payload)))  # type: ignore[union-attr]

    def handshake_data(self, data: bytes) -> None:
        carrier = self.carrier
        assert carrier is not None
        try:
            messages = self.decoder.feed(data)
            if not messages:
                return
            answer, *early = messages
            payload, noise = self._initiator.read_response(answer)
        except NoiseError as exc:
            carrier.abort()
            self._fail(TransportError(f"the server behind the CDN is not the one the access "
                                      f"key names ({exc})"))
            return
        if payload.startswith(REFUSED):
            carrier.close()
            reason = payload[len(REFUSED):].decode("ascii", "replace")
            self._fail(AuthError(f"the server refused the key ({reason}: revoked, expired or "
                                 "over its limit, or this clock is off by minutes)",
                                 code=KEY_REFUSED))
            return
        sealed = SealedTransport(carrier, noise, self.decoder)
        self.sealed = sealed
        sealed.open_messages(early)
        if not self.ready.done():
            self.ready.set_result(sealed)

    def handshake_lost(self, exc: Exception | None) -> None:
        self._fail(TransportError(f"the CDN path closed during the Noise handshake"
                                  f"{f' ({exc})' if exc else ''}: a server that does not hold "
                                  "the key's nk, or a cut path"))

    def _fail(self, error: TransportError | AuthError) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
