"""The built-in cover site: a small static website that answers exactly like nginx 1.22.

Anyone who reaches veil's port without a valid access key is handed to this module, together
with the bytes the gate already read. From then on the connection must be indistinguishable
from Debian 12's nginx 1.22.1 serving a directory with its default settings (``root``,
``index index.html``, ``server_tokens on``, ``mime.types``, no gzip): same status lines, same
header order, same error pages byte for byte, same *moment* of rejection for garbage, and the
same way of closing.

Layers
    :class:`CoverSite`        the files and the HTTP semantics (static, index, conditional
                              and range requests, error pages, MSIE/Chrome padding).
    :class:`CoverConnection`  sans-IO: bytes and ``now`` in, bytes out plus a close decision
                              and one timer. It reproduces nginx's incremental request-line
                              and header parser (rejecting on the first invalid byte), its
                              buffer model (1 KiB ``client_header_buffer_size``, then up to 4
                              ``large_client_header_buffers`` of 8 KiB), keep-alive,
                              pipelining, body discarding and lingering close.
    :class:`CoverProtocol`    the asyncio adapter; :meth:`CoverProtocol.take_over` attaches it
                              to a running transport (TCP or TLS) with bytes already read.

File times
    Files are loaded with one fixed modification time (:data:`DEFAULT_MTIME`, 2023-03-15
    13:20:00 UTC) unless told otherwise, so ``Last-Modified`` and ``ETag`` are the same on every
    server and after every deployment: a real site's files do not change each time the
    service restarts.

How nginx closes, and what is emulated (each measured against nginx 1.22.1 on loopback)
    * After a response that keeps the connection alive, nginx waits ``keepalive_timeout``
      (75 s) then closes with FIN. Before a request is complete it waits
      ``client_header_timeout`` (60 s) counted from the accept, not reset by partial data
      (``started_at`` carries the accept time through a gate), and closes with FIN without a
      response. A client that half-closes mid-request gets no response, only FIN.
    * After a response that ends the connection, nginx either closes at once (a later
      client byte draws RST), or does a *lingering close*: FIN at once, then it reads and
      drops data until 5 s of silence (``lingering_timeout``) or 30 s in all
      (``lingering_time``). It lingers when unparsed bytes remain in its buffer (so after
      every parse error), for requests with a body, for pipelined requests, after 494, and on
      TCP when the last read filled its buffer. A body it still expects after answering is
      drained the same way (413 answers, then FIN after 5 s of silence).
    * Under TLS nginx sends close_notify before its FIN, except when a request it had
      started reading times out (quiet shutdown). asyncio's TLS transport cannot half-close,
      so a close is ``close()`` + ``abort()`` (close_notify, then the socket closes at once
      instead of waiting 30 s for the peer's alert), a quiet close is ``abort()``, and a
      lingering close is ``close()`` + ``shutdown(SHUT_WR)`` on the socket.
    * 412 is answered with "Connection: keep-alive" and then closed at once, as nginx does.

Remaining differences (not emulated)
    * TCP-level details below the transport: window sizes, segment boundaries, delays of a
      fraction of a millisecond, and nginx's once-a-second cached ``Date``.
    * During a TLS lingering close asyncio's TLS layer reads on by itself, so the 5 s quiet
      period is counted from the start of the linger, not from the peer's last byte.
    * The multipart/byteranges boundary counts up per process (00000000000000000001, ...)
      like nginx's; nginx also spends numbers on temporary files, so the sequences differ
      once a real nginx would have buffered request bodies to disk.
    * gzip (Debian's nginx.conf turns it on for text/html) is off, as in nginx's defaults;
      the site is flat, so there are no directory redirects (301) or listings (403).
    * Chunked request bodies are skipped with a simplified parser; nginx's limits on chunk
      sizes, extensions and trailers may differ in corner cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.resources
import os
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import cast

__all__ = [
    "DEFAULT_MTIME",
    "CloseAction",
    "CoverConnection",
    "CoverMode",
    "CoverProtocol",
    "CoverSite",
    "Request",
    "SiteFile",
]

# -- limits and timeouts: nginx 1.22 defaults, each a named constant (STYLE habit 10) ---------

SERVER_NAME = b"nginx/1.22.1"
#: client_header_buffer_size 1k: the first read of a request goes into a buffer this big.
CLIENT_HEADER_BUFFER_SIZE = 1024
#: large_client_header_buffers 4 8k: a request line or header line must fit in one of these,
#: and a request may use at most four of them. Past that nginx answers 414 or 400 (494).
LARGE_HEADER_BUFFER_SIZE = 8192
LARGE_HEADER_BUFFERS = 4
#: client_max_body_size 1m: a larger Content-Length gets 413.
CLIENT_MAX_BODY_SIZE = 1024 * 1024
#: keepalive_requests 1000: the 1000th request on a connection gets "Connection: close".
KEEPALIVE_REQUESTS = 1000
#: keepalive_time 1h: a connection older than this is not kept alive after a response.
KEEPALIVE_TIME = 3600.0
#: client_header_timeout 60s, keepalive_timeout 75s, lingering_timeout 5s, lingering_time 30s.
CLIENT_HEADER_TIMEOUT = 60.0
KEEPALIVE_TIMEOUT = 75.0
LINGERING_TIMEOUT = 5.0
LINGERING_TIME = 30.0
#: ngx_http_parse_chunked refuses chunk sizes that would overflow off_t; we cap the hex digits.
MAX_CHUNK_SIZE_DIGITS = 15

#: off_t's maximum: a larger Content-Length is invalid (400).
_MAX_OFF_T = (1 << 63) - 1

#: 2023-03-15 13:20:00 UTC: the fixed modification time of the built-in site's files.
DEFAULT_MTIME = 1678886400

_CRLF = b"\r\n"

_REASONS: dict[int, bytes] = {
    100: b"100 Continue",
    200: b"200 OK",
    206: b"206 Partial Content",
    304: b"304 Not Modified",
    400: b"400 Bad Request",
    403: b"403 Forbidden",
    404: b"404 Not Found",
    405: b"405 Not Allowed",
    412: b"412 Precondition Failed",
    413: b"413 Request Entity Too Large",
    414: b"414 Request-URI Too Large",
    416: b"416 Requested Range Not Satisfiable",
    494: b"400 Bad Request",
    497: b"400 Bad Request",
    500: b"500 Internal Server Error",
    501: b"501 Not Implemented",
    505: b"505 HTTP Version Not Supported",
}

# nginx's pseudo-statuses: 494 "request header too large", 497 "plain HTTP to HTTPS port".
STATUS_HEADER_TOO_LARGE = 494
STATUS_TO_HTTPS = 497

_PAGE_TAIL = b"<hr><center>" + SERVER_NAME + b"</center>\r\n</body>\r\n</html>\r\n"
_MSIE_PADDING = b"<!-- a padding to disable MSIE and Chrome friendly error page -->\r\n" * 6


def _error_page(status: int) -> bytes:
    if status == STATUS_HEADER_TOO_LARGE:
        head = (
            b"<html>\r\n<head><title>400 Request Header Or Cookie Too Large</title></head>\r\n"
            b"<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
            b"<center>Request Header Or Cookie Too Large</center>\r\n"
        )
    elif status == STATUS_TO_HTTPS:
        head = (
            b"<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port"
            b"</title></head>\r\n<body>\r\n<center><h1>400 Bad Request</h1></center>\r\n"
            b"<center>The plain HTTP request was sent to HTTPS port</center>\r\n"
        )
    else:
        title = _REASONS[status]
        head = (
            b"<html>\r\n<head><title>" + title + b"</title></head>\r\n<body>\r\n<center><h1>"
            + title + b"</h1></center>\r\n"
        )
    return head + _PAGE_TAIL


_MIME_TYPES: dict[str, bytes] = {
    "html": b"text/html", "htm": b"text/html", "shtml": b"text/html",
    "css": b"text/css", "xml": b"text/xml", "txt": b"text/plain",
    "js": b"application/javascript", "json": b"application/json",
    "gif": b"image/gif", "jpeg": b"image/jpeg", "jpg": b"image/jpeg", "png": b"image/png",
    "svg": b"image/svg+xml", "svgz": b"image/svg+xml", "webp": b"image/webp",
    "ico": b"image/x-icon", "woff": b"font/woff", "woff2": b"font/woff2",
    "pdf": b"application/pdf", "zip": b"application/zip",
}
_DEFAULT_TYPE = b"application/octet-stream"


def http_date(ts: float) -> bytes:
    """``ts`` as nginx writes it in Date and Last-Modified (RFC 1123, GMT)."""
    return formatdate(ts, usegmt=True).encode("ascii")


_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def parse_http_time(value: bytes) -> int | None:
    """Parse an HTTP date the way nginx's ``ngx_parse_http_time`` does; None on error.

    Accepts RFC 1123, RFC 850 and asctime forms and ignores anything after the seconds (or
    the asctime year), as nginx does.
    """
    v = value + b"\0" * 32  # nginx reads past the end into the NUL-terminated buffer

    def at(i: int) -> int:
        return v[i]

    def digit(i: int) -> bool:
        return 0x30 <= v[i] <= 0x39

    end = len(value)
    isoc = False
    p = 0
    while p < end:
        if at(p) == 0x2C:
            break
        if at(p) == 0x20:
            isoc = True
            break
        p += 1
    p += 1
    while p < end and at(p) == 0x20:
        p += 1
    if end - p < 18:
        return None
    fmt = "isoc" if isoc else ""
    day = 32
    year = 2038
    if not isoc:
        if not (digit(p) and digit(p + 1)):
            return None
        day = (at(p) - 0x30) * 10 + at(p + 1) - 0x30
        p += 2
        if at(p) == 0x20:
            if end - p < 18:
                return None
            fmt = "rfc822"
        elif at(p) == 0x2D:
            fmt = "rfc850"
        else:
            return None
        p += 1
    c0, c1, c2 = at(p), at(p + 1), at(p + 2)
    if c0 == ord("J"):
        month = 0 if c1 == ord("a") else (5 if c2 == ord("n") else 6)
    elif c0 == ord("F"):
        month = 1
    elif c0 == ord("M"):
        month = 2 if c2 == ord("r") else 4
    elif c0 == ord("A"):
        month = 3 if c1 == ord("p") else 7
    elif c0 == ord("S"):
        month = 8
    elif c0 == ord("O"):
        month = 9
    elif c0 == ord("N"):
        month = 10
    elif c0 == ord("D"):
        month = 11
    else:
        return None
    p += 3
    if (fmt == "rfc822" and at(p) != 0x20) or (fmt == "rfc850" and at(p) != 0x2D):
        return None
    p += 1
    if fmt == "rfc822":
        if not all(digit(p + k) for k in range(4)):
            return None
        year = int(v[p:p + 4])
        p += 4
    elif fmt == "rfc850":
        if not (digit(p) and digit(p + 1)):
            return None
        year = int(v[p:p + 2])
        year += 2000 if year < 70 else 1900
        p += 2
    if fmt == "isoc":
        if at(p) == 0x20:
            p += 1
        if not digit(p):
            return None
        day = at(p) - 0x30
        p += 1
        if at(p) != 0x20:
            if not digit(p):
                return None
            day = day * 10 + at(p) - 0x30
            p += 1
        if end - p < 14:
            return None
    if at(p) != 0x20:
        return None
    p += 1
    fields: list[int] = []
    for k in range(3):
        if not (digit(p) and digit(p + 1)):
            return None
        fields.append((at(p) - 0x30) * 10 + at(p + 1) - 0x30)
        p += 2
        if k < 2:
            if at(p) != 0x3A:
                return None
            p += 1
    hour, minute, sec = fields
    if fmt == "isoc":
        if at(p) != 0x20:
            return None
        p += 1
        if not all(digit(p + k) for k in range(4)):
            return None
        year = int(v[p:p + 4])
    if hour > 23 or minute > 59 or sec > 60:
        return None
    if day == 29 and month == 1:
        if (year & 3) or (year % 100 == 0 and year % 400 != 0):
            return None
    elif day > _MONTH_DAYS[month]:
        return None
    month -= 1
    if month <= 0:
        month += 12
        year -= 1
    days = (365 * year + year // 4 - year // 100 + year // 400 + 367 * month // 12 - 30 + day - 1
            - 719527 + 31 + 28)
    return days * 86400 + hour * 3600 + minute * 60 + sec


# -- the site ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteFile:
    """One file of the cover site.

    Attributes:
        body: the file's bytes.
        content_type: as nginx's mime.types would give it for the file's extension.
        mtime: whole seconds since the epoch; drives Last-Modified and the ETag.
    """

    body: bytes
    content_type: bytes
    mtime: int

    @property
    def etag(self) -> bytes:
        """nginx's ETag: hex mtime, dash, hex size, in quotes."""
        return b'"%x-%x"' % (self.mtime, len(self.body))


def _mime_for(name: str) -> bytes:
    dot = name.rfind(".")
    if dot < 0:
        return _DEFAULT_TYPE
    return _MIME_TYPES.get(name[dot + 1:], _DEFAULT_TYPE)


@dataclass(frozen=True)
class Request:
    """A request whose request line and headers were accepted by the parser.

    Attributes:
        method: the method token as sent (``b"GET"``).
        uri: the normalised, percent-decoded path (``b"/index.html"``).
        version: nginx's number: 9 for HTTP/0.9, 1000 for 1.0, 1001 for 1.1.
        headers: the headers that matter, by lower-case name, first value.
        content_length: -1 when absent.
        chunked: Transfer-Encoding: chunked.
        keepalive: whether nginx would keep the connection after the response.
        msie_padding: whether error pages get the MSIE/Chrome padding.
    """

    method: bytes
    uri: bytes
    version: int
    headers: Mapping[bytes, bytes] = field(default_factory=dict)
    content_length: int = -1
    chunked: bool = False
    keepalive: bool = False
    msie_padding: bool = False


@dataclass
class Response:
    """What a request produced: the bytes and what the connection does afterwards."""

    data: bytes
    status: int
    keepalive: bool
    #: close at once whatever else holds (nginx's "terminate request" path, e.g. after 412).
    terminate: bool = False
    #: send "HTTP/1.1 100 Continue" first (Expect: 100-continue on a GET that is served).
    continue_first: bool = False


class CoverSite:
    """The files of the cover site and nginx's static-file semantics over them.

    ``files`` maps a name in the site's root (no slashes: the site is flat) to its file.
    """

    def __init__(self, files: Mapping[str, SiteFile]) -> None:
        for name in files:
            if not name or "/" in name:
                raise ValueError(f"cover site file names must be flat, got {name!r}")
        self._files = {("/" + name).encode(): f for name, f in files.items()}
        # nginx's ngx_temp_number: multipart range boundaries count up from 1 per process.
        self._boundary = 0

    @classmethod
    def from_directory(cls, path: str | os.PathLike[str], *, mtime: int | None = DEFAULT_MTIME,
                       ) -> CoverSite:
        """Load every regular file in ``path``; ``mtime=None`` takes the files' own times."""
        files: dict[str, SiteFile] = {}
        for entry in sorted(Path(path).iterdir()):
            if not entry.is_file() or entry.name.startswith(("_", ".")):
                continue
            stamp = int(entry.stat().st_mtime) if mtime is None else mtime
            files[entry.name] = SiteFile(entry.read_bytes(), _mime_for(entry.name), stamp)
        return cls(files)

    @classmethod
    def builtin(cls, *, mtime: int = DEFAULT_MTIME) -> CoverSite:
        """The small blog shipped in ``veil/server/site``."""
        root = importlib.resources.files("veil.server") / "site"
        files: dict[str, SiteFile] = {}
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith(("_", ".")):
                files[entry.name] = SiteFile(entry.read_bytes(), _mime_for(entry.name), mtime)
        return cls(files)

    @property
    def names(self) -> list[str]:
        return sorted(k.decode()[1:] for k in self._files)

    # -- responses ---------------------------------------------------------------------

    def error(self, status: int, *, version: int = 1001, head: bool = False,
              keepalive: bool = False, msie_padding: bool = False,
              extra_headers: bytes = b"") -> bytes:
        """nginx's special response for ``status`` (a 4xx/5xx or 494/497), as bytes."""
        body = _error_page(status)
        if msie_padding and version >= 1000:
            body += _MSIE_PADDING
        if version < 1000:
            return body
        header = self._header(status, b"text/html", len(body), last_modified=None,
                              keepalive=keepalive, extra=extra_headers)
        return header if head else header + body

    def _header(self, status: int, content_type: bytes | None, length: int | None, *,
                last_modified: int | None, keepalive: bool, extra: bytes = b"") -> bytes:
        out = [b"HTTP/1.1 ", _REASONS[status], _CRLF, b"Server: ", SERVER_NAME, _CRLF,
               b"Date: ", http_date(time.time()), _CRLF]
        if content_type is not None:
            out += [b"Content-Type: ", content_type, _CRLF]
        if length is not None:
            out += [b"Content-Length: %d\r\n" % length]
        if last_modified is not None:
            out += [b"Last-Modified: ", http_date(last_modified), _CRLF]
        out.append(b"Connection: keep-alive\r\n" if keepalive else b"Connection: close\r\n")
        out += [extra, _CRLF]
        return b"".join(out)

    def respond(self, req: Request) -> Response:
        """Serve ``req`` as nginx's index + static modules and header filters would."""
        method = req.method
        head = method == b"HEAD"
        allowed = method in (b"GET", b"HEAD", b"POST")
        uri = req.uri
        if uri.endswith(b"/"):
            if not allowed:
                return self._fail(req, 405)
            if uri != b"/":
                return self._fail(req, 404)
            uri = b"/index.html"  # the index module's internal redirect
        elif not allowed:
            return self._fail(req, 405)
        f = self._files.get(uri)
        if f is None:
            return self._fail(req, 404)
        if method == b"POST":
            return self._fail(req, 405)
        expect = req.headers.get(b"expect")
        continue_first = (req.version >= 1001 and expect is not None
                          and expect.lower() == b"100-continue")
        if req.version < 1000:
            return Response(f.body, 200, False, continue_first=False)

        # ngx_http_not_modified_filter
        ius = req.headers.get(b"if-unmodified-since")
        if ius is not None:
            t = parse_http_time(ius)
            if t is None or t < f.mtime:
                return self._fail(req, 412, terminate=True, continue_first=continue_first)
        im = req.headers.get(b"if-match")
        if im is not None and not _etag_match(im, f.etag, weak=False):
            return self._fail(req, 412, terminate=True, continue_first=continue_first)
        ims = req.headers.get(b"if-modified-since")
        inm = req.headers.get(b"if-none-match")
        if ims is not None or inm is not None:
            modified = ims is not None and parse_http_time(ims) != f.mtime
            if not modified and inm is not None and not _etag_match(inm, f.etag, weak=True):
                modified = True
            if not modified:
                data = self._header(304, None, None, last_modified=f.mtime,
                                    keepalive=req.keepalive, extra=b"ETag: " + f.etag + _CRLF)
                return Response(data, 304, req.keepalive, continue_first=continue_first)

        # ngx_http_range_header_filter
        rng = req.headers.get(b"range")
        if rng is not None and rng[:6].lower() == b"bytes=" and self._if_range_ok(req, f):
            ranges = _parse_ranges(rng[6:], len(f.body))
            if ranges == "unsatisfiable":
                extra = b"Content-Range: bytes */%d\r\n" % len(f.body)
                return self._fail(req, 416, extra_headers=extra,
                                  continue_first=continue_first)
            if isinstance(ranges, list):
                return self._ranged(req, f, ranges, head, continue_first)

        data = self._header(200, f.content_type, len(f.body), last_modified=f.mtime,
                            keepalive=req.keepalive,
                            extra=b"ETag: " + f.etag + b"\r\nAccept-Ranges: bytes\r\n")
        if not head:
            data += f.body
        return Response(data, 200, req.keepalive, continue_first=continue_first)

    @staticmethod
    def _if_range_ok(req: Request, f: SiteFile) -> bool:
        if_range = req.headers.get(b"if-range")
        if if_range is None:
            return True
        if if_range.startswith(b'"'):
            return if_range == f.etag
        return parse_http_time(if_range) == f.mtime

    def _ranged(self, req: Request, f: SiteFile, ranges: list[tuple[int, int]], head: bool,
                continue_first: bool) -> Response:
        size = len(f.body)
        tag = b"ETag: " + f.etag + _CRLF
        if len(ranges) == 1:
            start, end = ranges[0]
            extra = tag + b"Content-Range: bytes %d-%d/%d\r\n" % (start, end - 1, size)
            data = self._header(206, f.content_type, end - start, last_modified=f.mtime,
                                keepalive=req.keepalive, extra=extra)
            if not head:
                data += f.body[start:end]
            return Response(data, 206, req.keepalive, continue_first=continue_first)
        self._boundary += 1
        boundary = b"%020d" % self._boundary
        parts = []
        for start, end in ranges:
            parts += [b"\r\n--", boundary, b"\r\nContent-Type: ", f.content_type,
                      b"\r\nContent-Range: bytes %d-%d/%d\r\n\r\n" % (start, end - 1, size),
                      f.body[start:end]]
        parts += [b"\r\n--", boundary, b"--\r\n"]
        body = b"".join(parts)
        ctype = b"multipart/byteranges; boundary=" + boundary
        data = self._header(206, ctype, len(body), last_modified=f.mtime,
                            keepalive=req.keepalive, extra=tag)
        if not head:
            data += body
        return Response(data, 206, req.keepalive, continue_first=continue_first)

    def _fail(self, req: Request, status: int, *, terminate: bool = False,
              extra_headers: bytes = b"", continue_first: bool = False) -> Response:
        keepalive = req.keepalive and status not in _CLOSING_STATUSES
        data = self.error(status, version=req.version, head=req.method == b"HEAD",
                          keepalive=keepalive, msie_padding=req.msie_padding,
                          extra_headers=extra_headers)
        return Response(data, status, keepalive and not terminate, terminate=terminate,
                        continue_first=continue_first)


# ngx_http_special_response_handler turns keep-alive off for these.
_CLOSING_STATUSES = frozenset({400, 413, 414, STATUS_TO_HTTPS, 500, 501})


def _etag_match(header: bytes, etag: bytes, *, weak: bool) -> bool:
    """ngx_http_test_if_match: is ``etag`` in the comma-separated list ``header``?"""
    if header == b"*":
        return True
    start, end = 0, len(header)
    while start < end:
        if weak and end - start > 2 and header[start:start + 2] == b"W/":
            start += 2
        if len(etag) > end - start:
            return False
        if header[start:start + len(etag)] == etag:
            start += len(etag)
            while start < end and header[start] in b" \t":
                start += 1
            if start == end or header[start] == 0x2C:
                return True
        while start < end and header[start] != 0x2C:
            start += 1
        while start < end and header[start] in b" \t,":
            start += 1
    return False


def _parse_ranges(spec: bytes, size: int) -> list[tuple[int, int]] | str:
    """ngx_http_range_parse: a list of [start, end) pairs, "unsatisfiable" or "ignore"."""
    s = spec + b"\0"
    p = 0
    ranges: list[tuple[int, int]] = []
    total = 0
    limit = (1 << 63) - 1

    def digits(p: int) -> tuple[int, int] | None:
        n = 0
        while 0x30 <= s[p] <= 0x39:
            n = n * 10 + s[p] - 0x30
            if n > limit:
                return None
            p += 1
        return n, p

    while True:
        start = end = 0
        suffix = False
        while s[p] == 0x20:
            p += 1
        if s[p] != 0x2D:
            if not 0x30 <= s[p] <= 0x39:
                return "unsatisfiable"
            got = digits(p)
            if got is None:
                return "unsatisfiable"
            start, p = got
            while s[p] == 0x20:
                p += 1
            if s[p] != 0x2D:
                return "unsatisfiable"
            p += 1
            while s[p] == 0x20:
                p += 1
            if s[p] in (0x2C, 0):
                end = size
                got_end = True
            else:
                got_end = False
        else:
            suffix = True
            p += 1
            got_end = False
        if not got_end:
            if not 0x30 <= s[p] <= 0x39:
                return "unsatisfiable"
            got = digits(p)
            if got is None:
                return "unsatisfiable"
            end, p = got
            while s[p] == 0x20:
                p += 1
            if s[p] not in (0x2C, 0):
                return "unsatisfiable"
            if suffix:
                start = size - end if end < size else 0
                end = size - 1
            end = size if end >= size else end + 1
        if start < end:
            ranges.append((start, end))
            total += end - start
        elif start == 0:
            return "ignore"
        if s[p] != 0x2C:
            break
        p += 1
    if not ranges:
        return "unsatisfiable"
    if total > size:
        return "ignore"
    return ranges


# -- the connection (sans-IO) -------------------------------------------------------------------


class CoverMode(enum.Enum):
    """Where the connection came from."""

    #: plain HTTP, or HTTP inside TLS after the handshake: serve the site.
    HTTP = "http"
    #: plain bytes on the TLS port: complete requests get 400 "The plain HTTP request was
    #: sent to HTTPS port", garbage the usual 400.
    PLAIN_ON_TLS_PORT = "plain_on_tls_port"


class CloseAction(enum.Enum):
    """What the transport should do once the pending output is written."""

    NONE = "none"        # keep the connection
    LINGER = "linger"    # half-close (FIN) now, keep reading and discarding
    CLOSE = "close"      # close (FIN); under TLS after a close_notify alert
    QUIET = "quiet"      # close after a request timed out: no close_notify (nginx sets
                         # c->timedout, which makes its SSL shutdown quiet)
    RESET = "reset"      # close with unread data: RST, as the kernel does for nginx


class _Phase(enum.Enum):
    WAIT = "wait"              # no byte of the next request yet
    LINE = "line"              # parsing the request line
    HEADERS = "headers"        # parsing header lines
    DISCARD = "discard"        # response sent, skipping the rest of the request body
    LINGER = "linger"          # write side shut, reading and dropping until quiet
    CLOSED = "closed"


class _ParseError(Exception):
    """Rejected. ``at_byte``: the parser stopped on a bad byte, which stays unparsed."""

    def __init__(self, status: int, *, at_byte: bool = True) -> None:
        super().__init__(status)
        self.status = status
        self.at_byte = at_byte


# Offsets into the header buffer that move when nginx copies a line to a larger buffer.
_OFFSETS = ("_line_start", "_uri_start", "_uri_end", "_args_start", "_host_start",
            "_host_end", "_schema_end", "_hname_end", "_hvalue_start", "_hvalue_end")

# Request-line parser states (ngx_http_parse_request_line).
(_S_START, _S_METHOD, _S_SPACES_BEFORE_URI, _S_SCHEMA, _S_SCHEMA_SLASH, _S_SCHEMA_SLASH_SLASH,
 _S_HOST_START, _S_HOST, _S_HOST_END, _S_HOST_IP_LITERAL, _S_PORT, _S_AFTER_SLASH_IN_URI,
 _S_CHECK_URI, _S_URI, _S_HTTP_09, _S_HTTP_H, _S_HTTP_HT, _S_HTTP_HTT, _S_HTTP_HTTP,
 _S_FIRST_MAJOR_DIGIT, _S_MAJOR_DIGIT, _S_FIRST_MINOR_DIGIT, _S_MINOR_DIGIT,
 _S_SPACES_AFTER_DIGIT, _S_ALMOST_DONE) = range(25)

# Header-line parser states (ngx_http_parse_header_line).
(_H_START, _H_NAME, _H_SPACE_BEFORE_VALUE, _H_VALUE, _H_SPACE_AFTER_VALUE, _H_ALMOST_DONE,
 _H_HEADER_ALMOST_DONE) = range(7)


def _bitmap(chars: bytes) -> frozenset[int]:
    return frozenset(chars)


# nginx's "usual" table: URI bytes that need no further attention (no "#%+./?", no CTLs).
_USUAL = frozenset(c for c in range(0x21, 256) if c not in b"#%+./?\x7f")
_METHOD_CHARS = _bitmap(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
_ALPHA = _bitmap(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DIGITS = _bitmap(b"0123456789")
_HOST_CHARS = _ALPHA | _DIGITS | _bitmap(b".-")
_SCHEMA_CHARS = _ALPHA | _DIGITS | _bitmap(b"+-.")
_IP_LITERAL_CHARS = _ALPHA | _DIGITS | _bitmap(b":-._~!$&'()*+,;=")
# ngx_http_parse_header_line's lowcase table: bytes that may appear in a valid header name.
_HEADER_NAME_CHARS = _ALPHA | _DIGITS | _bitmap(b"-")

# Headers that may appear only once (ngx_http_process_unique_header_line in 1.22).
_UNIQUE_HEADERS = frozenset({
    b"if-modified-since", b"if-unmodified-since", b"if-match", b"if-none-match",
    b"content-length", b"content-range", b"if-range", b"transfer-encoding", b"expect",
    b"authorization",
})
# Headers the site looks at (the first value is kept).
_KEPT_HEADERS = _UNIQUE_HEADERS | {b"range", b"user-agent", b"connection", b"keep-alive"}


def validate_host(host: bytes) -> bytes | None:
    """ngx_http_validate_host: the lower-cased host without port, or None if invalid."""
    dot_pos = len(host)
    host_len = len(host)
    state = 0  # 0 usual, 1 literal, 2 rest
    for i, ch in enumerate(host):
        if ch == 0x2E:
            if dot_pos == i - 1:
                return None
            dot_pos = i
        elif ch == 0x3A:
            if state == 0:
                host_len = i
                state = 2
        elif ch == 0x5B:
            if i == 0:
                state = 1
        elif ch == 0x5D:
            if state == 1:
                host_len = i + 1
                state = 2
        elif ch == 0x2F or ch <= 0x20 or ch == 0x7F:
            return None
    if dot_pos == host_len - 1:
        host_len -= 1
    if host_len <= 0:
        return None
    return host[:host_len].lower()


def parse_complex_uri(raw: bytes, *, empty_path: bool = False) -> bytes | None:
    """ngx_http_parse_complex_uri with merge_slashes on: the decoded path, or None (400)."""
    usual, slash, dot, dot_dot, quoted, quoted_second = range(6)
    u = bytearray(b"/" if empty_path else b"")
    state = usual
    quoted_state = usual
    decoded = 0
    n = len(raw)
    p = 0
    ch = raw[0] if n else 0
    p = 1

    def next_ch() -> int:
        nonlocal p
        c = raw[p] if p < n else 0x20
        p += 1
        return c

    def go_up() -> bool:
        # u -= 4 then back to the previous slash: remove "/seg/.." from the output.
        k = len(u) - 4
        while True:
            if k < 0:
                return False
            if u[k] == 0x2F:
                del u[k + 1:]
                return True
            k -= 1

    while p <= n:
        if state == usual:
            if ch in _USUAL:
                u.append(ch)
                ch = next_ch()
                continue
            if ch == 0x2F:
                state = slash
                u.append(ch)
            elif ch == 0x25:
                quoted_state = state
                state = quoted
            elif ch in (0x3F, 0x23):
                return bytes(u)
            else:
                u.append(ch)
            ch = next_ch()
        elif state == slash:
            if ch in _USUAL:
                state = usual
                u.append(ch)
                ch = next_ch()
                continue
            if ch == 0x2F:
                pass
            elif ch == 0x2E:
                state = dot
                u.append(ch)
            elif ch == 0x25:
                quoted_state = state
                state = quoted
            elif ch in (0x3F, 0x23):
                return bytes(u)
            else:
                state = usual
                u.append(ch)
            ch = next_ch()
        elif state == dot:
            if ch in _USUAL:
                state = usual
                u.append(ch)
                ch = next_ch()
                continue
            if ch == 0x2F:
                state = slash
                u.pop()
            elif ch == 0x2E:
                state = dot_dot
                u.append(ch)
            elif ch == 0x25:
                quoted_state = state
                state = quoted
            elif ch in (0x3F, 0x23):
                u.pop()
                return bytes(u)
            else:
                state = usual
                u.append(ch)
            ch = next_ch()
        elif state == dot_dot:
            if ch in _USUAL:
                state = usual
                u.append(ch)
                ch = next_ch()
                continue
            if ch in (0x2F, 0x3F, 0x23):
                if not go_up():
                    return None
                if ch != 0x2F:
                    return bytes(u)
                state = slash
            elif ch == 0x25:
                quoted_state = state
                state = quoted
            else:
                state = usual
                u.append(ch)
            ch = next_ch()
        elif state == quoted:
            if ch in _DIGITS:
                decoded = ch - 0x30
            elif 0x61 <= (ch | 0x20) <= 0x66:
                decoded = (ch | 0x20) - 0x61 + 10
            else:
                return None
            state = quoted_second
            ch = next_ch()
        else:  # quoted_second
            if ch in _DIGITS:
                ch = (decoded << 4) + ch - 0x30
                if ch in (0x25, 0x23):
                    state = usual
                    u.append(ch)
                    ch = next_ch()
                    continue
                if ch == 0:
                    return None
                state = quoted_state
                continue
            if 0x61 <= (ch | 0x20) <= 0x66:
                ch = (decoded << 4) + (ch | 0x20) - 0x61 + 10
                if ch == 0x3F:
                    state = usual
                    u.append(ch)
                    ch = next_ch()
                    continue
                state = quoted_state
                continue
            return None
    if state in (quoted, quoted_second):
        return None
    if state == dot:
        u.pop()
    elif state == dot_dot and not go_up():
        return None
    return bytes(u)


class CoverConnection:
    """One connection to the emulated nginx, sans-IO.

    Feed it with :meth:`receive_data` / :meth:`receive_eof` / :meth:`handle_timer`; after each
    call take :meth:`data_to_send` and look at :attr:`close_action` and :meth:`get_timer`.
    ``now`` is any monotonic clock in seconds; ``started_at`` is when the connection was
    accepted (the header timeout runs from then, as in nginx). ``tls``: the bytes come out
    of TLS (this changes one closing decision, see :meth:`_finalize`).
    """

    def __init__(self, site: CoverSite, *, now: float, mode: CoverMode = CoverMode.HTTP,
                 started_at: float | None = None,
                 header_timeout: float = CLIENT_HEADER_TIMEOUT,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 lingering_timeout: float = LINGERING_TIMEOUT,
                 lingering_time: float = LINGERING_TIME, tls: bool = False) -> None:
        self._site = site
        self._mode = mode
        self._tls = tls
        self._header_timeout = header_timeout
        self._keepalive_timeout = keepalive_timeout
        self._lingering_timeout = lingering_timeout
        self._lingering_time = lingering_time
        self._started = now if started_at is None else started_at
        self._out = bytearray()
        self.close_action = CloseAction.NONE
        self._phase = _Phase.WAIT
        self._deadline: float | None = self._started + header_timeout
        self._linger_end = 0.0
        self._requests = 0
        # "kernel" bytes not yet read into a header buffer
        self._pending = bytearray()
        self._eof = False
        self._fresh_buffers()
        self._reset_request()

    # -- public API ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._phase is _Phase.CLOSED

    def data_to_send(self) -> bytes:
        """The bytes to write now (may be empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next, or None."""
        return None if self._phase is _Phase.CLOSED else self._deadline

    def receive_data(self, data: bytes, now: float) -> None:
        if self._phase is _Phase.CLOSED:
            return
        if self._phase is _Phase.LINGER:
            self._deadline = min(now + self._lingering_timeout, self._linger_end)
            return
        self._pending += data
        self._run(now)

    def receive_eof(self, now: float) -> None:
        """The peer half-closed. nginx then closes without answering a partial request."""
        if self._phase is _Phase.CLOSED:
            return
        self._eof = True
        self._run(now)
        if not self.closed:
            self._close(CloseAction.CLOSE)

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline or self._phase is _Phase.CLOSED:
            return
        # client_header_timeout, keepalive_timeout, lingering: nginx closes without a word.
        # A request it had started reading (or whose body it was dropping) times out with
        # c->timedout set, so under TLS it does not even send close_notify (measured).
        if self._pending:
            self._close(CloseAction.RESET)
        elif self._phase in (_Phase.LINE, _Phase.HEADERS, _Phase.DISCARD):
            self._close(CloseAction.QUIET)
        else:
            self._close(CloseAction.CLOSE)

    # -- buffers -------------------------------------------------------------------------

    def _fresh_buffers(self) -> None:
        self._buf = bytearray()          # the current header buffer's bytes
        self._cap = CLIENT_HEADER_BUFFER_SIZE
        self._pos = 0                    # parse position in _buf
        self._nbusy = 0
        self._nfree = 0
        self._ready = False              # nginx's rev->ready after the last recv

    def _recv(self) -> bool:
        room = self._cap - len(self._buf)
        if not self._pending or room <= 0:
            return False
        take = min(room, len(self._pending))
        self._buf += self._pending[:take]
        del self._pending[:take]
        self._ready = take == room
        return True

    def _alloc_large(self, old: int, state: int, *, request_line: bool) -> bool:
        """ngx_http_alloc_large_header_buffer: False means DECLINED (414 / 494)."""
        if request_line and state == 0:
            # only CR/LF so far: nginx empties the buffer and reads on, without limit
            self._buf = bytearray()
            self._pos = 0
            return True
        if state != 0 and self._pos - old >= LARGE_HEADER_BUFFER_SIZE:
            return False
        if self._nfree:
            self._nfree -= 1
        elif self._nbusy >= LARGE_HEADER_BUFFERS:
            return False
        self._nbusy += 1
        keep = self._buf[old:self._pos] if state != 0 else bytearray()
        self._buf = bytearray(keep)
        self._cap = LARGE_HEADER_BUFFER_SIZE
        self._pos = len(self._buf)
        if state != 0:
            for attr in _OFFSETS:
                value = getattr(self, attr)
                if value >= 0:
                    setattr(self, attr, value - old)
        return True

    # -- request state -------------------------------------------------------------------

    def _reset_request(self) -> None:
        self._state = 0
        self._line_start = self._pos
        self._method = b""
        self._method_end = 0
        self._uri_start = -1
        self._uri_end = -1
        self._args_start = -1
        self._host_start = -1
        self._host_end = -1
        self._schema_end = -1
        self._complex = False
        self._quoted = False
        self._empty_path = False
        self._major = 0
        self._minor = 0
        self._version = 1000
        self._request_line = b""
        self._headers: dict[bytes, bytes] = {}
        self._has_host = False
        self._host_in_line = False
        self._connection = 0  # 0 none, 1 close, 2 keep-alive
        self._msie = False
        self._chrome = False
        self._hname_end = 0
        self._hvalue_start = 0
        self._hvalue_end = 0
        self._invalid_header = False

    # -- the main loop ---------------------------------------------------------------------

    def _run(self, now: float) -> None:
        while self._phase in (_Phase.WAIT, _Phase.LINE, _Phase.HEADERS, _Phase.DISCARD):
            if self._phase is _Phase.DISCARD:
                if not self._discard(now):
                    return
                continue
            if self._pos >= len(self._buf):
                if len(self._buf) >= self._cap:
                    if not self._buffer_full():
                        return
                    continue
                if not self._recv():
                    if self._eof and self._phase is not _Phase.WAIT:
                        # "client prematurely closed connection": no response
                        self._close(CloseAction.CLOSE)
                    return
            if self._phase is _Phase.WAIT:
                self._phase = _Phase.LINE
                if self._requests > 0 and not self._pipelined:
                    # keepalive handler: a new request gets client_header_timeout from now
                    self._deadline = now + self._header_timeout
            try:
                if self._phase is _Phase.LINE:
                    self._parse_line()
                else:
                    self._parse_headers()
            except _ParseError as e:
                self._finish_error(e.status, now, parse_error=e.at_byte)
                return
            if self._phase is _Phase.HEADERS and self._state == -1:
                self._state = 0
                self._request_ready(now)

    def _buffer_full(self) -> bool:
        if self._phase in (_Phase.LINE, _Phase.WAIT):
            if not self._alloc_large(self._line_start, self._state, request_line=True):
                self._finish_error(414, None, parse_error=False)
                return False
        elif not self._alloc_large(self._line_start, self._state, request_line=False):
            self._finish_error(STATUS_HEADER_TOO_LARGE, None, parse_error=False, linger=True)
            return False
        return True

    # -- request line --------------------------------------------------------------------

    def _parse_line(self) -> None:
        buf = self._buf
        state = self._state
        p = self._pos
        end = len(buf)
        while p < end:
            ch = buf[p]
            if state == _S_START:
                self._line_start = p
                if ch not in (0x0D, 0x0A):
                    if ch not in _METHOD_CHARS:
                        raise _ParseError(400)
                    state = _S_METHOD
            elif state == _S_METHOD:
                if ch == 0x20:
                    self._method = bytes(buf[self._line_start:p])
                    state = _S_SPACES_BEFORE_URI
                elif ch not in _METHOD_CHARS:
                    raise _ParseError(400)
            elif state == _S_SPACES_BEFORE_URI:
                if ch == 0x2F:
                    self._uri_start = p
                    state = _S_AFTER_SLASH_IN_URI
                elif ch in _ALPHA:
                    state = _S_SCHEMA
                elif ch != 0x20:
                    raise _ParseError(400)
            elif state == _S_SCHEMA:
                if ch == 0x3A:
                    self._schema_end = p
                    state = _S_SCHEMA_SLASH
                elif ch not in _SCHEMA_CHARS:
                    raise _ParseError(400)
            elif state == _S_SCHEMA_SLASH:
                if ch != 0x2F:
                    raise _ParseError(400)
                state = _S_SCHEMA_SLASH_SLASH
            elif state == _S_SCHEMA_SLASH_SLASH:
                if ch != 0x2F:
                    raise _ParseError(400)
                state = _S_HOST_START
            elif state in (_S_HOST_START, _S_HOST, _S_HOST_END):
                if state == _S_HOST_START:
                    self._host_start = p
                    if ch == 0x5B:
                        state = _S_HOST_IP_LITERAL
                        p += 1
                        continue
                    state = _S_HOST
                if state == _S_HOST and ch in _HOST_CHARS:
                    p += 1
                    continue
                if ch == 0x3A:
                    state = _S_PORT
                else:
                    self._host_end = p
                    state = self._after_host(ch, p)
            elif state == _S_HOST_IP_LITERAL:
                if ch == 0x5D:
                    state = _S_HOST_END
                elif ch not in _IP_LITERAL_CHARS:
                    raise _ParseError(400)
            elif state == _S_PORT:
                if ch not in _DIGITS:
                    self._host_end = p
                    state = self._after_host(ch, p)
            elif state == _S_AFTER_SLASH_IN_URI:
                if ch in _USUAL:
                    state = _S_CHECK_URI
                elif ch == 0x20:
                    self._uri_end = p
                    state = _S_HTTP_09
                elif ch == 0x0D:
                    self._uri_end = p
                    self._minor = 9
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._uri_end = p
                    self._minor = 9
                    self._line_done(p)
                    return
                elif ch in (0x2E, 0x2F, 0x23):
                    self._complex = True
                    state = _S_URI
                elif ch == 0x25:
                    self._quoted = True
                    state = _S_URI
                elif ch == 0x3F:
                    self._args_start = p + 1
                    state = _S_URI
                elif ch == 0x2B:
                    pass
                elif ch < 0x20 or ch == 0x7F:
                    raise _ParseError(400)
                else:
                    state = _S_CHECK_URI
            elif state == _S_CHECK_URI:
                if ch in _USUAL:
                    pass
                elif ch == 0x2F:
                    state = _S_AFTER_SLASH_IN_URI
                elif ch in (0x2E, 0x2B):
                    pass
                elif ch == 0x20:
                    self._uri_end = p
                    state = _S_HTTP_09
                elif ch == 0x0D:
                    self._uri_end = p
                    self._minor = 9
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._uri_end = p
                    self._minor = 9
                    self._line_done(p)
                    return
                elif ch == 0x25:
                    self._quoted = True
                    state = _S_URI
                elif ch == 0x3F:
                    self._args_start = p + 1
                    state = _S_URI
                elif ch == 0x23:
                    self._complex = True
                    state = _S_URI
                elif ch < 0x20 or ch == 0x7F:
                    raise _ParseError(400)
            elif state == _S_URI:
                if ch in _USUAL:
                    pass
                elif ch == 0x20:
                    self._uri_end = p
                    state = _S_HTTP_09
                elif ch == 0x0D:
                    self._uri_end = p
                    self._minor = 9
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._uri_end = p
                    self._minor = 9
                    self._line_done(p)
                    return
                elif ch == 0x23:
                    self._complex = True
                elif ch < 0x20 or ch == 0x7F:
                    raise _ParseError(400)
            elif state == _S_HTTP_09:
                if ch == 0x20:
                    pass
                elif ch == 0x0D:
                    self._minor = 9
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._minor = 9
                    self._line_done(p)
                    return
                elif ch == 0x48:
                    state = _S_HTTP_H
                else:
                    raise _ParseError(400)
            elif state == _S_HTTP_H:
                if ch != 0x54:
                    raise _ParseError(400)
                state = _S_HTTP_HT
            elif state == _S_HTTP_HT:
                if ch != 0x54:
                    raise _ParseError(400)
                state = _S_HTTP_HTT
            elif state == _S_HTTP_HTT:
                if ch != 0x50:
                    raise _ParseError(400)
                state = _S_HTTP_HTTP
            elif state == _S_HTTP_HTTP:
                if ch != 0x2F:
                    raise _ParseError(400)
                state = _S_FIRST_MAJOR_DIGIT
            elif state == _S_FIRST_MAJOR_DIGIT:
                if not 0x31 <= ch <= 0x39:
                    raise _ParseError(400)
                self._major = ch - 0x30
                if self._major > 1:
                    raise _ParseError(505)
                state = _S_MAJOR_DIGIT
            elif state == _S_MAJOR_DIGIT:
                if ch == 0x2E:
                    state = _S_FIRST_MINOR_DIGIT
                elif ch not in _DIGITS:
                    raise _ParseError(400)
                else:
                    self._major = self._major * 10 + ch - 0x30
                    if self._major > 1:
                        raise _ParseError(505)
            elif state == _S_FIRST_MINOR_DIGIT:
                if ch not in _DIGITS:
                    raise _ParseError(400)
                self._minor = ch - 0x30
                state = _S_MINOR_DIGIT
            elif state == _S_MINOR_DIGIT:
                if ch == 0x0D:
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._line_done(p)
                    return
                elif ch == 0x20:
                    state = _S_SPACES_AFTER_DIGIT
                elif ch not in _DIGITS:
                    raise _ParseError(400)
                else:
                    if self._minor > 99:
                        raise _ParseError(400)
                    self._minor = self._minor * 10 + ch - 0x30
            elif state == _S_SPACES_AFTER_DIGIT:
                if ch == 0x0D:
                    state = _S_ALMOST_DONE
                elif ch == 0x0A:
                    self._line_done(p)
                    return
                elif ch != 0x20:
                    raise _ParseError(400)
            elif state == _S_ALMOST_DONE:
                if ch != 0x0A:
                    raise _ParseError(400)
                self._line_done(p)
                return
            p += 1
        self._pos = p
        self._state = state

    def _after_host(self, ch: int, p: int) -> int:
        if ch == 0x2F:
            self._uri_start = p
            return _S_AFTER_SLASH_IN_URI
        if ch == 0x3F:
            self._uri_start = p
            self._args_start = p + 1
            self._empty_path = True
            return _S_URI
        if ch == 0x20:
            self._uri_start = -2  # "/" taken from the schema's "://"
            self._uri_end = p
            return _S_HTTP_09
        raise _ParseError(400)

    def _line_done(self, p: int) -> None:
        """The request line ended at ``p`` (its LF): validate it as nginx does after NGX_OK."""
        self._pos = p + 1
        buf = self._buf
        self._version = self._major * 1000 + self._minor
        if self._version == 9 and self._method != b"GET":
            raise _ParseError(400, at_byte=False)
        raw = b"/" if self._uri_start == -2 else bytes(buf[self._uri_start:self._uri_end])
        if self._complex or self._quoted or self._empty_path:
            uri = parse_complex_uri(raw, empty_path=self._empty_path)
            if uri is None:
                raise _ParseError(400, at_byte=False)
        elif self._args_start >= 0:
            uri = raw[:self._args_start - 1 - self._uri_start]
        else:
            uri = raw
        self._uri = uri
        if self._host_start >= 0:
            if validate_host(bytes(buf[self._host_start:self._host_end])) is None:
                raise _ParseError(400, at_byte=False)
            self._host_in_line = True
        self._state = 0
        self._line_start = self._pos
        if self._version < 1000:
            self._state = -1  # no headers in HTTP/0.9: the request is complete
        self._phase = _Phase.HEADERS
        if self._version >= 1000:
            self._parse_headers()

    # -- header lines ---------------------------------------------------------------------

    def _parse_headers(self) -> None:
        buf = self._buf
        state = self._state
        p = self._pos
        end = len(buf)
        while p < end:
            ch = buf[p]
            if state == _H_START:
                self._line_start = p
                self._invalid_header = False
                if ch == 0x0D:
                    state = _H_HEADER_ALMOST_DONE
                elif ch == 0x0A:
                    self._pos = p + 1
                    self._state = -1
                    return
                else:
                    state = _H_NAME
                    if ch not in _HEADER_NAME_CHARS:
                        if ch <= 0x20 or ch in (0x7F, 0x3A):
                            raise _ParseError(400)
                        self._invalid_header = True
            elif state == _H_NAME:
                if ch in _HEADER_NAME_CHARS:
                    pass
                elif ch == 0x3A:
                    self._hname_end = p
                    state = _H_SPACE_BEFORE_VALUE
                elif ch == 0x0D:
                    self._hname_end = self._hvalue_start = self._hvalue_end = p
                    state = _H_ALMOST_DONE
                elif ch == 0x0A:
                    self._hname_end = self._hvalue_start = self._hvalue_end = p
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                elif ch <= 0x20 or ch == 0x7F:
                    raise _ParseError(400)
                else:
                    self._invalid_header = True
            elif state == _H_SPACE_BEFORE_VALUE:
                if ch in (0x20, 0x09):
                    pass
                elif ch == 0x0D:
                    self._hvalue_start = self._hvalue_end = p
                    state = _H_ALMOST_DONE
                elif ch == 0x0A:
                    self._hvalue_start = self._hvalue_end = p
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                elif ch == 0:
                    raise _ParseError(400)
                else:
                    self._hvalue_start = p
                    state = _H_VALUE
            elif state == _H_VALUE:
                if ch in (0x20, 0x09):
                    self._hvalue_end = p
                    state = _H_SPACE_AFTER_VALUE
                elif ch == 0x0D:
                    self._hvalue_end = p
                    state = _H_ALMOST_DONE
                elif ch == 0x0A:
                    self._hvalue_end = p
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                elif ch == 0:
                    raise _ParseError(400)
            elif state == _H_SPACE_AFTER_VALUE:
                if ch in (0x20, 0x09):
                    pass
                elif ch == 0x0D:
                    state = _H_ALMOST_DONE
                elif ch == 0x0A:
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                elif ch == 0:
                    raise _ParseError(400)
                else:
                    state = _H_VALUE
            elif state == _H_ALMOST_DONE:
                if ch == 0x0A:
                    self._pos = p + 1
                    self._header_done()
                    p = self._pos
                    state = self._state
                    if self._phase is not _Phase.HEADERS:
                        return
                    continue
                if ch != 0x0D:
                    raise _ParseError(400)
            elif state == _H_HEADER_ALMOST_DONE:
                if ch != 0x0A:
                    raise _ParseError(400)
                self._pos = p + 1
                self._state = -1
                return
            p += 1
        self._pos = p
        self._state = state

    def _header_done(self) -> None:
        """One header line is complete: apply nginx's per-header handlers."""
        self._state = _H_START
        start = self._line_start
        self._line_start = self._pos
        if self._invalid_header:
            return  # ignore_invalid_headers on: dropped silently
        buf = self._buf
        name = bytes(buf[start:self._hname_end]).lower()
        value = bytes(buf[self._hvalue_start:self._hvalue_end])
        if name == b"host":
            if self._has_host or validate_host(value) is None:
                raise _ParseError(400, at_byte=False)
            self._has_host = True
            return
        if name in _UNIQUE_HEADERS and name in self._headers:
            raise _ParseError(400, at_byte=False)
        if name == b"connection":
            low = value.lower()
            if b"close" in low:
                self._connection = 1
            elif b"keep-alive" in low:
                self._connection = 2
        elif name == b"user-agent" and name not in self._headers:
            self._user_agent(value)
        if name in _KEPT_HEADERS and name not in self._headers:
            self._headers[name] = value

    def _user_agent(self, ua: bytes) -> None:
        msie = ua.find(b"MSIE ")
        self._msie = msie >= 0 and msie + 7 < len(ua)
        if b"Opera" in ua:
            self._msie = False
        if not self._msie and b"Opera" not in ua and b"Gecko/" not in ua:
            self._chrome = b"Chrome/" in ua

    # -- a complete request ----------------------------------------------------------------

    def _request_ready(self, now: float) -> None:
        """Headers are complete (ngx_http_process_request_header and what follows)."""
        version = self._version
        headers = self._headers
        self._requests += 1
        self._deadline = None  # ngx_http_process_request deletes the header timer
        if version > 1000 and not self._has_host:
            self._finish_error(400, now, parse_error=False)
            return
        # ngx_http_process_request_header, in 1.22's order: Content-Length is parsed first,
        # so the errors after it still wait for (and drop) a body of that length.
        content_length = -1
        chunked = False
        cl = headers.get(b"content-length")
        if cl is not None:
            if not cl or not all(c in _DIGITS for c in cl) or int(cl) > _MAX_OFF_T:
                self._finish_error(400, now, parse_error=False)
                return
            content_length = int(cl)
        status = 0
        te = headers.get(b"transfer-encoding")
        if te is not None:
            if version < 1001 or (te.lower() == b"chunked" and cl is not None):
                status = 400
            elif te.lower() == b"chunked":
                chunked = True
            else:
                status = 501
        if not status and self._method in (b"TRACE", b"CONNECT"):
            status = 405
        if not status and self._mode is CoverMode.PLAIN_ON_TLS_PORT:
            status = STATUS_TO_HTTPS
        if status:
            req = Request(self._method, self._uri, version, {}, content_length, chunked,
                          False, self._msie or self._chrome)
            self._send_response(self._site._fail(req, status), content_length, chunked, now,
                                handled=False)
            return
        if self._connection == 1:
            keepalive = False
        elif self._connection == 2:
            keepalive = True
        else:
            keepalive = version > 1000
        if (self._requests >= KEEPALIVE_REQUESTS
                or now - self._started > KEEPALIVE_TIME or self._keepalive_timeout <= 0):
            keepalive = False
        req = Request(self._method, self._uri, version, dict(headers), content_length,
                      chunked, keepalive, self._msie or self._chrome)
        if content_length > CLIENT_MAX_BODY_SIZE:
            resp = self._site._fail(req, 413)
        else:
            resp = self._site.respond(req)
        self._send_response(resp, content_length, chunked, now, handled=True)

    def _send_response(self, resp: Response, content_length: int, chunked: bool,
                       now: float, *, handled: bool) -> None:
        """Queue ``resp``, then drop the request body and keep alive, linger or close.

        ``handled``: the request reached ngx_http_handler, which sets r->lingering_close for
        requests with a body; the special response handler clears it again for 400 and 497.
        """
        if resp.continue_first:
            self._out += b"HTTP/1.1 100 Continue\r\n\r\n"
        self._out += resp.data
        # the request had a body: nginx reads and drops it (r->lingering_close is set)
        body = content_length > 0 or chunked
        self._body_left = content_length if content_length > 0 else 0
        self._chunk_state = _ChunkState() if chunked else None
        if resp.terminate:
            self._close(CloseAction.RESET if self._pending else CloseAction.CLOSE)
            return
        if body:
            self._linger_flag = handled and resp.status not in (400, STATUS_TO_HTTPS)
            self._discard_from_buffer()
            if not self._body_done():
                self._keepalive_after_discard = resp.keepalive
                self._phase = _Phase.DISCARD
                self._linger_end = now + self._lingering_time
                self._deadline = now + self._lingering_timeout
                return
        else:
            self._linger_flag = False
        self._finalize(resp.keepalive, now)

    def _body_done(self) -> bool:
        if self._chunk_state is not None:
            return self._chunk_state.done
        return self._body_left <= 0

    def _discard_from_buffer(self) -> None:
        avail = len(self._buf) - self._pos
        if self._chunk_state is not None:
            used = self._chunk_state.feed(self._buf, self._pos)
            self._pos += used
        else:
            used = min(avail, self._body_left)
            self._pos += used
            self._body_left -= used

    def _discard(self, now: float) -> bool:
        """Skip body bytes after the response; True when the body is complete."""
        if self._pos < len(self._buf):
            self._discard_from_buffer()
        if not self._body_done() and self._pending:
            if self._chunk_state is not None:
                used = self._chunk_state.feed(self._pending, 0)
            else:
                used = min(len(self._pending), self._body_left)
                self._body_left -= used
            del self._pending[:used]
            self._deadline = min(now + self._lingering_timeout, self._linger_end)
        if self._chunk_state is not None and self._chunk_state.error:
            self._close(CloseAction.CLOSE)
            return False
        if not self._body_done():
            if self._eof:
                self._close(CloseAction.CLOSE)
            return False
        # discarded completely; r->lingering_close stays set (measured: a later byte draws no RST)
        self._finalize(self._keepalive_after_discard, now)
        return self._phase in (_Phase.WAIT, _Phase.DISCARD)

    def _finalize(self, keepalive: bool, now: float) -> None:
        """ngx_http_finalize_connection: keep alive, linger or close."""
        pipelined = self._pos < len(self._buf)
        if keepalive and not self._eof:
            if pipelined:
                if self._cap == LARGE_HEADER_BUFFER_SIZE:
                    self._nfree += self._nbusy - 1
                    self._nbusy = 1
            else:
                leftover = self._pending
                self._fresh_buffers()
                self._pending = leftover
            self._pipelined = pipelined
            self._phase = _Phase.WAIT
            self._reset_request()
            self._line_start = self._pos
            self._deadline = now + (self._header_timeout if pipelined
                                    else self._keepalive_timeout)
            return
        if self._eof:
            self._close(CloseAction.CLOSE)
        elif self._linger_flag or pipelined or self._pipelined:
            self._start_linger(now)
        elif not self._tls and (self._ready or self._pending):
            # rev->ready after a read that filled the buffer: more may be waiting. Under TLS
            # nginx does not take this path (measured: a 10 KiB request line gets 414 and a
            # plain close over TLS, a lingering close over TCP).
            self._start_linger(now)
        else:
            self._close(CloseAction.CLOSE)

    def _finish_error(self, status: int, now: float | None, *, parse_error: bool,
                      linger: bool = False) -> None:
        """An error before the request was handed to the site (400, 414, 494, 505...)."""
        t = time.monotonic() if now is None else now
        data = self._site.error(status, version=self._version,
                                head=self._method == b"HEAD", keepalive=False,
                                msie_padding=self._msie or self._chrome)
        self._out += data
        self._linger_flag = linger
        if parse_error:
            # the parser stops at the bad byte: unparsed bytes remain in the buffer
            self._pos = min(self._pos, len(self._buf) - 1)
        self._finalize(False, t)

    def _start_linger(self, now: float) -> None:
        self._phase = _Phase.LINGER
        self._pending.clear()
        self._linger_end = now + self._lingering_time
        self._deadline = min(now + self._lingering_timeout, self._linger_end)
        self.close_action = CloseAction.LINGER

    def _close(self, action: CloseAction) -> None:
        self._phase = _Phase.CLOSED
        self._deadline = None
        self.close_action = action

    _pipelined = False
    _body_left = 0
    _chunk_state: _ChunkState | None = None
    _keepalive_after_discard = False
    _linger_flag = False
    _uri = b"/"


class _ChunkState:
    """A small chunked-body skipper: counts chunk sizes, drops data, stops after the trailer."""

    def __init__(self) -> None:
        self.done = False
        self.error = False
        self._state = 0  # 0 size, 1 ext, 2 lf after size, 3 data, 4 cr after data,
        # 5 lf after data, 6 trailer line start, 7 trailer line, 8 final lf
        self._size = 0
        self._digits = 0

    def feed(self, data: bytearray, start: int) -> int:
        p = start
        n = len(data)
        while p < n and not self.done and not self.error:
            ch = data[p]
            s = self._state
            if s == 0:
                if ch in _DIGITS or 0x61 <= (ch | 0x20) <= 0x66:
                    self._size = self._size * 16 + int(chr(ch), 16)
                    self._digits += 1
                    if self._digits > MAX_CHUNK_SIZE_DIGITS:
                        self.error = True
                elif self._digits and ch == 0x0D:
                    self._state = 2
                elif self._digits and ch == 0x0A:
                    self._state = 6 if self._size == 0 else 3
                elif self._digits and ch in (0x3B, 0x20, 0x09):
                    self._state = 1
                else:
                    self.error = True
            elif s == 1:
                if ch == 0x0D:
                    self._state = 2
                elif ch == 0x0A:
                    self._state = 6 if self._size == 0 else 3
            elif s == 2:
                if ch != 0x0A:
                    self.error = True
                self._state = 6 if self._size == 0 else 3
            elif s == 3:
                take = min(self._size, n - p)
                self._size -= take
                p += take
                if self._size == 0:
                    self._state = 4
                continue
            elif s == 4:
                if ch == 0x0D:
                    self._state = 5
                elif ch == 0x0A:
                    self._state, self._digits = 0, 0
                else:
                    self.error = True
            elif s == 5:
                if ch != 0x0A:
                    self.error = True
                self._state, self._digits = 0, 0
            elif s == 6:
                if ch == 0x0D:
                    self._state = 8
                elif ch == 0x0A:
                    self.done = True
                else:
                    self._state = 7
            elif s == 7:
                if ch == 0x0A:
                    self._state = 6
            elif s == 8:
                if ch != 0x0A:
                    self.error = True
                self.done = True
            p += 1
        return p - start


# -- asyncio adapter ---------------------------------------------------------------------


class CoverProtocol(asyncio.Protocol):
    """Serves one connection with a :class:`CoverSite`, as nginx would.

    Use it as a protocol factory's product for a listening server, or attach it to a
    running transport with :meth:`take_over`.
    """

    def __init__(self, site: CoverSite, *, mode: CoverMode = CoverMode.HTTP,
                 started_at: float | None = None,
                 header_timeout: float = CLIENT_HEADER_TIMEOUT,
                 keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 lingering_timeout: float = LINGERING_TIMEOUT,
                 lingering_time: float = LINGERING_TIME,
                 plain_on_https_port: bool = False) -> None:
        """``plain_on_https_port=True`` is shorthand for ``mode=PLAIN_ON_TLS_PORT``."""
        self._site = site
        self._mode = CoverMode.PLAIN_ON_TLS_PORT if plain_on_https_port else mode
        self._started_at = started_at
        self._header_timeout = header_timeout
        self._keepalive_timeout = keepalive_timeout
        self._lingering_timeout = lingering_timeout
        self._lingering_time = lingering_time
        self._conn: CoverConnection | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._eof_written = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def take_over(cls, transport: asyncio.Transport, initial: bytes, site: CoverSite, *,
                  mode: CoverMode = CoverMode.HTTP, started_at: float | None = None,
                  header_timeout: float = CLIENT_HEADER_TIMEOUT,
                  keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                  lingering_timeout: float = LINGERING_TIMEOUT,
                  lingering_time: float = LINGERING_TIME) -> CoverProtocol:
        """Become ``transport``'s protocol and handle ``initial`` as if just received.

        ``started_at`` is the loop time (``loop.time()``) when the connection was accepted:
        nginx's client_header_timeout counts from there. Must be called in the loop's thread.
        """
        proto = cls(site, mode=mode, started_at=started_at, header_timeout=header_timeout,
                    keepalive_timeout=keepalive_timeout, lingering_timeout=lingering_timeout,
                    lingering_time=lingering_time)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if initial:
            proto.data_received(initial)
        return proto

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._conn = CoverConnection(
            self._site, now=now, mode=self._mode, started_at=self._started_at,
            header_timeout=self._header_timeout, keepalive_timeout=self._keepalive_timeout,
            lingering_timeout=self._lingering_timeout, lingering_time=self._lingering_time,
            tls=transport.get_extra_info("ssl_object") is not None)
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self._conn is None or self._loop is None:
            return
        self._conn.receive_data(data, self._loop.time())
        self._pump()

    def eof_received(self) -> bool:
        if self._conn is not None and self._loop is not None:
            self._conn.receive_eof(self._loop.time())
            self._pump()
        return False  # the connection has decided to close: let the transport finish it

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._transport = None

    def pause_writing(self) -> None:
        # The peer leaves our answers unread: stop reading its requests (each PING or
        # pipelined request would only add to the unsent output), so what a stranger can
        # make the server hold is the socket buffers and one read's worth of answers.
        transport = self._transport
        if transport is not None and not transport.is_closing():
            cast(asyncio.Transport, transport).pause_reading()

    def resume_writing(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            cast(asyncio.Transport, transport).resume_reading()

    # internals

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._conn is None or self._loop is None:
            return
        self._conn.handle_timer(self._loop.time())
        self._pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    def _pump(self) -> None:
        conn, transport, loop = self._conn, self._transport, self._loop
        if conn is None or transport is None or loop is None:
            return
        # uvloop's transports do not subclass asyncio's classes: duck-type, do not isinstance
        transport = cast(asyncio.Transport, transport)
        out = conn.data_to_send()
        if out and not transport.is_closing():
            transport.write(out)
        action = conn.close_action
        tls = transport.get_extra_info("ssl_object") is not None
        if action is CloseAction.LINGER and not self._eof_written:
            self._eof_written = True
            if tls:
                # nginx: close_notify, then shutdown(SHUT_WR), then read on. asyncio's TLS
                # transport cannot half-close, so send close_notify with close() (it keeps
                # reading while it waits for the peer's) and shut the socket's write side.
                transport.close()
                _shutdown_write(transport)
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        elif action is CloseAction.QUIET and tls:
            self._cancel_timer()
            transport.abort()  # the socket closes (FIN) without a close_notify alert
        elif action in (CloseAction.CLOSE, CloseAction.RESET, CloseAction.QUIET):
            self._cancel_timer()
            if action is CloseAction.RESET:
                _set_rst_on_close(transport)
            transport.close()
            if tls:
                # close() only queued close_notify and would wait up to 30 s for the peer's;
                # nginx closes the socket right after sending it.
                transport.abort()
        when = conn.get_timer()
        if action in (CloseAction.CLOSE, CloseAction.RESET, CloseAction.QUIET):
            return
        if when != self._timer_at:
            self._cancel_timer()
            if when is not None:
                self._timer = loop.call_at(when, self._on_timer)
                self._timer_at = when


def _with_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """A duplicate of the transport's socket (uvloop's socket wrapper has no shutdown())."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except (OSError, ValueError):
        return None


def _shutdown_write(transport: asyncio.BaseTransport) -> None:
    """Send FIN on the socket under a transport (used under TLS, which cannot half-close)."""
    dup = _with_socket(transport)
    if dup is not None:
        with dup, contextlib.suppress(OSError):
            dup.shutdown(socket.SHUT_WR)


def _set_rst_on_close(transport: asyncio.BaseTransport) -> None:
    """Make the coming close send RST, as Linux does when unread data is left."""
    dup = _with_socket(transport)
    if dup is not None:
        with dup, contextlib.suppress(OSError):
            dup.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
