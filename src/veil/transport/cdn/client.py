"""The client's side: reach ``https://CDNHOST[:PORT]/SECRET/`` and get a byte stream.

:func:`open_carrier` connects with veil's browser-shaped TLS client, checks the CDN's
certificate against the web PKI (the system's CA bundle) or ``ca_file``, and speaks:

- ``websocket``: HTTP/1.1 (h11) on one connection whose ClientHello offers ALPN
  ``http/1.1`` only and no ALPS, as Chrome opens a WebSocket (RFC 8441's WebSocket over
  h2 is rare at CDNs, and nginx 1.22 lacks it): ``GET /SECRET/`` with an upgrade, then
  binary messages;
- ``packet-up``: Chrome's own ClientHello (ALPN ``h2``, ``http/1.1``, ALPS for h2), as the
  direct way sends it. A ``GET /SECRET/<session>`` whose response carries the server's
  bytes, and ``POST /SECRET/<session>/<seq>`` packets of up to MAX_POST_BYTES for the
  client's, at most MAX_POSTS_IN_FLIGHT unanswered (a CDN that buffers request bodies
  passes this, where it would hold a streaming upload). When the CDN picks h2, the GET and
  the POSTs are streams of one connection shaped as Chrome's (:mod:`.h2client`); when it
  picks HTTP/1.1, the GET has its connection and the POSTs kept-alive ones of their own.

The CDN's certificate says nothing about veil's server: whoever runs the CDN sees the bytes.
The layer above must authenticate the server and encrypt end to end (Noise, issue #16).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import ipaddress
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h11
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from veil.errors import TransportError
from veil.transport.browser_tls import BrowserTlsTransport, open_browser_tls_connection
from veil.transport.cdn import wire
from veil.transport.cdn.h2client import H2Connection, H2Stream, StreamUnprocessed
from veil.transport.cdn.stream import ByteStream
from veil.transport.cdn.websocket import WebSocketStream
from veil.transport.tls13 import CHROME, ClientHelloSpec
from veil.transport.tls13.wire import ExtensionType

#: Chrome's ClientHello for a connection that will carry a WebSocket: ALPN http/1.1 only
#: and, with no h2 offered, no ALPS.
CHROME_HTTP1 = dataclasses.replace(
    CHROME, name="chrome-156-http1", alpn=(b"http/1.1",), alps_protocols=(),
    shuffled=tuple(e for e in CHROME.shuffled
                   if e not in (ExtensionType.APPLICATION_SETTINGS,
                                ExtensionType.APPLICATION_SETTINGS_OLD)))

#: TCP connect + TLS handshake + the first answer (101, or the downlink's 200): a CDN adds
#: a round trip to the origin; past this the way in is as good as blocked.
DEFAULT_OPEN_TIMEOUT_S = 15.0
#: How long one uplink POST may wait for its 200 (a CDN gives up on origins after 100 s).
POST_TIMEOUT_S = 100.0
#: Client bytes buffered before the protocol is told to pause (four packets in flight and
#: as much again waiting).
UPLINK_HIGH_WATER = 2 * wire.MAX_POSTS_IN_FLIGHT * wire.MAX_POST_BYTES
#: Times one uplink packet is sent again after the CDN left its h2 stream unprocessed (a
#: GOAWAY that crossed it, a REFUSED_STREAM): each retry goes on a fresh connection, so a
#: CDN that refuses that often is refusing the carrier.
MAX_UNPROCESSED_RETRIES = 3
#: A response head larger than this is not the carrier's (h11's bound on what it buffers).
MAX_RESPONSE_HEAD = 16 * 1024
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_USER_AGENT = (b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
               b"Chrome/156.0.0.0 Safari/537.36")


@dataclass(frozen=True, slots=True)
class CarrierUrl:
    """``https://HOST[:PORT]/PATH/``: what the client dials and asks for."""

    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> CarrierUrl:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise TransportError(f"a carrier URL is https://HOST[:PORT]/PATH/, not {url!r}")
        try:
            port = parts.port or 443
        except ValueError as exc:
            raise TransportError(f"bad port in {url!r}") from exc
        wire.check_secret_path(parts.path)
        return cls(parts.hostname, port, parts.path)

    @property
    def authority(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == 443 else f"{host}:{self.port}").encode("idna")


def verify_certificate(chain: tuple[bytes, ...], host: str, ca_file: str | None, *,
                       party: str = "the CDN") -> None:
    """``party``'s chain must lead to a trusted root for ``host`` (the system's bundle unless
    ``ca_file``); raises TransportError."""
    bundle = ca_file or ssl.get_default_verify_paths().cafile
    if not bundle:
        raise TransportError(f"no CA bundle to check {party}'s certificate with: pass ca_file")
    try:
        roots = x509.load_pem_x509_certificates(Path(bundle).read_bytes())
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot check {party}'s certificate: {exc}") from exc
    if not certs:
        raise TransportError(f"{party} sent no certificate")
    try:
        name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        name = x509.DNSName(host)
    verifier = PolicyBuilder().store(Store(roots)).build_server_verifier(name)  # type: ignore[arg-type]
    try:
        verifier.verify(certs[0], certs[1:])
    except VerificationError as exc:
        raise TransportError(f"{party}'s certificate for {host} does not verify: {exc}") from exc


class _Http(asyncio.Protocol):
    """One HTTP/1.1 client connection (h11) over the TLS transport; events wait in a queue
    until ``on_body`` takes the response body over (the downlink)."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.transport: BrowserTlsTransport | None = None
        self.events: asyncio.Queue[h11.Event | BaseException] = asyncio.Queue()
        self.on_body: Callable[[h11.Event | BaseException], None] | None = None
        # The downlink's body, read by wire.ChunkedReader instead of h11 (see
        # stream_chunked_body); ``_head`` holds the response head until it is whole.
        self._chunked_body = False
        self._head = b""
        self._chunks: wire.ChunkedReader | None = None
        self._body_is_chunked = False

    def stream_chunked_body(self) -> None:
        """The next response's chunked body is read by wire.ChunkedReader, one Data event
        per read instead of h11's one per chunk (the downlink's hot path); h11 still reads
        its head, and any other body."""
        self._chunked_body = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._chunks is not None:
            if not self._chunks.failed:
                self._chunk_data(bytes(data))
            return
        if self._chunked_body:
            self._head_data(bytes(data))
            return
        self._h11_data(bytes(data))

    def _h11_data(self, data: bytes) -> None:
        try:
            self.h11.receive_data(data)
        except h11.RemoteProtocolError as exc:
            self._put(TransportError(f"the CDN's answer is not HTTP/1.1: {exc}"))
            return
        self._pump()

    def _head_data(self, data: bytes) -> None:
        """Up to the end of a response head: h11 reads each head (1xx ones too); after a 200
        with a chunked body, the rest goes to the ChunkedReader."""
        data = self._head + data
        while (end := data.find(b"\r\n\r\n")) >= 0:
            head, data = data[:end + 4], data[end + 4:]
            self._head = b""
            self._h11_data(head)
            state = self.h11.their_state
            if state is h11.SEND_BODY:
                self._chunked_body = False
                if self._body_is_chunked:
                    self._chunks = wire.ChunkedReader()
                    self._chunk_data(data)
                else:
                    self._h11_data(data)
                return
            if state is not h11.SEND_RESPONSE:  # an error, or a body-less final answer
                self._chunked_body = False
                self._h11_data(data)
                return
        if len(data) > MAX_RESPONSE_HEAD:
            self._chunked_body = False
            self._put(TransportError("the CDN's answer is not HTTP/1.1: its head is too long"))
            return
        self._head = data

    def _chunk_data(self, data: bytes) -> None:
        assert self._chunks is not None
        try:
            body = self._chunks.feed(data)
        except TransportError as exc:
            self._put(exc)  # the downlink ends; what follows is not read
            return
        if body:
            self._put(h11.Data(data=body))
        if self._chunks.done:
            self._put(h11.EndOfMessage())

    def _pump(self) -> None:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._put(TransportError(f"the CDN's answer is not HTTP/1.1: {exc}"))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            self._put(event)  # type: ignore[arg-type]

    def _put(self, item: h11.Event | BaseException) -> None:
        if isinstance(item, h11.Response) and self._chunked_body:
            self._body_is_chunked = item.status_code == 200 and any(
                name == b"transfer-encoding" and value.lower() == b"chunked"
                for name, value in item.headers)
        if self.on_body is not None:
            self.on_body(item)
        else:
            self.events.put_nowait(item)

    def eof_received(self) -> bool:
        if self._chunks is not None:
            if not self._chunks.done and not self._chunks.failed:
                self._chunks.failed = True
                self._put(TransportError("the CDN closed the downlink inside its body"))
            return False
        self.h11.receive_data(b"")
        self._pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._put(exc or ConnectionResetError("the CDN closed the connection"))

    def send(self, *events: h11.Event) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(self.h11.send(e) or b"" for e in events))

    async def next(self) -> h11.Event:
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise TransportError(f"the carrier's connection ended: {item}") from item
        return item

    async def response(self) -> h11.Response | h11.InformationalResponse:
        while True:
            event = await self.next()
            if isinstance(event, h11.Response | h11.InformationalResponse):
                return event


class _Chosen(asyncio.Protocol):
    """The protocol for whichever HTTP the CDN picked in ALPN: h2's or HTTP/1.1's, made
    when the handshake is done and everything passed on to it."""

    def __init__(self) -> None:
        self.http: _Http | H2Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        h2 = transport.get_extra_info("alpn_protocol") == "h2"
        self.http = H2Connection() if h2 else _Http()
        self.http.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        assert self.http is not None
        self.http.data_received(data)

    def eof_received(self) -> bool | None:
        assert self.http is not None
        return self.http.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.http is not None:
            self.http.connection_lost(exc)


class _Connector:
    """Opens verified connections to one CDN URL."""

    def __init__(self, url: CarrierUrl, *, ca_file: str | None, connect_to: tuple[str, int] | None,
                 timeout: float) -> None:
        self.url, self.ca_file, self.timeout = url, ca_file, timeout
        self.address = connect_to or (url.host, url.port)

    async def connect(self, spec: ClientHelloSpec = CHROME_HTTP1) -> _Http | H2Connection:
        """A connection with ``spec``'s ClientHello; h2 if the CDN picked it from ``spec``'s
        ALPN, else HTTP/1.1."""
        chosen = _Chosen()
        host, port = self.address
        transport = await open_browser_tls_connection(
            host, port, lambda: chosen, server_hostname=self.url.host,
            handshake_timeout=self.timeout, spec=spec)
        try:
            tls = transport.get_extra_info("tls_client")
            verify_certificate(tls.peer_certificate_chain_der, self.url.host, self.ca_file)
        except BaseException:
            transport.abort()
            raise
        assert chosen.http is not None
        return chosen.http

    async def connect_http1(self) -> _Http:
        http = await self.connect()
        assert isinstance(http, _Http)  # CHROME_HTTP1 offers nothing else
        return http

    def headers(self, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        return [(b"Host", self.url.authority), *extra, (b"User-Agent", _USER_AGENT),
                (b"Accept-Encoding", b"gzip, deflate, br, zstd"),
                (b"Accept-Language", b"en-US,en;q=0.9")]

    def h2_headers(self, method: bytes, target: bytes,
                   *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        """A ``fetch``'s headers in Chrome's h2 order (pseudo-headers m,a,s,p; lower case)."""
        return [(b":method", method), (b":authority", self.url.authority),
                (b":scheme", b"https"), (b":path", target), *extra,
                (b"user-agent", _USER_AGENT), (b"accept", b"*/*"),
                (b"accept-encoding", b"gzip, deflate, br, zstd"),
                (b"accept-language", b"en-US,en;q=0.9"), (b"priority", b"u=1, i")]


async def open_carrier(url: str, protocol_factory: Callable[[], asyncio.Protocol], *,
                       variant: str = "websocket", ca_file: str | None = None,
                       connect_to: tuple[str, int] | None = None,
                       timeout: float = DEFAULT_OPEN_TIMEOUT_S) -> ByteStream:
    """A carrier stream to the veil server behind ``url``, its protocol made by
    ``protocol_factory`` (``connection_made`` is called with the stream). ``connect_to``
    dials another address than the URL's host (the name still goes into SNI and Host).
    Raises TransportError (a 404 means a wrong path, or no carrier on that server)."""
    if variant not in ("websocket", "packet-up"):
        raise TransportError(f"unknown carrier variant {variant!r}")
    connector = _Connector(CarrierUrl.parse(url), ca_file=ca_file, connect_to=connect_to,
                           timeout=timeout)
    opener = _open_websocket if variant == "websocket" else _open_packet_up
    return await asyncio.wait_for(opener(connector, protocol_factory), timeout)


async def _open_websocket(connector: _Connector,
                          protocol_factory: Callable[[], asyncio.Protocol]) -> ByteStream:
    http = await connector.connect_http1()
    assert http.transport is not None
    try:
        key = base64.b64encode(os.urandom(16))
        http.send(h11.Request(method=b"GET", target=connector.url.path.encode(),
                              headers=connector.headers(
                                  (b"Connection", b"Upgrade"), (b"Pragma", b"no-cache"),
                                  (b"Cache-Control", b"no-cache"), (b"Upgrade", b"websocket"),
                                  (b"Origin", b"https://" + connector.url.authority),
                                  (b"Sec-WebSocket-Version", b"13"),
                                  (b"Sec-WebSocket-Key", key))))
        response = await http.response()
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())  # noqa: S324 - RFC 6455
        if response.status_code != 101 or dict(response.headers).get(
                b"sec-websocket-accept") != accept:
            raise TransportError(f"the carrier path answered {response.status_code}, not a "
                                 f"WebSocket: wrong path, or no carrier behind this CDN")
    except BaseException:
        http.transport.abort()
        raise
    trailing, _closed = http.h11.trailing_data
    stream = WebSocketStream(http.transport, client=True, trailing=trailing)
    stream.start(protocol_factory())
    return stream


async def _open_packet_up(connector: _Connector,
                          protocol_factory: Callable[[], asyncio.Protocol]) -> ByteStream:
    session = wire.new_token()
    target = f"{connector.url.path}{session}".encode()
    down = await connector.connect(CHROME)
    try:
        if isinstance(down, H2Connection):
            stream = down.request(connector.h2_headers(b"GET", target,
                                                       (b"cache-control", b"no-cache")))
            status = await stream.status
        else:
            down.stream_chunked_body()
            down.send(h11.Request(method=b"GET", target=target,
                                  headers=connector.headers((b"Cache-Control", b"no-cache"))),
                      h11.EndOfMessage())
            status = (await down.response()).status_code
        if status != 200:
            raise TransportError(f"the carrier path answered {status}: wrong "
                                 f"path, or no carrier behind this CDN")
    except BaseException:
        assert down.transport is not None
        down.transport.abort()
        raise
    client = PacketUpClient(connector, session, stream if isinstance(down, H2Connection) else down)
    client.attach(protocol_factory())
    client.start()
    return client


class PacketUpClient(ByteStream):
    """packet-up's client: the downlink GET, and POSTs of what the protocol writes; over
    one h2 connection (``down`` is the GET's stream), or HTTP/1.1 connections."""

    def __init__(self, connector: _Connector, session: str, down: _Http | H2Stream) -> None:
        transport = down.connection.transport if isinstance(down, H2Stream) else down.transport
        assert transport is not None
        super().__init__("packet-up", {
            "peername": transport.get_extra_info("peername"),
            "sockname": transport.get_extra_info("sockname"),
            "http": "h2" if isinstance(down, H2Stream) else "http/1.1"})
        self.connector, self.session, self.down = connector, session, down
        self._out = bytearray()
        self._seq = 0
        self._idle: list[_Http] = []  # kept-alive HTTP/1.1 uplink connections
        self._open: set[_Http] = set()  # every HTTP/1.1 uplink connection, for close/abort
        # h2: the connection the POSTs go on (the GET's until the CDN says GOAWAY on it),
        # and every h2 connection this stream opened.
        self._h2_up = down.connection if isinstance(down, H2Stream) else None
        self._h2_all = [self._h2_up] if self._h2_up is not None else []
        self._h2_connecting: asyncio.Future[H2Connection] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._queued: list[bytes] = []  # downlink bytes received before the protocol was attached
        self._preamble = wire.PreambleReader()
        if isinstance(down, H2Stream):
            down.consume(self._down_data, self._down_end)
        else:
            down.on_body = self._down_event
            while not down.events.empty():
                self._down_event(down.events.get_nowait())

    def start(self) -> None:
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        for data in self._queued:
            self.deliver(data)
        self._queued.clear()

    # ------------------------------------------------------------------ downlink
    def _down_event(self, event: h11.Event | BaseException) -> None:
        if isinstance(event, h11.Data):
            self._down_data(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            self._down_end(None)  # the server closed the stream
        elif isinstance(event, BaseException):
            self._down_end(event)

    def _down_data(self, data: bytes) -> None:
        try:
            data = self._preamble.feed(data)
        except TransportError as exc:
            self._end(exc, abort=True)
            return
        if not data:
            return
        if self._sender is None:
            self._queued.append(data)
        else:
            self.deliver(data)

    def _down_end(self, exc: BaseException | None) -> None:
        if exc is None:
            self._end(None)
        else:
            self._end(None if self._closing else TransportError(f"downlink lost: {exc}"))

    def _hold_reading(self, hold: bool) -> None:
        if isinstance(self.down, H2Stream):
            self.down.hold(hold)  # flow control stops the GET; the POSTs' answers go on
            return
        assert self.down.transport is not None
        if hold:
            self.down.transport.pause_reading()
        else:
            self.down.transport.resume_reading()

    # ------------------------------------------------------------------ uplink
    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return UPLINK_HIGH_WATER // 2, UPLINK_HIGH_WATER

    def _send(self, data: bytes) -> None:
        self._out += data
        self._wake.set()
        if len(self._out) > UPLINK_HIGH_WATER:
            self.output_full()

    async def _send_loop(self) -> None:
        try:
            while True:
                while self._out and len(self._in_flight) < wire.MAX_POSTS_IN_FLIGHT:
                    packet = bytes(self._out[:wire.MAX_POST_BYTES])
                    del self._out[:wire.MAX_POST_BYTES]
                    task = asyncio.get_running_loop().create_task(self._post(self._seq, packet))
                    self._seq += 1
                    self._in_flight.add(task)
                    task.add_done_callback(self._posted)
                if len(self._out) <= UPLINK_HIGH_WATER // 2:
                    self.output_drained()
                if self._closing and not self._out and not self._in_flight:
                    break
                self._wake.clear()
                await self._wake.wait()
        except asyncio.CancelledError:
            return
        # The server's session ends with the GET: cancel it (as Chrome aborts a fetch) and
        # close the connections.
        if isinstance(self.down, H2Stream):
            self.down.reset()
            self._end(None)  # nothing more comes on the cancelled stream
            return
        self._release_uplinks()
        if self.down.transport is not None:
            self.down.transport.close()

    def _posted(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._end(exc if isinstance(exc, Exception) else TransportError(str(exc)))

    async def _post(self, seq: int, packet: bytes) -> None:
        target = f"{self.connector.url.path}{self.session}/{seq}".encode()
        if self._h2_up is None and not self._idle:
            await self._connect_uplink()
        if self._h2_up is not None:
            await self._post_h2(seq, target, packet)
            return
        http = self._idle.pop()
        http.send(h11.Request(method=b"POST", target=target, headers=self.connector.headers(
                      (b"Content-Length", str(len(packet)).encode()),
                      (b"Content-Type", b"application/octet-stream"))),
                  h11.Data(data=packet), h11.EndOfMessage())
        response = await asyncio.wait_for(http.response(), POST_TIMEOUT_S)
        if response.status_code != 200:
            raise TransportError(f"uplink packet {seq} answered {response.status_code}")
        while not isinstance(await asyncio.wait_for(http.next(), POST_TIMEOUT_S),
                             h11.EndOfMessage):
            pass
        if http.h11.our_state is h11.DONE and http.h11.their_state is h11.DONE:
            http.h11.start_next_cycle()
            self._idle.append(http)
        else:
            self._drop(http)

    async def _post_h2(self, seq: int, target: bytes, packet: bytes) -> None:
        for attempt in range(MAX_UNPROCESSED_RETRIES + 1):
            connection = await self._h2_uplink()
            stream = connection.request(self.connector.h2_headers(
                b"POST", target, (b"content-length", str(len(packet)).encode()),
                (b"content-type", b"application/octet-stream")), packet)
            stream.consume(lambda _data: None, lambda _exc: None)  # an empty answer
            try:
                status = await asyncio.wait_for(stream.status, POST_TIMEOUT_S)
            except StreamUnprocessed:
                if attempt == MAX_UNPROCESSED_RETRIES:
                    raise
                continue  # not seen by the server: send it again
            if status != 200:
                raise TransportError(f"uplink packet {seq} answered {status}")
            await asyncio.wait_for(stream.ended, POST_TIMEOUT_S)
            return

    async def _h2_uplink(self) -> H2Connection:
        """The h2 connection for the next POST: the current one, or, once the CDN said
        GOAWAY on it (nginx does after 1,000 requests), a new one; the GET stays where it
        is. A CDN that answers the new one in HTTP/1.1 ends the carrier."""
        assert self._h2_up is not None
        if self._h2_up.usable:
            return self._h2_up
        if self._h2_connecting is None:
            self._h2_connecting = asyncio.get_running_loop().create_future()
            try:
                fresh = await self.connector.connect(CHROME)
                if not isinstance(fresh, H2Connection):
                    assert fresh.transport is not None
                    fresh.transport.abort()
                    raise TransportError("the CDN stopped offering h2 during a session")
                self._h2_all.append(fresh)
                self._h2_up = fresh
                self._h2_connecting.set_result(fresh)
            except BaseException as exc:
                self._h2_connecting.set_exception(exc)
                self._h2_connecting.exception()  # retrieved: the waiters re-raise it
                raise
            finally:
                self._h2_connecting = None
            return fresh
        return await asyncio.shield(self._h2_connecting)

    async def _connect_uplink(self) -> None:
        """One more uplink connection, with the GET's ClientHello (a browser sends one
        ClientHello to a site): kept-alive HTTP/1.1, or, should the CDN pick h2 this time,
        the connection every later POST goes on."""
        http = await self.connector.connect(CHROME)
        if isinstance(http, H2Connection):
            self._h2_all.append(http)
            if self._h2_up is None:
                self._h2_up = http
            return
        self._open.add(http)
        self._idle.append(http)

    def _drop(self, http: _Http) -> None:
        self._open.discard(http)
        if http.transport is not None:
            http.transport.close()

    def _release_uplinks(self, abort: bool = False) -> None:
        for http in list(self._open):
            self._open.discard(http)
            if http.transport is not None:
                (http.transport.abort if abort else http.transport.close)()
        self._idle.clear()
        for connection in self._h2_all:
            (connection.abort if abort else connection.close)()

    # ------------------------------------------------------------------ ending
    def _finish(self) -> None:
        self._wake.set()  # the send loop posts what is left, then closes the GET

    def _cut(self) -> None:
        self._end(TransportError("aborted"), abort=True)

    def _end(self, exc: Exception | None, *, abort: bool = False) -> None:
        if (self._sender is not None and not self._sender.done()
                and self._sender is not asyncio.current_task()):
            self._sender.cancel()
        for task in list(self._in_flight):
            task.cancel()
        self._release_uplinks(abort=abort or exc is not None)
        if isinstance(self.down, _Http) and self.down.transport is not None:
            (self.down.transport.abort if abort or exc is not None
             else self.down.transport.close)()
        self.lost(exc)
