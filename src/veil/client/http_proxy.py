"""The client's HTTP proxy inbound: ``CONNECT`` tunnels and plain ``http://`` requests.

Two layers, like the SOCKS5 inbound:

* :class:`HttpProxyParser` is sans-IO. It frames one request head (bounded by
  :data:`MAX_HEAD_BYTES`), has h11 validate it, and turns it into a :class:`TunnelRequest`
  (``CONNECT host:port``) or a :class:`ForwardRequest` (an absolute-URI request rewritten to
  origin-form, ready to send upstream). Errors are :class:`~veil.errors.RemoteProtocolError`
  whose ``code`` maps to an HTTP status via :func:`error_response`. The parser never sends a
  response itself: the proxy's own responses are 200 (CONNECT) and the errors.
* :class:`HttpProxyInbound` is a thin asyncio listener that waits for the :class:`Dialer`,
  then hands the transport over with ``Dialer.open_tcp``.

Plain requests are relayed **one request per connection**: the rewritten head carries
``Connection: close``, the body bytes are relayed as they are (the upstream frames them from the
unchanged ``Content-Length``/``Transfer-Encoding``), and whatever the client sends after that
goes to the same upstream, which closes after its response. Clients see the connection close
and open a new one for the next request. ``https://`` absolute URIs are refused with 501
(clients use ``CONNECT`` for TLS).

Destinations are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import cast

import h11

from veil.client.listener import HandshakeConnection, HandshakeInbound
from veil.config import Credentials
from veil.errors import LocalProtocolError, RemoteProtocolError
from veil.net.dialer import Dialer
from veil.net.driver import TcpRelay
from veil.protocol.address import Address
from veil.protocol.frames import ResetCode

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_HEAD_BYTES",
    "MAX_TRAILING_DATA",
    "READY_TIMEOUT",
    "ForwardRequest",
    "HttpProxyInbound",
    "HttpProxyParser",
    "ProxyRequest",
    "TunnelRequest",
    "error_response",
    "forbidden_response",
]

log = logging.getLogger(__name__)

#: Largest request head (request line + headers) we buffer before knowing the destination.
#: Browsers send 1-8 KiB and big cookie jars push that to tens of KiB; common servers refuse
#: beyond 8-64 KiB anyway (nginx 32 KiB, Apache ~800 KiB but 8 KiB per line). 64 KiB lets every
#: real request through and bounds what a local client can make us hold.
MAX_HEAD_BYTES = 64 * 1024

#: Bytes after the head kept while waiting for the tunnel (a request body's first part, or a
#: TLS ClientHello pipelined after CONNECT). Reading pauses once the head is parsed, so at most
#: one socket read (256 KiB) lands here; more than this is a misbehaving client.
MAX_TRAILING_DATA = 512 * 1024

#: A client has this long from connecting to finishing its request head (idle sockets must not
#: hold a file descriptor forever).
HANDSHAKE_TIMEOUT = 30.0

#: How long a request waits for the tunnel before the client gets 502.
READY_TIMEOUT = 15.0

# Hop-by-hop headers (RFC 9110 section 7.6.1) and the non-standard Proxy-Connection. They
# describe the client-proxy connection, never the one upstream. Transfer-Encoding is not here:
# we relay the body bytes unchanged, so the upstream needs the same framing headers.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
# Never dropped, even when named in Connection: the body framing must reach the upstream.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_REG_NAME = re.compile(r"[A-Za-z0-9._~\-]+")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")

_STATUS = {
    "proxy_auth_required": (407, b"Proxy Authentication Required"),
    "head_too_large": (431, b"Request Header Fields Too Large"),
    "not_implemented": (501, b"Not Implemented"),
    "bad_gateway": (502, b"Bad Gateway"),
    "gateway_timeout": (504, b"Gateway Timeout"),
}

# Why the server reset a plain request's stream before its first response byte, as the 502
# (504) body says it; other codes (cancelled, a protocol error...) stay a bare cut.
_RESET_ANSWERS = {
    ResetCode.REFUSED_DESTINATION: ("bad_gateway", "veil: refused by the server's policy "
                                    "(a private address or a refused port)"),
    ResetCode.RESOLVE_FAILED: ("bad_gateway", "veil: the name did not resolve at the server"),
    ResetCode.CONNECT_FAILED: ("bad_gateway", "veil: the server could not connect to it"),
    # What the server says when the destination refused or could not be reached.
    ResetCode.UNREACHABLE: ("bad_gateway", "veil: the server could not connect to it "
                            "(refused or unreachable)"),
    ResetCode.TIMEOUT: ("gateway_timeout", "veil: the server's connection to it timed out"),
}


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """``CONNECT host:port``: reply 200, then relay raw bytes to ``dest``."""

    dest: Address


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """An absolute-URI request, rewritten for the origin server."""

    dest: Address
    """Where to connect (the URI's host and port, 80 by default)."""
    head: bytes
    """The origin-form request head to send first, ending with the blank line."""


ProxyRequest = TunnelRequest | ForwardRequest


def error_response(code: str, why: str = "") -> bytes:
    """The response for a refused request (by error ``code``); the connection then closes.

    ``not_implemented`` gives 501, ``head_too_large`` 431, ``bad_gateway`` 502 (tunnel not
    ready, destination refused or failed), ``gateway_timeout`` 504, anything else 400.
    ``why``, if given, is the body (one line of text).
    """
    status, reason = _STATUS.get(code, (400, b"Bad Request"))
    challenge = b'Proxy-Authenticate: Basic realm="veil"\r\n' if status == 407 else b""
    body = (why + "\n").encode() if why else b""
    kind = b"Content-Type: text/plain; charset=utf-8\r\n" if body else b""
    return (b"HTTP/1.1 %d %s\r\n%s%sContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, reason, challenge, kind, len(body), body))


def forbidden_response(reason: str) -> bytes:
    """403 with ``reason`` as a one-line plain-text body (a routing rule blocked the
    destination); the connection then closes."""
    body = reason.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + b"\n"
    return (b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code="bad_request")


class HttpProxyParser:
    """Parses the first request of a proxy connection, sans-IO.

    Call :meth:`receive_data` with each chunk until it returns a request; bytes after the head
    are then in :attr:`trailing_data`, and later chunks are added there (up to
    :data:`MAX_TRAILING_DATA`). Raises :class:`~veil.errors.RemoteProtocolError` for a request
    to refuse; answer it with ``error_response(exc.code)`` and close.

    With ``credentials``, a request must carry them in ``Proxy-Authorization: Basic``
    (RFC 9110 section 11.7.1, RFC 7617); one without them is refused with 407.
    """

    def __init__(self, credentials: Credentials | None = None) -> None:
        self._credentials = credentials
        self._buffer = bytearray()
        self._request: ProxyRequest | None = None
        self._failed = False

    @property
    def request(self) -> ProxyRequest | None:
        return self._request

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the head (empty until a request has been parsed)."""
        return bytes(self._buffer) if self._request is not None else b""

    def receive_data(self, data: bytes) -> ProxyRequest | None:
        """Consume ``data``; return the request once its head is complete, else None."""
        if self._failed:
            raise LocalProtocolError("HTTP proxy request already failed", code="closed")
        try:
            return self._receive(data)
        except RemoteProtocolError:
            self._failed = True
            self._buffer.clear()
            raise

    def _receive(self, data: bytes) -> ProxyRequest | None:
        buf = self._buffer
        if self._request is not None:
            buf += data
            if len(buf) > MAX_TRAILING_DATA:
                raise RemoteProtocolError("too much data before reply", code="overflow")
            return None
        # Search only the new bytes (plus 3 for a blank line split across chunks).
        start = max(0, len(buf) - 3)
        buf += data
        match = _BLANK_LINE.search(buf, start)
        if match is None or match.end() > MAX_HEAD_BYTES:
            if len(buf) > MAX_HEAD_BYTES:
                raise RemoteProtocolError("request head too large", code="head_too_large")
            return None
        head = bytes(buf[: match.end()])
        del buf[: match.end()]
        self._request = _parse_head(head, self._credentials)
        return self._request


def _authorized(headers: list[tuple[bytes, bytes]], credentials: Credentials) -> bool:
    expected = b"Basic " + base64.b64encode(credentials.username + b":" + credentials.password)
    offered = [value for name, value in headers if name.lower() == b"proxy-authorization"]
    # The scheme name is case-insensitive; the comparison takes the same time however much of
    # the secret matches.
    return len(offered) == 1 and hmac.compare_digest(
        offered[0][:6].lower() + offered[0][6:], expected[:6].lower() + expected[6:])


def _parse_head(head: bytes, credentials: Credentials | None = None) -> ProxyRequest:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        code = "not_implemented" if exc.error_status_hint == 501 else "bad_request"
        raise RemoteProtocolError(f"malformed request: {exc}", code=code) from exc
    if not isinstance(event, h11.Request):
        raise _bad("incomplete request head")
    headers = list(event.headers.raw_items())
    if credentials is not None and not _authorized(headers, credentials):
        raise RemoteProtocolError("proxy authentication required", code="proxy_auth_required")
    names = {name.lower() for name, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        # RFC 9112 section 6.3: a request with both is a smuggling attempt or broken client.
        raise _bad("both Content-Length and Transfer-Encoding")
    try:
        target = event.target.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _bad("non-ASCII request target") from exc
    if event.method == b"CONNECT":
        return TunnelRequest(_authority(target, default_port=None))
    return _forward(event.method, target, headers)


def _forward(method: bytes, target: str, headers: list[tuple[bytes, bytes]]) -> ForwardRequest:
    scheme, sep, rest = target.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise _bad("proxy requests need an absolute URI")
    if scheme.lower() != "http":
        raise RemoteProtocolError(f"unsupported scheme {scheme!r}", code="not_implemented")
    cut = len(rest)
    for delimiter in "/?#":
        index = rest.find(delimiter)
        if index >= 0:
            cut = min(cut, index)
    authority, path = rest[:cut], rest[cut:]
    if "#" in path:
        raise _bad("fragment in request target")
    if not path.startswith("/"):
        path = "/" + path
    dest = _authority(authority, default_port=80)

    # Host is replaced by the URI's authority (RFC 9112 section 3.2.2); names listed in
    # Connection are hop-by-hop too (RFC 9110 section 7.6.1).
    dropped = set(_HOP_BY_HOP) | {b"host"}
    for name, value in headers:
        if name.lower() == b"connection":
            dropped.update(t.strip().lower() for t in value.split(b","))
    dropped -= _FRAMING
    lines = [b"%s %s HTTP/1.1" % (method, path.encode("ascii")), b"Host: " + authority.encode()]
    for name, value in headers:
        lower = name.lower()
        if lower in dropped or lower.startswith(b"proxy-"):
            continue
        lines.append(name + b": " + value)
    lines.append(b"Connection: close")
    return ForwardRequest(dest, b"\r\n".join(lines) + b"\r\n\r\n")


def _authority(text: str, default_port: int | None) -> Address:
    """Parse ``host[:port]`` / ``[v6][:port]`` strictly (no userinfo, no stray characters)."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _bad("unbalanced brackets in host")
        host, rest = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise _bad("bad IPv6 literal") from exc
    else:
        host, colon, port_text = text.partition(":")
        rest = colon + port_text
        if not _REG_NAME.fullmatch(host):
            raise _bad("bad host")
    if rest:
        if not rest.startswith(":") or not rest[1:].isascii() or not rest[1:].isdigit():
            raise _bad("bad port")
        port = int(rest[1:])
    elif default_port is not None:
        port = default_port
    else:
        raise _bad("missing port")
    if not 0 < port <= 0xFFFF:
        raise _bad("port out of range")
    dest = Address(host, port)
    try:
        # Everything downstream needs this to work (name <= 255 bytes), and the server must
        # be able to read the name back: it closes the whole session, every stream of it, on
        # an OPEN whose name it cannot decode (an "xn--" label that is not punycode).
        Address.decode(dest.encode())
    except (ValueError, UnicodeError, RemoteProtocolError) as exc:
        raise _bad("host name too long or invalid") from exc
    return dest


# -- asyncio listener -----------------------------------------------------------------------------


class HttpProxyInbound(HandshakeInbound):
    """An HTTP proxy listener that hands each request's connection to a :class:`Dialer`.

    ``start()`` binds ``listen`` (port 0 picks a free port; see :attr:`address`). Connections
    still reading their request head belong to the inbound and are aborted by ``close()``;
    handed-over connections belong to the dialer.

    ``CONNECT`` gets ``200 Connection established`` as soon as the dialer is ready (before the
    remote end answers); if the remote end then fails, the connection is simply closed. A plain
    request whose stream the server resets before any response byte (destination refused,
    unresolvable, unreachable) gets a 502 saying why.
    """

    name = "HTTP proxy inbound"

    def __init__(
        self,
        dialer: Dialer,
        listen: Address,
        *,
        credentials: Credentials | None = None,
        ready_timeout: float = READY_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(dialer, listen, ready_timeout=ready_timeout,
                         handshake_timeout=handshake_timeout)
        self.credentials = credentials

    def _make_protocol(self) -> asyncio.Protocol:
        return _HttpProxyProtocol(self)


_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class _HttpProxyProtocol(HandshakeConnection[HttpProxyInbound]):
    """One accepted connection until its request is handed over or refused."""

    log_name = "http proxy"
    _log = log

    def __init__(self, inbound: HttpProxyInbound) -> None:
        super().__init__(inbound)
        self._parser = HttpProxyParser(inbound.credentials)

    def data_received(self, data: bytes) -> None:
        transport = cast(asyncio.Transport, self._transport)
        try:
            request = self._parser.receive_data(data)
        except RemoteProtocolError as exc:
            log.debug("http proxy request refused: %s", exc.code)
            transport.write(error_response(exc.code))
            transport.close()
            return
        if request is not None:
            self._start_handover(transport, self._handover(request))

    def eof_received(self) -> bool | None:
        # EOF before a complete head: nothing to relay. (After the head, reading is paused and
        # the EOF is left for the relay to see.)
        return False

    async def _handover(self, request: ProxyRequest) -> None:
        transport = cast(asyncio.Transport, self._transport)
        refusal = self._inbound.dialer.refusal(request.dest, "tcp")
        if refusal is not None:
            log.debug("http proxy: %s", refusal)
            transport.write(forbidden_response(refusal))
            transport.close()
            return
        ready = await self._wait_ready(request.dest)
        if transport.is_closing():
            return
        if not ready:
            transport.write(error_response("bad_gateway", f"veil: {self.why_not_ready()}"))
            transport.close()
            return
        if isinstance(request, TunnelRequest):
            transport.write(_ESTABLISHED)
            self._hand_over(transport, request.dest, self._parser.trailing_data)
            return
        self._hand_over(transport, request.dest, request.head + self._parser.trailing_data)
        relay = transport.get_protocol()
        if isinstance(relay, TcpRelay):
            # A tunnel stream: a refusal or failure at the server comes back as a reset before
            # any response byte, which the client can still be told (no extra round trip).
            relay.answer_early_reset = _answer_reset


def _answer_reset(code: ResetCode) -> bytes | None:
    answer = _RESET_ANSWERS.get(code)
    return None if answer is None else error_response(*answer)
